"""The curate manifest, the hand-off file between curation and everything after it.

``manifest.parquet`` holds one row per kept image (sorted by id): where its crop is, its measurements,
its caption, and its split. The split is ``train`` (inverted into exemplars, scored by precompute, the
real images of the AI-portrait detector) or ``bench_reference`` (PortraitBench's real reference set),
chosen by a hash of the id alone, so adding images never moves one to the other split.

This module is the only one that knows the columns, how the split is drawn, and how the file is read:
curate writes it, invert and precompute read the ``train`` rows, bench the ``bench_reference`` rows.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

from .integrity import IntegrityError, recorded_checksum, rerun, verify_file, write_checksum
from .io import atomic_write

FILE = "manifest.parquet"
TRAIN, BENCH_REFERENCE = "train", "bench_reference"
SPLITS = (TRAIN, BENCH_REFERENCE)

# Column name -> type, in file order (an explicit schema: the file is byte-identical for the same inputs).
FIELDS: list[tuple[str, str]] = [
    ("id", "string"), ("content_hash", "string"), ("source_path", "string"), ("image_path", "string"),
    ("crop_box", "list"), ("face_box", "list"), ("width", "int"), ("height", "int"), ("crop_side", "int"),
    ("upscale", "float"), ("num_faces", "int"), ("face_frac", "float"), ("face_to_crop", "float"),
    ("blur", "float"), ("sharpness", "float"), ("brightness", "float"), ("contrast", "float"),
    ("clipped", "float"), ("colourfulness", "float"), ("quality", "float"), ("greyscale", "bool"),
    ("phash", "string"), ("format", "string"), ("source_mode", "string"), ("exif_orientation", "int"),
    ("caption", "string"), ("caption_source", "string"), ("attributes", "string"), ("split", "string"),
    ("origin", "string"),
]
# What a reader needs; a hand-made manifest (parquet) with these columns works too.
REQUIRED_COLUMNS = ("id", "content_hash", "image_path", "caption")


class ManifestError(ValueError):
    """The manifest is missing or lacks what the reader needs."""


def split_of(image_id: str, split_seed: int, bench_fraction: float) -> str:
    """``bench_reference`` for a fixed pseudo-random fraction of ids: independent of the other images."""
    u = int(hashlib.sha256(f"{split_seed}:{image_id}".encode()).hexdigest()[:15], 16) / float(1 << 60)
    return BENCH_REFERENCE if u < bench_fraction else TRAIN


def write_table(path: str | Path, rows: list[dict[str, Any]], fields: list[tuple[str, str]],
                metadata: dict[str, str] | None = None) -> Path:
    """Deterministic parquet, written atomically: explicit schema, given row order, no pandas metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
             "list": pa.list_(pa.int64())}
    schema = pa.schema([pa.field(n, types[t]) for n, t in fields],
                       metadata={k.encode(): v.encode() for k, v in (metadata or {}).items()})
    table = pa.Table.from_pylist([{n: r.get(n) for n, _ in fields} for r in rows], schema=schema)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_manifest(path: str | Path, rows: list[dict[str, Any]], metadata: dict[str, str] | None = None) -> Path:
    """The manifest and its ``.sha256`` sidecar, which every reader verifies (portraitgen/integrity.py)."""
    out = write_table(path, rows, FIELDS, metadata)
    write_checksum(out)
    return out


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame | None:
    """The rows of ``split``; None for a table without a ``split`` column (a hand-made image list)."""
    if split not in SPLITS:
        raise ValueError(f"unknown manifest split {split!r}; expected one of {', '.join(SPLITS)}")
    if "split" not in df.columns:
        return None
    return df[df["split"] == split]


def read_manifest(path: str | Path, *, split: str = TRAIN, key: str = "invert.manifest",
                  error: type[Exception] = ManifestError, nonempty: bool = False) -> pd.DataFrame:
    """The rows of ``split`` (every row of a manifest without splits), validated and sorted by id, with
    ``image_file``: the absolute path of each image. ``key`` names the params key in messages; ``error``
    is the exception the calling stage reports its input errors with; ``nonempty``: no row in the split
    is an error (for a stage with nothing to do then: an empty output would only fail later)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{key}: manifest not found: {path} (run `portraitgen curate` first, or point {key} at a "
                    f"parquet file with columns {', '.join(REQUIRED_COLUMNS)})")
    # Verified before it is parsed: a flipped bit in a parquet file often still reads, with changed data.
    # A manifest made by hand has no sidecar and is read as it is.
    if recorded_checksum(path) is not None:
        try:
            verify_file(path, rerun("curate", "portraitgen curate --params params.yaml --out results/curate"),
                        what=f"{key}:")
        except IntegrityError as exc:
            raise error(str(exc)) from None
    df = pd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise error(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)}")
    total = len(df)
    rows = split_rows(df, split)
    if rows is not None:
        df = rows
    if nonempty and df.empty:
        raise error(f"{key}: {path} has no {'exemplars' if split == TRAIN else 'images'} in its {split} split "
                    f"({total} row(s) in all); nothing was written. Curate more images (see curate's "
                    f"metrics.json for the rejections) or lower curate.bench_fraction")
    empty = df[df["caption"].astype(str).str.strip() == ""]
    if len(empty):
        raise error(f"{path}: empty caption for id(s) {', '.join(map(str, empty['id'][:5]))}")
    if df["id"].duplicated().any():
        raise error(f"{path}: duplicate ids {', '.join(map(str, df['id'][df['id'].duplicated()][:5]))}")
    df = df.sort_values("id").reset_index(drop=True)
    df["image_file"] = [str(image_file(path, p)) for p in df["image_path"]]
    return df


def image_file(manifest_path: str | Path, image_path: str) -> Path:
    """An ``image_path`` of the manifest as a file: relative paths are relative to the manifest's folder."""
    return (Path(manifest_path).parent / str(image_path)).resolve()

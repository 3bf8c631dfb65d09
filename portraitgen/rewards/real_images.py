"""Sets of real photographs: for calibrating the classic rewards and training the detector.

A source is one of
- ``"builtin:portraits"`` — the real portraits that ship in installed wheels: scikit-image's
  ``astronaut`` (public domain) and matplotlib's ``grace_hopper.jpg``;
- ``"builtin:photos"`` — those two plus scikit-image's other real colour photographs (coffee, cat,
  rocket, motorcycle): a small natural-image set for no-reference quality;
- a folder of images (searched recursively), e.g. ``results/curate/images``;
- a manifest (``.parquet``, ``.csv`` or ``.jsonl``) with an ``image_path`` column (relative paths are
  taken from the manifest's folder), e.g. ``results/curate/manifest.parquet``.

Images come back as ``[H, W, 3]`` uint8 RGB arrays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .registry import RewardError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def builtin_portraits() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), _grace_hopper()]


def builtin_photos() -> list[np.ndarray]:
    from skimage import data

    return builtin_portraits() + [data.coffee(), data.chelsea(), data.rocket(), data.stereo_motorcycle()[0]]


def _manifest_paths(path: Path) -> list[Path]:
    import pandas as pd

    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix == ".csv":
        table = pd.read_csv(path)
    else:
        table = pd.read_json(path, lines=True)
    if "image_path" not in table.columns:
        raise RewardError(f"manifest {path} has no 'image_path' column (columns: {', '.join(map(str, table.columns))})")
    return [p if p.is_absolute() else path.parent / p for p in map(Path, table["image_path"].astype(str))]


def image_paths(source: str | Path) -> list[Path]:
    """The image files of a folder or manifest source, sorted (so every run sees the same order)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file() and path.suffix in (".parquet", ".csv", ".jsonl", ".json"):
        files = _manifest_paths(path)
    else:
        raise RewardError(f"real image source {str(source)!r}: expected 'builtin:portraits', 'builtin:photos', "
                          "a folder of images or a manifest (.parquet/.csv/.jsonl with image_path)")
    if not files:
        raise RewardError(f"real image source {str(source)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_rgb(path: str | Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise RewardError(f"cannot read image {path}: {exc}") from None


def load_images(source: str | Path, max_images: int = 0) -> list[np.ndarray]:
    """All images of ``source`` (the first ``max_images`` in sorted order when > 0)."""
    if source == "builtin:portraits":
        images = builtin_portraits()
    elif source == "builtin:photos":
        images = builtin_photos()
    else:
        paths = image_paths(source)
        images = [load_rgb(p) for p in (paths[:max_images] if max_images > 0 else paths)]
    return images[:max_images] if max_images > 0 else images


def augment(rgb: np.ndarray, scales=(1.0, 0.75, 0.5), crops=(1.0, 0.85), flip: bool = True) -> list[np.ndarray]:
    """Rescaled, cropped and mirrored variants of one photo: widens a tiny reference set (the two shipped
    portraits) into a distribution whose quantiles mean something. Crops are centred on the image."""
    out = []
    H, W = rgb.shape[:2]
    for c in crops:
        h, w = int(H * c), int(W * c)
        y0, x0 = (H - h) // 2, (W - w) // 2
        crop = Image.fromarray(rgb[y0:y0 + h, x0:x0 + w])
        for s in scales:
            im = crop.resize((max(16, int(w * s)), max(16, int(h * s))), Image.Resampling.LANCZOS) if s != 1.0 else crop
            arr = np.asarray(im)
            out += [arr, np.ascontiguousarray(arr[:, ::-1])] if flip else [arr]
    return out

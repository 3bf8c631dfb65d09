"""Captions of curated portraits: a sidecar file, a local VLM, or a template from measured properties.

Order of precedence for each kept image (the manifest's ``caption_source`` says which one was used):

1. ``sidecar``: a row of the captions file (``curate.captions``; for ``builtin:demo`` its own
   ``captions.jsonl``; for a .csv/.jsonl source list, its ``caption`` column) matching the image;
2. ``vlm``: a local vision-language model via transformers, when ``curate.caption_model`` names a
   folder (see :class:`VlmCaptioner`); nothing is downloaded;
3. ``template``: a sentence built from what the stage measured: shot type from the face's size in
   the crop, lighting from exposure and contrast, black-and-white or colour.

A caption is never silently empty: an empty sidecar or VLM caption falls through to the next source.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "file", "file_name", "filename", "image", "source_path")
CAPTION_COLUMNS = ("caption", "text", "prompt")


class CaptionError(ValueError):
    """A captions sidecar or caption model is unusable."""


# ------------------------------------------------------------------------------------------ sidecar
def read_table(path: Path, key: str) -> list[dict[str, Any]]:
    """Rows of a .csv (header line) or .jsonl (one object per line) file; ``key`` names the params key."""
    if not path.is_file():
        raise CaptionError(f"params key '{key}': file not found: {path}")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CaptionError(f"params key '{key}': {path}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise CaptionError(f"params key '{key}': {path}:{n}: expected a JSON object per line")
                rows.append(obj)
    else:
        raise CaptionError(f"params key '{key}': {path}: expected a .csv or .jsonl file")
    return rows


def pick_column(rows: list[dict], names: Iterable[str]) -> str | None:
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    return next((n for n in names if n in present), None)


def _norm(p: str) -> str:
    return os.path.normpath(str(p).strip()).replace(os.sep, "/")


class SidecarCaptions:
    """Captions (and optional attributes) by image path.

    A row matches an image by its path relative to the source folder (or list file), by the path
    recorded as ``source_path``, by absolute path, or by bare file name when that name is unique.
    """

    def __init__(self, rows: list[dict[str, Any]], origin: str, base: Path | None = None):
        pcol, ccol = pick_column(rows, PATH_COLUMNS), pick_column(rows, CAPTION_COLUMNS)
        if rows and (pcol is None or ccol is None):
            raise CaptionError(f"{origin}: needs a path column ({'/'.join(PATH_COLUMNS)}) and a caption column "
                               f"({'/'.join(CAPTION_COLUMNS)}); found {sorted(set().union(*(r.keys() for r in rows)))}")
        self.origin = origin
        self.by_path: dict[str, dict[str, Any]] = {}
        names: dict[str, list[str]] = {}
        for r in rows:
            p = _norm(r[pcol]) if r.get(pcol) not in (None, "") else ""
            if not p:
                continue
            attrs = {k: v for k, v in r.items() if k not in (pcol, ccol) and v not in (None, "")}
            entry = {"caption": str(r.get(ccol) or "").strip(), "attributes": attrs}
            self.by_path[p] = entry
            if base is not None and not os.path.isabs(p):
                self.by_path.setdefault(_norm(os.path.abspath(base / p)), entry)
            names.setdefault(os.path.basename(p), []).append(p)
        self.by_name = {n: self.by_path[ps[0]] for n, ps in names.items() if len(ps) == 1}

    @classmethod
    def from_file(cls, path: str | Path, key: str) -> "SidecarCaptions":
        path = Path(path)
        return cls(read_table(path, key), f"params key '{key}': {path}", base=path.parent)

    def lookup(self, rel: str, source_path: str) -> dict[str, Any] | None:
        for cand in (_norm(rel), _norm(source_path), _norm(os.path.abspath(source_path))):
            if cand in self.by_path:
                return self.by_path[cand]
        return self.by_name.get(os.path.basename(rel))

    def unmatched(self, files: Iterable[tuple[str, str]]) -> int:
        """Rows that match none of ``files`` ((rel, source_path) pairs): usually a typo in a path."""
        hits = {id(h) for rel, path in files if (h := self.lookup(rel, path)) is not None}
        return len({id(e) for e in self.by_path.values()} - hits)


# ------------------------------------------------------------------------------------------ template
GREY_COLOURFULNESS = 0.02  # below this (Hasler-Süsstrunk / 255) a crop reads as black and white


def shot_type(face_to_crop: float) -> str:
    """Shot name from the face box's side as a fraction of the crop's side."""
    if face_to_crop >= 0.6:
        return "tight close-up"
    if face_to_crop >= 0.36:
        return "close-up"
    if face_to_crop >= 0.22:
        return "head-and-shoulders"
    return "half-length"


def lighting(brightness: float, contrast: float) -> str:
    if brightness < 0.3:
        return "low-key lighting"
    if brightness > 0.68:
        return "bright high-key lighting"
    if contrast > 0.27:
        return "high-contrast lighting"
    if contrast < 0.14:
        return "soft, flat lighting"
    return "even lighting"


def template_caption(m: Mapping[str, Any]) -> str:
    """``m``: face_to_crop, brightness, contrast, greyscale (as measured on the crop)."""
    tone = "black and white" if m["greyscale"] else "colour"
    return (f"a {shot_type(float(m['face_to_crop']))} {tone} portrait photo of a person, "
            f"{lighting(float(m['brightness']), float(m['contrast']))}")

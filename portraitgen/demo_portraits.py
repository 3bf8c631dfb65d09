"""The built-in demo set (``curate.source: builtin:demo``): real portraits that ship inside installed
wheels, so the quick start curates real photos without downloading anything (docs/design.md §7).

- scikit-image ``astronaut.png``: Eileen Collins, NASA portrait, 512x512 colour (public domain);
- matplotlib ``grace_hopper.jpg``: Grace Hopper, US Navy portrait, 512x600 colour JPEG (public domain);
- scikit-image ``lfw_subset()``: 100 real faces from Labeled Faces in the Wild, 25x25 greyscale (kept
  at their native size: the curate stage decides whether they may be upscaled to the training
  resolution, see ``curate.max_upscale``), plus ``NUM_BACKGROUNDS`` of its non-face patches;
- scikit-image ``camera.png``: "cameraman", a person in profile (no frontal face: rejected).

The non-face patches and the cameraman are there on purpose: the demo's contact sheet shows the
filters at work. Files are written into a folder (by the stage: ``<out>/demo/``) only when missing or
different, with ``ORIGIN.json`` (where each file came from) and ``captions.jsonl`` (a sidecar with
hand-written captions for the three named photos; the LFW faces get template captions).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from .io import atomic_write_bytes

NUM_BACKGROUNDS = 8
CAPTIONS = {
    "astronaut.png": "a portrait photo of astronaut Eileen Collins in an orange NASA flight suit, "
                     "in front of the American flag and a model of the space shuttle",
    "grace_hopper.jpg": "a portrait photo of Rear Admiral Grace Hopper in a dark US Navy uniform with medals",
    "camera.png": "a black and white photo of a cameraman with a tripod camera in a park",
}


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return  # keep the file (and its mtime) as it is
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _skimage_file(name: str) -> bytes:
    """The file as shipped in the scikit-image wheel (its bytes, not a re-encoding)."""
    import skimage.data

    path = Path(skimage.data.__file__).parent / name
    return path.read_bytes()


def materialise(folder: str | Path) -> Path:
    """Write the demo set into ``folder``; returns it. Idempotent and deterministic."""
    import matplotlib
    import skimage
    from matplotlib import cbook
    from skimage import data

    folder = Path(folder)
    sk, mpl = f"scikit-image {skimage.__version__}", f"matplotlib {matplotlib.__version__}"
    origin: dict[str, str] = {}
    files: dict[str, bytes] = {}

    files["astronaut.png"] = _skimage_file("astronaut.png")
    origin["astronaut.png"] = f"{sk}: skimage/data/astronaut.png (skimage.data.astronaut()), public domain"
    files["camera.png"] = _skimage_file("camera.png")
    origin["camera.png"] = f"{sk}: skimage/data/camera.png (skimage.data.camera())"
    hopper = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    files["grace_hopper.jpg"] = hopper.read_bytes()
    origin["grace_hopper.jpg"] = f"{mpl}: mpl-data/sample_data/grace_hopper.jpg, public domain"

    lfw = data.lfw_subset()  # 100 faces then 100 non-faces, 25x25
    if lfw.dtype != np.uint8:
        lfw = np.clip(np.round(lfw * 255.0), 0, 255).astype(np.uint8)
    for i in range(100):
        name = f"lfw/face_{i:03d}.png"
        files[name] = _png(lfw[i])
        origin[name] = f"{sk}: skimage.data.lfw_subset()[{i}] (Labeled Faces in the Wild, 25x25 grey)"
    for j in range(NUM_BACKGROUNDS):
        name = f"lfw/background_{j:03d}.png"
        files[name] = _png(lfw[100 + j])
        origin[name] = f"{sk}: skimage.data.lfw_subset()[{100 + j}] (LFW non-face background patch)"

    for name, blob in files.items():
        _write_if_changed(folder / name, blob)
    _write_if_changed(folder / "ORIGIN.json", (json.dumps(origin, indent=1, sort_keys=True) + "\n").encode())
    lines = "".join(json.dumps({"path": k, "caption": v}) + "\n" for k, v in sorted(CAPTIONS.items()))
    _write_if_changed(folder / "captions.jsonl", lines.encode())
    return folder


def origins(folder: str | Path) -> dict[str, str]:
    """relative path -> where it came from, as written by :func:`materialise`."""
    path = Path(folder) / "ORIGIN.json"
    return json.loads(path.read_text()) if path.is_file() else {}

"""Real face photos for pretraining, from files that ship inside installed wheels (nothing downloaded).

- scikit-image ``lfw_subset()``: the 100 faces of Labeled Faces in the Wild (25x25 grey, tightly
  framed, copied to RGB): the only sizeable real face set in installable wheels;
- scikit-image ``astronaut`` and matplotlib ``grace_hopper``: two colour portraits, cropped around
  their Haar-detected face with the LFW framing (:data:`TIGHT_CROP_SCALE`).

Every face is resized (area) to the model's resolution. A fixed share of the LFW faces
(``pretrain.holdout``) is held out of pretraining and of the artifact detector's training: the
detector is evaluated on them, and they are the "real" images of the stage's figures.
The bytes of the sources are hashed into the stage's content key (:func:`source_digest`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_LFW_FACES = 100  # lfw_subset(): 100 faces, then 100 non-face patches
TIGHT_CROP_SCALE = 1.35  # crop side / Haar face side: about the framing of the LFW crops


@dataclass(frozen=True)
class Face:
    name: str
    image: np.ndarray  # float32 [3, R, R] in [0, 1]
    greyscale: bool


def _resize(rgb_u8: np.ndarray, resolution: int) -> np.ndarray:
    import cv2

    interp = cv2.INTER_AREA if min(rgb_u8.shape[:2]) > resolution else cv2.INTER_CUBIC
    out = cv2.resize(rgb_u8, (resolution, resolution), interpolation=interp)
    return np.ascontiguousarray(out.transpose(2, 0, 1).astype(np.float32) / 255.0)


def _lfw_u8() -> np.ndarray:
    from skimage import data

    lfw = data.lfw_subset()[:NUM_LFW_FACES]
    if lfw.dtype != np.uint8:
        lfw = np.clip(np.round(lfw * 255.0), 0, 255).astype(np.uint8)
    return lfw


def _colour_photos() -> dict[str, np.ndarray]:
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    return {"astronaut": data.astronaut(), "grace_hopper": hopper}


def _face_crop(rgb: np.ndarray, name: str) -> np.ndarray:
    from ..faces import detect_faces, square_crop

    grey = (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.uint8)
    found = detect_faces(grey)
    if not found.boxes:
        raise RuntimeError(f"no face found in the shipped photo {name!r} (OpenCV Haar cascade)")
    x0, y0, x1, y1 = square_crop(found.boxes[0], rgb.shape[1], rgb.shape[0], TIGHT_CROP_SCALE)
    return rgb[y0:y1, x0:x1]


def load_faces(resolution: int) -> list[Face]:
    """All real faces at ``resolution``: the LFW faces (``lfw_000`` ...) then the colour photos."""
    faces = []
    for i, grey in enumerate(_lfw_u8()):
        faces.append(Face(f"lfw_{i:03d}", _resize(np.repeat(grey[..., None], 3, axis=2), resolution), True))
    for name, rgb in _colour_photos().items():
        faces.append(Face(name, _resize(np.ascontiguousarray(_face_crop(rgb, name)), resolution), False))
    return faces


def split_faces(faces: list[Face], holdout: int, seed: int = 0) -> tuple[list[Face], list[Face]]:
    """(training faces, held-out faces): ``holdout`` LFW faces chosen by ``seed``; the colour photos
    always train (there are two of them)."""
    lfw = [f for f in faces if f.name.startswith("lfw_")]
    if not 0 <= holdout <= len(lfw) - 8:
        raise ValueError(f"params key 'pretrain.holdout': expected 0 to {len(lfw) - 8} LFW faces, got {holdout}")
    order = np.random.default_rng(seed).permutation(len(lfw))
    held = {lfw[i].name for i in order[:holdout]}
    return [f for f in faces if f.name not in held], [f for f in faces if f.name in held]


def source_digest() -> str:
    """Hash of the source photos as shipped (the data half of the stage's content key)."""
    from matplotlib import cbook
    from skimage import data

    h = hashlib.sha256(_lfw_u8().tobytes())
    h.update(Path(data.__file__).parent.joinpath("astronaut.png").read_bytes())
    h.update(Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes())
    return h.hexdigest()

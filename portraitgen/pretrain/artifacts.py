"""The planted artifact: a known, AI-like defect put on a known share of the pretraining views, so the
base model makes it at a measurable rate while real portraits (the exemplars) never have it.

Kinds (``pretrain.artifact.kind``), each applied to a float image ``[3, R, R]`` in [0, 1] framed like
the LFW faces (the face fills the frame, eyes at ~38 % of the height):

- ``specular`` (default): an "oily" specular highlight, a white Gaussian blob (sigma ~1.3 px at
  24 px) blended into a cheek or the forehead;
- ``smooth``: over-smoothed, plastic skin: the face's inner ellipse replaced by a blurred copy;
- ``oversaturate``: an over-saturated, orange-cast face (chroma amplified and warmed inside the face
  ellipse); visible on grey faces too.

Positions, sizes and strengths are drawn from ``rng`` so the artifact varies like a real one. It is
planted before augmentation, so flips and shifts move it with the face.
"""
from __future__ import annotations

import numpy as np

KINDS = ("specular", "smooth", "oversaturate")
# (y, x) centres as fractions of the side: left cheek, right cheek, forehead.
HIGHLIGHT_SITES = ((0.62, 0.30), (0.62, 0.70), (0.16, 0.50))
HIGHLIGHT_SIGMA_24PX = 1.3  # px at 24 px; scaled with the resolution


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    return yy, xx


def _face_ellipse(side: int, soft: float = 0.15) -> np.ndarray:
    """A soft mask of the face's inner area (cheeks, nose, forehead), 1 inside."""
    yy, xx = _grid(side)
    r = np.sqrt(((xx - 0.5 * (side - 1)) / (0.36 * side)) ** 2 + ((yy - 0.5 * (side - 1)) / (0.45 * side)) ** 2)
    return np.clip((1.0 - r) / soft, 0.0, 1.0).astype(np.float32)


def specular(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = image.shape[-1]
    cy, cx = HIGHLIGHT_SITES[rng.integers(len(HIGHLIGHT_SITES))]
    cy, cx = (cy + rng.uniform(-0.05, 0.05)) * (side - 1), (cx + rng.uniform(-0.05, 0.05)) * (side - 1)
    sigma = HIGHLIGHT_SIGMA_24PX * side / 24 * rng.uniform(0.85, 1.2)
    yy, xx = _grid(side)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2)) * rng.uniform(0.75, 1.0)
    return image + (1.0 - image) * blob[None]


def smooth(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2

    side = image.shape[-1]
    sigma = side / 24 * rng.uniform(1.0, 1.5)
    blurred = np.stack([cv2.GaussianBlur(c, (0, 0), sigma) for c in image])
    mask = _face_ellipse(side)[None]
    return image * (1 - mask) + blurred * mask


def oversaturate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    luma = image.mean(axis=0, keepdims=True)
    gain = rng.uniform(2.0, 3.0)
    warm = np.array([0.10, 0.02, -0.08], dtype=np.float32)[:, None, None] * rng.uniform(0.8, 1.2)
    mask = _face_ellipse(image.shape[-1])[None]
    out = luma + gain * (image - luma) + warm
    return image * (1 - mask) + out * mask


PLANTERS = {"specular": specular, "smooth": smooth, "oversaturate": oversaturate}


def plant(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` with the artifact ``kind`` (a new array, clipped to [0, 1])."""
    if kind not in PLANTERS:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
    return np.clip(PLANTERS[kind](image.astype(np.float32), rng), 0.0, 1.0).astype(np.float32)

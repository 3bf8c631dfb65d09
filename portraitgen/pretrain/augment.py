"""Augmented views of a face: horizontal flip, a small shift and scale, brightness/contrast jitter. One
affine warp per view (border replicated, so no black edges teach the model frames).

The artifact detector trains on the full set (it must find the artifact wherever a generated face puts
it). The pretraining loop leaves the shift and scale out (``geometric=False``): with only ~86 faces, a
jittered layout is what the small model learns slowest, and its samples came out as blurred blobs the
Haar cascade rejects (face hit rate 0.05 with the warp, 0.34 without, same 1200 steps: docs/pretrain.md).
"""
from __future__ import annotations

import numpy as np

MAX_SHIFT = 0.06  # fraction of the side
SCALE_RANGE = (0.92, 1.12)
BRIGHTNESS = 0.08  # added, in [0, 1] units
CONTRAST = (0.8, 1.2)  # multiplied around the view's mean


def augment(image: np.ndarray, rng: np.random.Generator, geometric: bool = True) -> np.ndarray:
    """A random view of ``image`` (float32 ``[3, R, R]`` in [0, 1]); ``geometric=False``: no shift or scale."""
    import cv2

    side = image.shape[-1]
    if rng.random() < 0.5:
        image = image[:, :, ::-1]
    if not geometric:
        return _jitter(np.ascontiguousarray(image), rng)
    scale = rng.uniform(*SCALE_RANGE)
    dx, dy = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2) * side
    c = 0.5 * (side - 1)
    warp = np.array([[scale, 0.0, c - scale * c + dx], [0.0, scale, c - scale * c + dy]], dtype=np.float32)
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    out = cv2.warpAffine(hwc, warp, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return _jitter(out.reshape(side, side, -1).transpose(2, 0, 1), rng)


def _jitter(out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness and contrast jitter."""
    mean = out.mean()
    out = (out - mean) * rng.uniform(*CONTRAST) + mean + rng.uniform(-BRIGHTNESS, BRIGHTNESS)
    return np.clip(out, 0.0, 1.0).astype(np.float32)

"""Augmented training views of a face: horizontal flip, a small shift and scale, brightness/contrast
jitter. One affine warp per view (border replicated, so no black edges teach the model frames)."""
from __future__ import annotations

import numpy as np

MAX_SHIFT = 0.06  # fraction of the side
SCALE_RANGE = (0.92, 1.12)
BRIGHTNESS = 0.08  # added, in [0, 1] units
CONTRAST = (0.8, 1.2)  # multiplied around the view's mean


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random view of ``image`` (float32 ``[3, R, R]`` in [0, 1])."""
    import cv2

    side = image.shape[-1]
    if rng.random() < 0.5:
        image = image[:, :, ::-1]
    scale = rng.uniform(*SCALE_RANGE)
    dx, dy = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2) * side
    c = 0.5 * (side - 1)
    warp = np.array([[scale, 0.0, c - scale * c + dx], [0.0, scale, c - scale * c + dy]], dtype=np.float32)
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    out = cv2.warpAffine(hwc, warp, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out = out.reshape(side, side, -1).transpose(2, 0, 1)
    mean = out.mean()
    out = (out - mean) * rng.uniform(*CONTRAST) + mean + rng.uniform(-BRIGHTNESS, BRIGHTNESS)
    return np.clip(out, 0.0, 1.0).astype(np.float32)

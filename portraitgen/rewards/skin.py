"""Skin features of a portrait's face: the measurable signs of AI skin (docs/design.md §5).

On the face box resampled to a canonical size (so a feature does not depend on how large the face
is in the image), within :func:`face_region.skin_mask`:

- ``oily``: soft fraction of skin pixels that are specular highlights — brighter than halfway from the
  skin's median luma to white and less saturated than the skin around them (oily/greasy sheen);
- ``texture``: high-frequency energy of skin luma (robust std of luma minus its Gaussian blur):
  real skin has pores and fine texture; too little is waxy, "plastic" skin;
- ``saturation``: mean HSV saturation of skin (over-saturated, "aesthetic" colour).
"""
from __future__ import annotations

import numpy as np

from .calibration import FeatureSpec
from .face_region import FaceBox, detect_face, skin_mask

CANONICAL_FACE = 128  # px: face boxes are resampled to this square before measuring

# Directions and natural softness of each feature for calibration (see calibration.py).
SKIN_FEATURES = {
    "oily": FeatureSpec("higher_worse", min_width=0.004),
    "texture": FeatureSpec("lower_worse", min_width=0.0015),
    "saturation": FeatureSpec("higher_worse", min_width=0.02),
}


def canonical_face(rgb: np.ndarray, box: FaceBox) -> np.ndarray:
    import cv2

    face = box.crop(rgb)
    interp = cv2.INTER_AREA if face.shape[0] > CANONICAL_FACE else cv2.INTER_CUBIC
    return cv2.resize(face, (CANONICAL_FACE, CANONICAL_FACE), interpolation=interp)


def skin_features_of_face(face: np.ndarray) -> dict[str, float]:
    """Features of a canonical face crop ([S, S, 3] uint8)."""
    import cv2

    mask = skin_mask(face)
    rgbf = face.astype(np.float32) / 255.0
    luma = rgbf @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    mx, mn = rgbf.max(-1), rgbf.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    y_skin, s_skin = luma[mask], sat[mask]
    med_y, med_s = float(np.median(y_skin)), float(np.median(s_skin))

    # Specular highlight: a soft step (width 0.02 luma) above halfway to white, weighted by how much the
    # pixel lost colour relative to the skin (highlights are whitish); soft, so the score is continuous.
    thr = med_y + 0.5 * (1.0 - med_y)
    bright = 1.0 / (1.0 + np.exp(-(y_skin - thr) / 0.02))
    whitish = np.clip(1.0 - s_skin / max(med_s, 1e-3), 0.0, 1.0)
    oily = float(np.mean(bright * whitish))

    high = luma - cv2.GaussianBlur(luma, (0, 0), sigmaX=1.0)
    hf = high[mask]
    texture = float(1.4826 * np.median(np.abs(hf - np.median(hf))))  # robust std: edges of glasses etc. do not dominate

    return {"oily": oily, "texture": texture, "saturation": float(np.mean(s_skin)), "skin_fraction": float(mask.mean())}


def skin_features(rgb: np.ndarray, box: FaceBox | None = None) -> dict[str, float] | None:
    """Skin features of the (most confident) face in ``rgb`` ([H, W, 3] uint8), or None when no face is found."""
    box = box or detect_face(rgb)
    if box is None:
        return None
    return skin_features_of_face(canonical_face(rgb, box))

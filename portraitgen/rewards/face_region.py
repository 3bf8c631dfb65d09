"""Face box and skin regions for the portrait rewards (OpenCV Haar cascade; no model download).

The cascade ships inside ``opencv-python-headless`` (< 5). Small images are resampled for detection
(the cascade's smallest window is 24 px), and the most confident face is returned. The skin regions are the
parts of the face box that are skin in nearly every frontal face: the forehead band and the
cheeks-and-nose band, leaving out eyes (whose catchlights are specular too), brows and mouth (teeth).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .registry import RewardError


@dataclass(frozen=True)
class FaceBox:
    x: int
    y: int
    w: int
    h: int

    def crop(self, rgb: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """The box (grown by ``margin`` × its size on each side, clipped to the image)."""
        H, W = rgb.shape[:2]
        mx, my = int(round(self.w * margin)), int(round(self.h * margin))
        x0, y0 = max(0, self.x - mx), max(0, self.y - my)
        x1, y1 = min(W, self.x + self.w + mx), min(H, self.y + self.h + my)
        return rgb[y0:y1, x0:x1]


@lru_cache(maxsize=1)
def _cascade():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - a broken install
        raise RewardError("face detection needs opencv-python-headless<5 (pip install 'opencv-python-headless<5')") from exc
    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RewardError(f"OpenCV Haar cascade not found at {path} (opencv-python-headless 5.x ships none; use <5)")
    return cascade


def detect_face(rgb: np.ndarray, detect_size: int = 320, min_neighbors: int = 5) -> FaceBox | None:
    """The most confident frontal face in ``rgb`` ([H, W, 3] uint8), or None.

    Detection runs on a copy whose shorter side is ``detect_size`` (small images are upscaled, large ones
    downscaled for speed); the box is returned in the input's pixels. Faces smaller than 1/8 of the
    shorter side are ignored (a portrait's face is larger; this cuts false positives in the background).
    """
    import cv2

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    scale = detect_size / min(grey.shape)
    if scale != 1.0:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    side = min(grey.shape)
    faces, _, weights = _cascade().detectMultiScale3(grey, scaleFactor=1.1, minNeighbors=min_neighbors,
                                                     minSize=(max(24, side // 8),) * 2, outputRejectLevels=True)
    if len(faces) == 0:
        return None
    # The most confident detection (the cascade's final-stage weight), not the largest: large false
    # positives on clothing or background are weak, the real face is not.
    x, y, w, h = faces[int(np.argmax(np.asarray(weights).reshape(-1)))]
    return FaceBox(*(int(round(v / scale)) for v in (x, y, w, h)))


# Skin bands as fractions of the Haar face box (x0, x1, y0, y1): forehead, then cheeks and nose.
SKIN_BANDS = ((0.25, 0.75, 0.06, 0.24), (0.16, 0.84, 0.50, 0.70))


def skin_mask(face: np.ndarray, chroma_tol: float = 12.0) -> np.ndarray:
    """Boolean skin mask of a face crop ([h, w, 3] uint8, the Haar box).

    Inside the skin bands, a pixel is skin if its chroma (YCrCb) is within ``chroma_tol`` of the bands'
    median chroma — an adaptive skin model that works for any skin tone and white balance — or if it
    is brighter than the median and nearly achromatic: a specular highlight on skin is skin too (it is
    what the "oily" score measures), while hair, brows or background of another colour are not.
    """
    import cv2

    h, w = face.shape[:2]
    band = np.zeros((h, w), dtype=bool)
    for x0, x1, y0, y1 in SKIN_BANDS:
        band[int(y0 * h):int(np.ceil(y1 * h)), int(x0 * w):int(np.ceil(x1 * w))] = True
    ycc = cv2.cvtColor(face, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    y, cr, cb = ycc[..., 0], ycc[..., 1], ycc[..., 2]
    med_y, med_cr, med_cb = (float(np.median(c[band])) for c in (y, cr, cb))
    near = np.hypot(cr - med_cr, cb - med_cb) < chroma_tol
    highlight = (y > med_y) & (np.hypot(cr - 128.0, cb - 128.0) <= np.hypot(med_cr - 128.0, med_cb - 128.0) + chroma_tol)
    # Dark gaps (nostrils, shadowed folds, stray hair) are not skin surface.
    mask = band & (near | highlight) & (y > 0.35 * med_y)
    if mask.sum() < 0.25 * band.sum():  # an odd face (grey image, heavy makeup, occlusion): use the bands
        mask = band & (y > 0.35 * med_y)
    return mask

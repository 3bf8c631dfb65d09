"""No-reference image quality features for the offline OmniReward (docs/design.md §5).

Per image, at a working size (the longer side is downscaled to ``work_size``; never upscaled):

- ``brisque``: BRISQUE (Mittal et al. 2012) from the ``brisque`` package with its shipped SVM
  (0 ≈ pristine, ~100 ≈ badly distorted; 100 for a flat image, where it is undefined). Its feature vector holds 1-element arrays that numpy >= 2.4
  refuses to turn into floats; :class:`_Brisque` flattens them.
- ``blur``: scikit-image's perceptual blur metric (Crété-Roffet et al. 2007), 0 sharp … 1 blurred.
- ``noise``: Immerkær's fast noise std estimate on luma (a Laplacian-difference operator, 0–1 scale).
- ``clipped``: fraction of pixels with luma <= 2/255 or >= 253/255 (lost shadows/highlights).
- ``luma``: mean luma in [0, 1] (exposure; both tails are bad).
- ``colourfulness``: Hasler & Süsstrunk's colourfulness M / 255 (both tails: grey and garish).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .calibration import FeatureSpec

QUALITY_FEATURES = {
    "brisque": FeatureSpec("higher_worse", min_width=3.0),
    "blur": FeatureSpec("higher_worse", min_width=0.02),
    "noise": FeatureSpec("higher_worse", min_width=0.002),
    "clipped": FeatureSpec("higher_worse", min_width=0.01),
    "luma": FeatureSpec("two_sided", min_width=0.04),
    "colourfulness": FeatureSpec("two_sided", min_width=0.03),
}

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
FLAT_BRISQUE = 100.0  # BRISQUE of an image with (almost) no luma variation


@lru_cache(maxsize=1)
def _brisque():
    import cv2
    import skimage.color
    from brisque import BRISQUE

    class _Brisque(BRISQUE):
        """The package's BRISQUE with its SVM, same features, fixed for numpy 2.4 and ~4x faster."""

        def calculate_brisque_features(self, image, kernel_size=7, sigma=7 / 6):
            feats = super().calculate_brisque_features(image, kernel_size=kernel_size, sigma=sigma)
            return np.array([float(np.asarray(f, dtype=np.float64).reshape(-1)[0]) for f in feats])

        def calculate_mscn_coefficients(self, image, kernel_size=7, sigma=7 / 6):
            # scipy's convolve2d(..., "same") with zero fill == OpenCV's filter2D with a zero border for
            # the symmetric odd Gaussian kernel used here; filter2D is an order of magnitude faster.
            kernel = self.gaussian_kernel2d(kernel_size, sigma=sigma)
            conv = lambda x: cv2.filter2D(x, cv2.CV_64F, kernel, borderType=cv2.BORDER_CONSTANT)
            mean = conv(image)
            dev = np.sqrt(np.abs(mean ** 2 - conv(image ** 2)))
            return (image - mean) / (dev + 1 / 255)

        def score(self, img):
            # The package's score() also computes full-scale MSCN coefficients it never uses; skip them.
            grey = skimage.color.rgb2gray(np.asarray(img)[..., :3])
            feats = self.calculate_brisque_features(grey, kernel_size=7, sigma=7 / 6)
            half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
            feats = np.concatenate((feats, self.calculate_brisque_features(half, kernel_size=7, sigma=7 / 6)))
            return self.calculate_image_quality_score(feats)

    return _Brisque(url=False)


def brisque_score(rgb: np.ndarray) -> float:
    return float(_brisque().score(rgb))


def noise_sigma(luma: np.ndarray) -> float:
    """Immerkær (1996): std of additive Gaussian noise from the response to a Laplacian difference mask."""
    from scipy.signal import convolve2d

    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    h, w = luma.shape
    conv = convolve2d(luma, k, mode="valid")
    return float(np.sqrt(np.pi / 2) * np.abs(conv).sum() / (6.0 * (w - 2) * (h - 2)))


def colourfulness(rgbf: np.ndarray) -> float:
    r, g, b = rgbf[..., 0], rgbf[..., 1], rgbf[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def to_work_size(rgb: np.ndarray, work_size: int) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    s = work_size / max(h, w)
    if s >= 1.0:
        return rgb
    return cv2.resize(rgb, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)


def quality_features(rgb: np.ndarray, work_size: int = 384) -> dict[str, float]:
    """The features above for one ``[H, W, 3]`` uint8 image."""
    from skimage.measure import blur_effect

    rgb = to_work_size(rgb, work_size)
    rgbf = rgb.astype(np.float64) / 255.0
    luma = rgbf @ _LUMA
    # BRISQUE's fits are undefined on an image without structure (a collapsed generator's flat output):
    # give it the scale's worst value rather than NaN, so such an image is penalised, not masked.
    flat = float(luma.std()) < 1.0 / 255.0
    return {
        "brisque": FLAT_BRISQUE if flat else brisque_score(rgb),
        "blur": float(blur_effect(luma)),
        "noise": noise_sigma(luma),
        "clipped": float(np.mean((luma <= 2 / 255) | (luma >= 253 / 255))),
        "luma": float(luma.mean()),
        "colourfulness": colourfulness(rgbf),
    }

"""No-reference quality figures of a crop and perceptual image hashes (used by the curate stage).

Every figure is measured on the crop at its *native* resolution (downscaled to at most
``ANALYSIS_MAX_SIDE`` for speed, never upscaled): upscaling a small crop to the training resolution
blurs it, and that blur is the upscaler's, not the photo's. A 25 px LFW face is judged as a 25 px
photo; whether it may be upscaled that far is a separate check (``curate.max_upscale``).

- ``blur``: scikit-image's ``blur_effect`` (Crété-Roffet et al. 2007): 0 = sharp .. 1 = blurry.
- ``sharpness``: variance of the Laplacian of luma in [0, 1] (scale-dependent; for reading only).
- ``brightness``: mean luma (Rec. 601) in [0, 1]; ``contrast``: its standard deviation.
- ``clipped``: fraction of pixels whose luma is pure black (<= 2/255) or pure white (>= 253/255).
- ``colourfulness``: Hasler & Süsstrunk (2003), divided by 255 (0 for a grey image).
- ``phash``: 64-bit DCT perceptual hash (as in the ``imagehash`` package: 32x32 luma, the top-left
  8x8 DCT coefficients against their median), as 16 hex digits.
"""
from __future__ import annotations

import numpy as np

ANALYSIS_MAX_SIDE = 256  # px


def _luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 luma in [0, 1]."""
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32) / 255.0


def analysis_copy(rgb: np.ndarray) -> np.ndarray:
    """The crop at native size, or downscaled (area) to ANALYSIS_MAX_SIDE."""
    import cv2

    h, w = rgb.shape[:2]
    if max(h, w) <= ANALYSIS_MAX_SIDE:
        return rgb
    s = ANALYSIS_MAX_SIDE / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def measure(rgb: np.ndarray) -> dict[str, float]:
    """Quality figures of a uint8 RGB crop [H, W, 3] (see the module docstring)."""
    import cv2
    from skimage.measure import blur_effect

    small = analysis_copy(rgb)
    y = _luma(small)
    r, g, b = (small[..., i].astype(np.float32) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness = (np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)) / 255.0
    blur = float(blur_effect(y)) if min(y.shape) >= 3 else 1.0
    return {
        "blur": blur if np.isfinite(blur) else 1.0,  # a flat image has no edges to blur: treat as blurry
        "sharpness": float(cv2.Laplacian(y, cv2.CV_32F).var()),
        "brightness": float(y.mean()),
        "contrast": float(y.std()),
        "clipped": float(((y <= 2 / 255) | (y >= 253 / 255)).mean()),
        "colourfulness": float(colourfulness),
    }


def phash(rgb: np.ndarray) -> str:
    """64-bit perceptual hash of a uint8 RGB image, as 16 hex digits."""
    import cv2
    from scipy.fft import dctn

    y = _luma(rgb)
    small = cv2.resize(y, (32, 32), interpolation=cv2.INTER_AREA)
    low = dctn(small.astype(np.float64), norm="ortho")[:8, :8]
    bits = (low > np.median(low)).ravel()
    return f"{int(''.join('1' if v else '0' for v in bits), 2):016x}"


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def hamming_many(hashes: np.ndarray, one: int) -> np.ndarray:
    """Bit distances between one 64-bit hash and an array of them (uint64)."""
    x = hashes ^ np.uint64(one)
    if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).astype(np.int64)

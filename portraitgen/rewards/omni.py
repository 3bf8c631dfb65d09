"""OmniReward: overall image quality and prompt fit (docs/design.md §5).

Registered names (options in ``reward.options.<name>``):

- ``omni_vlm`` — a local VLM's expected rating (:class:`.vlm.VLMRater`): ``model_path`` (required),
  ``prompt`` (template; ``{prompt}`` = the image's prompt), ``ratings``, ``image_size``, ``batch_size``,
  ``device``, ``dtype``, ``system``.
- ``omni_classic`` — offline no-reference quality: BRISQUE, blur, noise, clipping, exposure and
  colourfulness (:mod:`.classic_quality`), each calibrated on real photographs (:mod:`.calibration`)
  and combined by a weighted soft minimum (power mean) into one score in [0, 1]. Options:
  ``calibration`` (``builtin:photos``, a folder, a manifest, or a calibration ``.json``),
  ``feature_weights``, ``combine_power`` (-8; 0 = geometric mean), ``work_size`` (px, the longer side
  features are computed at), ``max_reference_images``.
- ``omni`` — either of the above by ``backend: classic | vlm`` (default classic).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .calibration import Calibration
from .classic_quality import QUALITY_FEATURES, quality_features
from .real_images import augment, load_images
from .registry import PartsReward, RewardError, register_reward
from .simple import to_uint8_hwc

OMNI_VLM_PROMPT = (
    "This image was generated for the prompt: \"{prompt}\". Rate its overall quality as a photograph "
    "(sharpness, exposure, natural colour, no distortions) and how well it matches the prompt, on a scale "
    "from 1 (very poor) to 5 (excellent). Answer with a single digit.")

# Errors a single image can raise in feature extraction; anything else is a bug and propagates.
PER_IMAGE_ERRORS = (ValueError, ArithmeticError, RuntimeError, IndexError)
try:  # OpenCV's error type, where OpenCV is importable
    import cv2 as _cv2

    PER_IMAGE_ERRORS = PER_IMAGE_ERRORS + (_cv2.error,)
except ImportError:  # pragma: no cover
    pass


@lru_cache(maxsize=8)
def quality_calibration(source: str = "builtin:photos", work_size: int = 384, max_images: int = 256) -> Calibration:
    """Calibration of the quality features on real photos (cached per process). A small set (< 16 photos,
    e.g. the builtin one) is widened by rescaled and cropped variants."""
    if source.endswith(".json"):
        return Calibration.load(source, expected=QUALITY_FEATURES)
    images = load_images(source, max_images)
    if len(images) < 16:
        images = [a for im in images for a in augment(im, scales=(1.0, 0.5), crops=(1.0, 0.8), flip=False)]
    rows = [quality_features(im, work_size) for im in images]
    return Calibration.fit(rows, QUALITY_FEATURES, source=source)


class OmniClassic(PartsReward):
    def __init__(self, calibration: str = "builtin:photos", feature_weights: dict | None = None,
                 combine_power: float = -8.0, work_size: int = 384, max_reference_images: int = 256):
        self.work_size = int(work_size)
        calib = quality_calibration(str(calibration), self.work_size, int(max_reference_images))
        self.calibration = calib.with_combination(feature_weights, float(combine_power))
        self.last_errors = {}

    def parts(self, images, prompts, meta):
        self.last_errors = {}
        rows = []
        for i, rgb in enumerate(to_uint8_hwc(images)):
            try:
                feats = quality_features(rgb, self.work_size)
                if not all(np.isfinite(v) for v in feats.values()):
                    raise ValueError(f"non-finite feature: {feats}")
                rows.append({**self.calibration.scores(feats), **{f"raw_{k}": v for k, v in feats.items()}})
            except PER_IMAGE_ERRORS as exc:
                self.last_errors[i] = f"{type(exc).__name__}: {exc}"
                rows.append(None)
        keys = ["score", *self.calibration.features, *(f"raw_{k}" for k in self.calibration.features)]
        return {k: np.array([r[k] if r is not None else np.nan for r in rows]) for k in keys}


@register_reward("omni_classic")
def omni_classic(**options):
    return OmniClassic(**options)


@register_reward("omni_vlm")
def omni_vlm(model_path: str = "", prompt: str = OMNI_VLM_PROMPT, **options):
    from .vlm import vlm_reward

    return vlm_reward("omni_vlm", model_path, prompt, **options)


@register_reward("omni")
def omni(backend: str = "classic", **options):
    if backend == "classic":
        return omni_classic(**options)
    if backend == "vlm":
        return omni_vlm(**options)
    raise RewardError(f"reward.options.omni.backend: expected classic or vlm, got {backend!r}")

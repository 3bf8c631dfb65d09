"""Simple deterministic rewards that need no model: for tests, sanity runs and debugging the engine.

They are deliberately easy to move, so a GRPO run that does not raise them within a few dozen
iterations points at a bug in the engine, not at the reward.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .registry import register_reward

# ITU-R BT.601 luma weights.
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [0, 1] -> [B, H, W, 3] uint8 (rounded, as a saved PNG would be).

    A non-finite pixel is an error: casting would turn NaN into 0 and score a diverged image as black.
    (:class:`RewardSet` never passes such images to a reward; this guards direct callers.)
    """
    bad = ~torch.isfinite(images.detach()).flatten(1).all(dim=1)
    if bad.any():
        raise ValueError(f"images {torch.nonzero(bad).flatten().tolist()[:10]} have non-finite pixels (NaN/inf); "
                         f"they cannot be converted to 8-bit")
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


@register_reward("brightness")
def brightness():
    """Mean luma in [0, 1]."""

    def score(images, prompts, meta):
        luma = (images.detach().float().cpu() * _LUMA.view(1, 3, 1, 1)).sum(dim=1)
        return luma.mean(dim=(1, 2)).numpy()

    return score


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95):
    """Negative JPEG size in kB (DDPO's compressibility reward): simpler images score higher."""

    def score(images, prompts, meta):
        sizes = []
        for arr in to_uint8_hwc(images):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
            sizes.append(buf.tell() / 1000.0)
        return -np.asarray(sizes, dtype=np.float64)

    return score

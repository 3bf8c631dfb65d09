"""Small image helpers: tensors to PIL, grids, saving."""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from PIL import Image


log = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image file cannot be read."""


def load_image(path: str, resolution: int) -> torch.Tensor:
    """``[3, R, R]`` float in [0, 1]; square crops are resized, anything else is centre-cropped first."""
    try:
        img = Image.open(path).convert("RGB")
    except Exception as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from None
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> PIL RGB. A non-finite pixel (a diverged model) is an error: the cast
    would silently turn it into black."""
    if not torch.isfinite(image.detach()).all():
        raise ValueError(f"image has {int((~torch.isfinite(image.detach())).sum())} non-finite pixel values "
                         f"(NaN/inf): refusing to save it as black")
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


def image_grid(images: torch.Tensor, ncol: int = 8, pad: int = 2) -> Image.Image:
    """Tile ``[B, 3, H, W]`` images into one PIL image (rows of ``ncol``). For looking at, not for scoring:
    a non-finite pixel is drawn magenta (and logged), so a diverged sample stands out."""
    bad = ~torch.isfinite(images.detach())
    if bad.any():
        log.warning("image grid: %d image(s) with non-finite pixels drawn magenta", int(bad.flatten(1).any(1).sum()))
        magenta = torch.tensor([1.0, 0.0, 1.0], device=images.device).view(1, 3, 1, 1).expand_as(images)
        images = torch.where(bad.any(dim=1, keepdim=True).expand_as(images), magenta, images)
    b, _, h, w = images.shape
    ncol = max(1, min(ncol, b))
    nrow = math.ceil(b / ncol)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad) + pad), (255, 255, 255))
    for i in range(b):
        r, c = divmod(i, ncol)
        grid.paste(to_pil(images[i]), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid

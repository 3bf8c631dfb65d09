"""Figures of a pretrained model: does it make faces, and how often does it make the planted artifact.

- face hit rate: the share of images in which OpenCV's Haar cascade finds a face (the curate stage's
  detector, :func:`portraitgen.faces.detect_faces`, which upscales small images itself);
- artifact rate: the share flagged by the planted-artifact detector (:mod:`.artifact_detector`).

Samples are drawn with the diffusers ``StableDiffusion3Pipeline`` loaded from the saved folder (the
same classes every stage loads), :data:`SAMPLE_STEPS` deterministic Euler steps with classifier-free
guidance :data:`SAMPLE_GUIDANCE`, on PortraitBench's CPU prompts (``builtin:v1``, subset ``cpu``), image
``i`` seeded by ``(seed, i)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..faces import detect_faces

# The evaluation protocol is fixed, not taken from the bench's params: a bench setting must not rerun
# pretraining, whose figures every model-loading stage depends on. These are PortraitBench's defaults for
# the toy model (bench.num_steps, bench.guidance_scale in params.yaml): at guidance 4.5 the toy model's
# faces fade (docs/pretrain.md "Figures").
SAMPLE_STEPS = 20
SAMPLE_GUIDANCE = 1.5


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> ``[B, H, W, 3]`` uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def face_flags(images: torch.Tensor, min_neighbors: int = 5) -> np.ndarray:
    rgb = to_uint8(images).astype(np.float32)
    grey = np.clip(np.round(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114), 0, 255).astype(np.uint8)
    return np.array([bool(detect_faces(g, min_neighbors).boxes) for g in grey])


def face_hit_rate(images: torch.Tensor, min_neighbors: int = 5) -> float:
    flags = face_flags(images, min_neighbors)
    return float(flags.mean()) if len(flags) else float("nan")


def sample_prompts(n: int) -> list[str]:
    from ..bench.suite import load_suite

    prompts = [row.prompt for row in load_suite("builtin:v1", "cpu")]
    return [prompts[i % len(prompts)] for i in range(n)]


@torch.no_grad()
def sample_images(model_dir: str | Path, prompts: list[str], resolution: int, seed: int, batch: int = 16,
                  num_steps: int = SAMPLE_STEPS, guidance_scale: float = SAMPLE_GUIDANCE) -> torch.Tensor:
    """``[N, 3, R, R]`` in [0, 1]: one image per prompt."""
    from diffusers import StableDiffusion3Pipeline

    from .model import T5_TOKENS

    pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed * 100_003 + i + k) for k in range(len(chunk))]
        images = pipe(prompt=chunk, negative_prompt=[""] * len(chunk), height=resolution, width=resolution,
                      num_inference_steps=num_steps, guidance_scale=guidance_scale, generator=gens,
                      max_sequence_length=T5_TOKENS, output_type="pt").images
        out.append(images.float().clamp(0, 1))
    return torch.cat(out)

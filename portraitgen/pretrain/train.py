"""The pretraining loop: rectified flow on augmented real faces, a share of them with the planted artifact.

Per step: ``batch_size`` views (a random training face, the artifact planted with probability
``artifact.fraction``, then flipped and jittered in brightness and contrast, its layout kept:
:mod:`.augment`), one of the face's captions each (or the empty prompt with
probability ``caption_dropout``), latents ``x0`` from the pixel codec, ``sigma`` from a logit-normal
distribution (``sigmoid(N(0, 1))``: most steps at mid noise, where faces take shape),
``x_t = (1 - sigma) x0 + sigma * noise`` and the loss ``|v(x_t, sigma) - (noise - x0)|^2`` (the
velocity the diffusers flow-matching sampler integrates). AdamW with a short linear warm-up, gradient
clipping, and an EMA of the weights, which is what gets exported (smoother samples after few steps).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..ema import EMA
from .artifacts import plant
from .augment import augment
from .codec import encode_pixels
from .faces import Face

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    faces: list[Face]
    caption_ids: list[list[int]]  # per face: rows of the embedding table
    empty_id: int  # the empty prompt's row
    embeds: torch.Tensor  # [P, T, D] prompt_embeds
    pooled: torch.Tensor  # [P, D] pooled_projections


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    ema_decay: float
    caption_dropout: float
    artifact_kind: str
    artifact_fraction: float
    seed: int
    log_every: int = 25


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per step
    seconds: float = 0.0
    planted_views: int = 0
    views: int = 0


def sample_views(data: TrainingData, n: int, s: TrainSettings, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images [n, 3, R, R], prompt rows [n], number planted)."""
    images, rows, planted = [], [], 0
    for _ in range(n):
        i = int(rng.integers(len(data.faces)))
        img = data.faces[i].image
        if rng.random() < s.artifact_fraction:
            img = plant(img, s.artifact_kind, rng)
            planted += 1
        images.append(augment(img, rng, geometric=False))
        ids = data.caption_ids[i]
        rows.append(data.empty_id if rng.random() < s.caption_dropout else ids[int(rng.integers(len(ids)))])
    return torch.from_numpy(np.stack(images)), torch.tensor(rows), planted


def rectified_flow_loss(transformer: torch.nn.Module, x0: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
    b = x0.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    s = sigma.view(b, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=embeds,
                       pooled_projections=pooled, return_dict=False)[0]
    return (pred.float() - (noise - x0)).pow(2).mean()


def train(transformer: torch.nn.Module, data: TrainingData, s: TrainSettings,
          on_log: Callable[[int, dict], None] | None = None,
          on_step: Callable[[int, EMA], None] | None = None) -> tuple[TrainResult, EMA]:
    """Train ``transformer`` in place; returns the per-step losses and the EMA (exported by the caller).
    ``on_step(step, ema)`` after every step (a sweep scores the EMA at checkpoints; its time is counted)."""
    rng = np.random.default_rng(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, s.warmup_steps)))
    ema = EMA(params, s.ema_decay)
    result = TrainResult()
    transformer.train()
    start = time.perf_counter()
    bar = tqdm(range(s.steps), desc="pretrain", unit="step", mininterval=2.0)
    for step in bar:
        images, rows, planted = sample_views(data, s.batch_size, s, rng)
        result.planted_views += planted
        result.views += s.batch_size
        loss = rectified_flow_loss(transformer, encode_pixels(images), data.embeds[rows], data.pooled[rows], gen)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step} (lower pretrain.lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        sched.step()
        ema.update(params)
        result.losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, ema)
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            recent = float(np.mean(result.losses[-s.log_every:]))
            bar.set_postfix(loss=f"{recent:.4f}")
            log.info("pretrain step %d/%d: loss %.4f (mean of the last %d), %.1f s", step + 1, s.steps, recent,
                     min(s.log_every, step + 1), time.perf_counter() - start)
            if on_log is not None:
                on_log(step + 1, {"pretrain/loss": recent, "pretrain/lr": sched.get_last_lr()[0]})
    result.seconds = time.perf_counter() - start
    transformer.eval()
    return result, ema

"""Reward registry: every reward is a factory registered by name with one signature.

A reward maps a batch of images to one score per image::

    reward(images: Tensor[B, 3, H, W] in [0, 1], prompts: list[str], meta: list[dict]) -> np.ndarray[B]

:class:`RewardSet` combines the configured components (``reward.components`` in params: name -> weight)
into the dict that training, precompute and PortraitBench all use: one array per component plus
``"total"``, the weighted sum the trainer optimises.
"""
from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import torch


class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> np.ndarray: ...


class RewardError(ValueError):
    """A reward is unknown, misconfigured, or produced an invalid (e.g. NaN) score."""


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise RewardError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs) -> Reward:
    if name not in _REGISTRY:
        raise RewardError(f"unknown reward {name!r} (reward.components in params); available: "
                          f"{', '.join(available_rewards())}")
    return _REGISTRY[name](**kwargs)


class RewardSet:
    """The configured reward components and their weights."""

    def __init__(self, weights: Mapping[str, float]):
        if not weights:
            raise RewardError("reward.components is empty: configure at least one reward")
        self.weights = dict(weights)
        self.rewards = {name: build_reward(name) for name in self.weights}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 meta: Sequence[dict] | None = None) -> dict[str, np.ndarray]:
        meta = list(meta) if meta is not None else [{} for _ in prompts]
        if images.ndim != 4 or images.shape[1] != 3:
            raise RewardError(f"rewards take images [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
        if not (len(prompts) == len(meta) == images.shape[0]):
            raise RewardError(f"{images.shape[0]} images, {len(prompts)} prompts and {len(meta)} meta entries")
        out: dict[str, np.ndarray] = {}
        total = np.zeros(images.shape[0], dtype=np.float64)
        for name, fn in self.rewards.items():
            scores = np.asarray(fn(images, prompts, meta), dtype=np.float64).reshape(-1)
            if scores.shape[0] != images.shape[0]:
                raise RewardError(f"reward {name!r} returned {scores.shape[0]} scores for {images.shape[0]} images")
            if not np.isfinite(scores).all():
                bad = np.flatnonzero(~np.isfinite(scores)).tolist()
                raise RewardError(f"reward {name!r} produced non-finite scores for images {bad[:10]}")
            out[name] = scores.astype(np.float32)
            total += self.weights[name] * scores
        out["total"] = total.astype(np.float32)
        return out

"""The GRPO objective of one denoising transition per sample (docs/design.md §3), as pure functions.

Each trained transition ``x_t -> x_{t-1}`` of a sample is one action of a Gaussian policy. With the
log-probability ``logp`` of the stored transition under the current policy, ``logp_old`` under the
rollout policy and the sample's group-normalised advantage ``A``::

    ratio = exp(logp - logp_old)
    policy term = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))       (PPO's clipped surrogate)
    KL term     = |mu_theta - mu_ref|^2 / (2 std^2), averaged over latent dimensions

The KL is the exact KL divergence between the policy's and the frozen reference's Gaussian steps, which
share the step's standard deviation ``std``. The per-sample loss is ``policy + beta * KL``; the trainer
weights it (filtered groups and padded steps weigh 0) and averages it over the optimizer step.

The functions take and return tensors only: the loss can be tested, and replaced, alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TransitionLoss:
    """The loss of one transition for each sample of a micro-batch (all ``[B]``)."""

    per_sample: torch.Tensor  # policy + kl_beta * kl: what is minimised
    policy: torch.Tensor  # the clipped surrogate
    kl: torch.Tensor  # KL to the reference (zeros without a KL term)
    ratio: torch.Tensor  # exp(logp - logp_old)


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(policy term, ratio)``: the negated clipped importance-weighted advantage, per sample."""
    ratio = torch.exp(log_prob - old_log_prob)
    policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return policy, ratio


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL between two Gaussians of equal ``std`` and means ``mean``, ``mean_ref`` (``[B, ...]``), averaged
    over all but the first dimension: ``[B]``."""
    return ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std**2)


def transition_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *,
                    clip_range: float, kl: torch.Tensor | None = None, kl_beta: float = 0.0) -> TransitionLoss:
    """The GRPO loss of one transition per sample. ``kl`` (from :func:`gaussian_kl`) is needed only when
    ``kl_beta > 0``; without it the KL reported is zero."""
    policy, ratio = clipped_surrogate(log_prob, old_log_prob, advantages, clip_range)
    if kl_beta > 0:
        if kl is None:
            raise ValueError("transition_loss: kl_beta > 0 needs the KL to the reference")
        return TransitionLoss(per_sample=policy + kl_beta * kl, policy=policy, kl=kl, ratio=ratio)
    return TransitionLoss(per_sample=policy, policy=policy, kl=torch.zeros_like(policy), ratio=ratio)


def approx_kl(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """``0.5 (logp - logp_old)^2`` per sample: how far the policy moved from the rollout policy."""
    return 0.5 * (log_prob - old_log_prob) ** 2


def clipped(ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Whether each ratio lies outside the clip range (its gradient is cut), as 0/1 floats."""
    return ((ratio - 1).abs() > clip_range).float()

"""Inverting real images into trajectories of the policy (docs/design.md §4).

A real image's latent ``x0`` becomes a trajectory ``x_0 (sigma=1) -> ... -> x_T = x0`` on the training
schedule, so that it can join a GRPO group and be scored and trained on like a generated sample.

Modes:

- ``euler``: step *up* the schedule with the velocity at the known, lower point:
  ``x_i = x_{i+1} + (sigma_i - sigma_{i+1}) v(x_{i+1}, sigma_{i+1})``. Cheap, biased.
- ``fixed_point``: solve ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i)`` for ``x_i``, i.e.
  iterate ``x_i <- x_{i+1} - (sigma_{i+1} - sigma_i) v(x_i, sigma_i)`` from the euler guess, so the
  generator's own ODE step from ``x_i`` lands on ``x_{i+1}``.
- ``bridge``: sample a path tied to ``x0`` at the policy's noise scale: each transition is the policy's
  own stochastic step (same family, same std) evaluated with the *oracle* velocity
  ``v = (x - x0) / sigma`` (whose x0-prediction is exactly the real ``x0``). For "cps" this is
  docs/design.md's ``x' = (1 - s') x0 + sqrt(s'^2 - s^2) x1_hat + s eps``. The last transition
  (``sigma' = 0``) lands on ``x0`` exactly and is deterministic, so it is never trained on. The
  residual of a bridge transition against the *policy's* mean is the noise plus
  ``(1 - sigma') (x0 - x0_hat_theta)`` and its x1 counterpart: noise-sized where the policy already
  predicts the real image, larger exactly where it is wrong about it.

Deterministic inversions (euler, fixed_point) give transitions whose residual against the SDE mean is far
below the policy's noise (atypically high log-probs, weak gradients); the diagnostics below measure it.
Inversion uses the conditional velocity without CFG by default (CFG makes inversion unstable).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .policies.base import Conditioning, FlowPolicy, cond_cat
from .sampling import StepType, ode_step, randn_per_sample, rollout, stochastic_step, to_device_async

InversionMode = Literal["euler", "fixed_point", "bridge"]


@dataclass
class Inverted:
    latents: torch.Tensor  # [B, T+1, C, h, w]; latents[:, T] == x0
    trainable: torch.Tensor  # [B, T] bool: transitions that may be trained on


def _velocity(policy: FlowPolicy, x: torch.Tensor, sigma: float, cond: Conditioning,
              uncond: Conditioning | None, guidance_scale: float) -> torch.Tensor:
    return policy.predict_velocity(x, sigma, cond, uncond, guidance_scale).float()


@torch.no_grad()
def invert(policy: FlowPolicy, x0: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor, *,
           mode: InversionMode, step_type: StepType, noise_level: float, fixed_point_iters: int = 5,
           generators: Sequence[torch.Generator] | None = None, bridge_start: str = "noise",
           uncond: Conditioning | None = None, guidance_scale: float = 1.0) -> Inverted:
    """Invert latents ``x0`` ``[B, C, h, w]`` along ``sigmas`` (``[T+1]``, from 1 to 0)."""
    sigmas = sigmas.float().cpu()
    T = sigmas.numel() - 1
    x0 = x0.float()
    b = x0.shape[0]
    trainable = torch.ones(b, T, dtype=torch.bool)
    if mode in ("euler", "fixed_point"):
        states = [x0]
        x_next = x0
        for i in range(T - 1, -1, -1):  # from the data end up to sigma_0 = 1
            sig, sig_n = float(sigmas[i]), float(sigmas[i + 1])
            x = x_next + (sig - sig_n) * _velocity(policy, x_next, sig_n, cond, uncond, guidance_scale)
            if mode == "fixed_point":
                for _ in range(fixed_point_iters):
                    x = x_next - (sig_n - sig) * _velocity(policy, x, sig, cond, uncond, guidance_scale)
            states.append(x)
            x_next = x
        return Inverted(latents=torch.stack(states[::-1], dim=1), trainable=trainable)
    if mode != "bridge":
        raise ValueError(f"unknown inversion mode {mode!r}; expected euler, fixed_point or bridge")
    if generators is None:
        raise ValueError("bridge inversion needs one generator per image")
    if bridge_start == "noise":
        x = randn_per_sample(x0.shape[1:], generators, x0.device)
    elif bridge_start == "ode":
        x = invert(policy, x0, cond, sigmas, mode="fixed_point", step_type=step_type, noise_level=noise_level,
                   fixed_point_iters=fixed_point_iters, uncond=uncond, guidance_scale=guidance_scale).latents[:, 0]
    else:
        raise ValueError(f"unknown bridge start {bridge_start!r}; expected 'noise' or 'ode'")
    states = [x]
    sigma_max = float(sigmas[1])
    for i in range(T):
        sig, sig_n = float(sigmas[i]), float(sigmas[i + 1])
        if sig_n == 0.0:
            x = x0.clone()  # the bridge ends on the real latent; this transition is deterministic
            trainable[:, i] = False
        else:
            v_oracle = (x - x0) / sig
            noise = randn_per_sample(x0.shape[1:], generators, x0.device)
            x = stochastic_step(x, v_oracle, sig, sig_n, step_type, noise_level, sigma_max, noise=noise).prev_sample
        states.append(x)
    return Inverted(latents=torch.stack(states, dim=1), trainable=trainable)


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------
@dataclass
class TransitionStats:
    log_probs: torch.Tensor  # [B, T] log p_theta(x_{i+1} | x_i), mean over dims (0 where untrainable)
    residual_ms: torch.Tensor  # [B, T] mean square of (x_{i+1} - mu_theta) / std (nan where std == 0)


@torch.no_grad()
def transition_stats(policy: FlowPolicy, latents: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor, *,
                     step_type: StepType, noise_level: float, trainable: torch.Tensor | None = None,
                     uncond: Conditioning | None = None, guidance_scale: float = 1.0) -> TransitionStats:
    """Log-prob and standardised residual of every recorded transition under the policy's SDE step."""
    sigmas = sigmas.float().cpu()
    T = sigmas.numel() - 1
    sigma_max = float(sigmas[1])
    lps, res = [], []
    for i in range(T):
        x = latents[:, i]
        v = _velocity(policy, x, float(sigmas[i]), cond, uncond, guidance_scale)
        lp, ms = _transition_stat(latents, i, v, sigmas, step_type, noise_level, sigma_max)
        lps.append(lp)
        res.append(ms)
    return _stack_stats(lps, res, trainable)


def _transition_stat(latents, i, v, sigmas, step_type, noise_level, sigma_max):
    x, x_next = latents[:, i], latents[:, i + 1]
    out = stochastic_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), step_type, noise_level, sigma_max,
                          prev_sample=x_next)
    std = out.std.view(-1, *([1] * (x.ndim - 1)))
    z2 = ((x_next.float() - out.mean) / std.clamp_min(1e-12)) ** 2
    ms = z2.mean(dim=tuple(range(1, x.ndim)))
    return out.log_prob, torch.where(out.std > 0, ms, torch.full_like(ms, float("nan")))


def _stack_stats(lps, res, trainable) -> TransitionStats:
    lp, ms = torch.stack(lps, dim=1), torch.stack(res, dim=1)
    if trainable is not None:  # deterministic transitions (the bridge's landing on x0) are not the policy's
        keep = trainable.to(lp.device)
        lp = torch.where(keep, lp, torch.zeros_like(lp))
        ms = torch.where(keep, ms, torch.full_like(ms, float("nan")))
    return TransitionStats(log_probs=lp, residual_ms=ms)


@torch.no_grad()
def transition_stats_and_samples(policy: FlowPolicy, latents: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor,
                                 *, step_type: StepType, noise_level: float, trainable: torch.Tensor | None = None,
                                 uncond: Conditioning | None = None, guidance_scale: float = 1.0,
                                 sample_cond: Conditioning | None = None,
                                 sample_generators: Sequence[torch.Generator] = ()
                                 ) -> tuple[TransitionStats, torch.Tensor | None]:
    """:func:`transition_stats` of ``latents`` ``[n, T+1, ...]`` and, *in the same forward passes*, fresh
    stochastic rollouts of ``m = len(sample_generators)`` samples (conditioning ``sample_cond`` ``[m]``; start
    and step noise drawn from each sample's generator exactly as :func:`~portraitgen.sampling.rollout` draws
    them). Returns the stats and the samples' per-step log-probs ``[m, T]`` (None when ``m = 0``).

    One transformer call per step serves both: the invert stage's diagnostics compare each exemplar's
    trajectory with generated samples of its caption, and calling the model once per caption and step was
    what made them slow. ``uncond`` (with CFG) must have ``n + m`` rows.
    """
    m = len(sample_generators)
    if m == 0:
        return transition_stats(policy, latents, cond, sigmas, step_type=step_type, noise_level=noise_level,
                                trainable=trainable, uncond=uncond, guidance_scale=guidance_scale), None
    sigmas = sigmas.float().cpu()
    T = sigmas.numel() - 1
    sigma_max = float(sigmas[1])
    n, shape, device = latents.shape[0], tuple(latents.shape[2:]), latents.device
    x_gen = randn_per_sample(shape, sample_generators, device)
    noise = to_device_async(torch.stack([torch.stack([torch.randn(shape, generator=g, dtype=torch.float32)
                                                      for _ in range(T)]) for g in sample_generators]), device)
    both = cond_cat([cond, sample_cond])
    lps, res, gen_lps = [], [], []
    for i in range(T):
        sig, sig_n = float(sigmas[i]), float(sigmas[i + 1])
        v = _velocity(policy, torch.cat([latents[:, i].float(), x_gen]), sig, both, uncond, guidance_scale)
        lp, ms = _transition_stat(latents, i, v[:n], sigmas, step_type, noise_level, sigma_max)
        lps.append(lp)
        res.append(ms)
        out = stochastic_step(x_gen, v[n:], sig, sig_n, step_type, noise_level, sigma_max, noise=noise[:, i])
        x_gen = out.prev_sample
        gen_lps.append(out.log_prob)
    return _stack_stats(lps, res, trainable), torch.stack(gen_lps, dim=1)


@torch.no_grad()
def regenerate(policy: FlowPolicy, start: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor,
               uncond: Conditioning | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """The deterministic (ODE) sample from an inverted start."""
    T = sigmas.numel() - 1
    return rollout(policy, cond, start, sigmas, step_type="sde", noise_level=0.0, uncond=uncond,
                   guidance_scale=guidance_scale, stochastic=torch.zeros(T, dtype=torch.bool)).final


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, Gaussian window, mean over channels) for images in [0, 1]."""
    window = min(window, a.shape[-1], a.shape[-2])
    window -= 1 - window % 2  # odd
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(a.device)
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window)

    def blur(x):
        return torch.nn.functional.conv2d(x, kernel, groups=a.shape[1])

    a, b = a.float(), b.float()
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def trajectory_log_prob(log_probs: torch.Tensor) -> torch.Tensor:
    """Sum over transitions of the per-transition (dimension-averaged) log-probs."""
    return log_probs.sum(dim=1)


def finite_mean(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else math.nan


__all__ = ["InversionMode", "Inverted", "TransitionStats", "finite_mean", "invert", "ode_step", "psnr",
           "regenerate", "ssim", "trajectory_log_prob", "transition_stats", "transition_stats_and_samples"]

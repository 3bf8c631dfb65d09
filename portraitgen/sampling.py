"""Stochastic flow-matching sampling with per-step log-probabilities (docs/design.md §2).

GRPO treats every denoising transition ``x -> x'`` as an action of a Gaussian policy
``p(x' | x) = N(mu_theta(x, sigma), std^2)``. Two families of stochastic steps are supported:

- ``"sde"``: the reverse-time SDE with the flow's marginals (Flow-GRPO);
- ``"cps"``: the coefficient-preserving step (noise added so the x0/x1 coefficients keep unit norm).

All step math runs in float32 whatever the model's dtype: bf16 log-probs are too noisy near sigma -> 0.
Log-probs are averaged over latent dimensions, which keeps importance ratios close to 1.

Randomness is drawn from one ``torch.Generator`` *per sample*, so a sample's trajectory depends only on
its own seed - not on the batch it was sampled in, the micro-batch size or the number of processes.

No function here waits for the device: scalars become device tensors through ``torch.full`` (a fill
kernel, not a host-to-device copy), a rollout's step noise is drawn on the host once, up front, and
copied in one asynchronous transfer, and which steps are deterministic is decided on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from .policies.base import Conditioning, FlowPolicy

StepType = Literal["sde", "cps"]
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of ``key`` (independent streams for different keys).

    Every random draw of training, inversion, generation and the bench comes from one of these, keyed by
    what the draw is for (seed, iteration, sample index, purpose), never by where it runs."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] matching ``like``'s rank."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):  # a fill on the device, never a (synchronising) copy to it
        return torch.full((batch,), float(value), dtype=torch.float32, device=device)
    t = value.to(device=device, dtype=torch.float32)
    return t.expand(batch) if t.ndim == 0 else t


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x' (float32)
    log_prob: torch.Tensor  # [B] log p(x'|x), mean over latent dims (0 where std == 0)
    mean: torch.Tensor  # mu, the policy's mean of x'
    std: torch.Tensor  # [B] standard deviation of x' around mu (0 for a deterministic step)


def step_std(step_type: StepType, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float,
             sigma_max: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(s, std)`` per sample: the step's noise coefficient and the std of ``x'``.

    For "sde", ``s = a sqrt(sigma / (1 - sigma))``; at sigma = 1 the denominator uses ``sigma_max``
    (the schedule's second sigma) instead, as Flow-GRPO does, to stay finite. ``std = s sqrt(-dt)``.
    For "cps", ``s = sigma' sin(a pi / 2)`` and ``std = s``.
    """
    sigma, sigma_next = sigma.float(), sigma_next.float()
    if step_type == "sde":
        if isinstance(sigma_max, torch.Tensor):
            sigma_max = sigma_max.to(device=sigma.device, dtype=torch.float32)
        else:
            sigma_max = torch.full_like(sigma, float(sigma_max))
        denom = 1 - torch.where(sigma >= 1.0, sigma_max, sigma)
        s = noise_level * torch.sqrt(sigma / denom)
        return s, s * torch.sqrt(sigma - sigma_next)
    if step_type == "cps":
        s = sigma_next * math.sin(noise_level * math.pi / 2)
        return s, s
    raise ValueError(f"unknown step type {step_type!r}; expected 'sde' or 'cps'")


def step_mean(step_type: StepType, x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
              sigma_next: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The policy's mean of ``x'`` given ``x`` and its velocity ``v`` (float32)."""
    x, v = x.float(), v.float()
    sig, sig_n, s = _bcast(sigma.float(), x), _bcast(sigma_next.float(), x), _bcast(s.float(), x)
    if step_type == "sde":
        dt = sig_n - sig
        return x * (1 + s**2 * dt / (2 * sig)) + v * (1 + s**2 * (1 - sig) / (2 * sig)) * dt
    if step_type == "cps":
        x0_hat = x - sig * v
        x1_hat = x + (1 - sig) * v
        return (1 - sig_n) * x0_hat + torch.sqrt((sig_n**2 - s**2).clamp_min(0)) * x1_hat
    raise ValueError(f"unknown step type {step_type!r}; expected 'sde' or 'cps'")


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of an isotropic Gaussian, averaged over all non-batch dims; 0 where std == 0."""
    std_b = _bcast(std.float(), sample)
    safe = torch.where(std_b > 0, std_b, torch.ones_like(std_b))
    lp = -((sample.float() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _HALF_LOG_2PI
    lp = lp.mean(dim=tuple(range(1, sample.ndim)))
    return torch.where(std > 0, lp, torch.zeros_like(lp))


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait (pinned memory, non-blocking)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def randn_per_sample(shape: Sequence[int], generators: Sequence[torch.Generator],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """One standard-normal draw of ``shape`` per generator (drawn on CPU, so results match on any device)."""
    return to_device_async(torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32)
                                        for g in generators]), device)


def stochastic_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float,
                    step_type: StepType, noise_level: float, sigma_max: float | torch.Tensor, *,
                    noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None) -> StepOutput:
    """One stochastic transition. Pass ``prev_sample`` to score a given ``x'`` (training), else ``noise``
    (standard normal, shaped like ``x``) to draw one."""
    b = x.shape[0]
    sigma, sigma_next = _per_sample(sigma, b, x.device), _per_sample(sigma_next, b, x.device)
    s, std = step_std(step_type, sigma, sigma_next, noise_level, sigma_max)
    mean = step_mean(step_type, x, v, sigma, sigma_next, s)
    if prev_sample is None:
        if noise is None:
            raise ValueError("stochastic_step needs either `noise` (to sample) or `prev_sample` (to score)")
        prev_sample = mean + _bcast(std, mean) * noise.float()
    return StepOutput(prev_sample=prev_sample.float(), log_prob=gaussian_log_prob(prev_sample, mean, std),
                      mean=mean, std=std)


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float,
             sigma_next: torch.Tensor | float) -> torch.Tensor:
    """The deterministic Euler step ``x' = x + (sigma' - sigma) v`` in float32."""
    b = x.shape[0]
    sigma, sigma_next = _per_sample(sigma, b, x.device), _per_sample(sigma_next, b, x.device)
    return x.float() + _bcast(sigma_next - sigma, x) * v.float()


@dataclass
class Trajectory:
    """A batch of rollouts on one schedule. Index ``i`` of ``latents`` is the state at ``sigmas[i]``."""

    latents: torch.Tensor  # [B, T+1, C, h, w]: latents[:, 0] is the start noise, latents[:, T] the sample
    log_probs: torch.Tensor  # [B, T]: log p(x_{i+1} | x_i) under the rollout policy (0 on ODE steps)
    stochastic: torch.Tensor  # [T] bool: which transitions were stochastic (and so can be trained)
    sigmas: torch.Tensor  # [T+1]
    means: torch.Tensor | None = None  # [B, T, C, h, w] when recorded (diagnostics)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def rollout(policy: FlowPolicy, cond: Conditioning, start: torch.Tensor, sigmas: torch.Tensor, *,
            step_type: StepType, noise_level: float, generators: Sequence[torch.Generator] | None = None,
            uncond: Conditioning | None = None, guidance_scale: float = 1.0,
            stochastic: torch.Tensor | None = None, record_means: bool = False) -> Trajectory:
    """Sample from ``start`` along ``sigmas``, recording every state and every transition's log-prob.

    ``stochastic`` ([T] bool, default all) selects the SDE steps; the others are ODE steps. A step whose
    std is 0 (the last "cps" step, where sigma' = 0) is deterministic whatever the mask says.
    ``generators`` (one per sample) draw the step noise; they are needed when any step is stochastic.
    """
    num_steps = sigmas.numel() - 1
    device = start.device
    stochastic = torch.ones(num_steps, dtype=torch.bool) if stochastic is None else stochastic.cpu().bool()
    if stochastic.numel() != num_steps:
        raise ValueError(f"stochastic mask has {stochastic.numel()} entries for {num_steps} steps")
    sigmas = sigmas.float().cpu()
    sigma_max = float(sigmas[1])
    # Which steps are deterministic (std 0: e.g. the last "cps" step) is known from the schedule alone.
    effective = stochastic.clone()
    for i in torch.nonzero(stochastic).flatten().tolist():
        _, std = step_std(step_type, sigmas[i:i + 1], sigmas[i + 1:i + 2], noise_level, sigma_max)
        effective[i] = bool(std[0] > 0)
    noise_all = None
    if stochastic.any():
        if generators is None:
            raise ValueError("rollout with stochastic steps needs one generator per sample")
        # All step noise up front, per sample in step order: exactly the draws of one call per step.
        k, shape = int(stochastic.sum()), tuple(start.shape[1:])
        noise_all = to_device_async(torch.stack([
            torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for _ in range(k)])
            for g in generators]), device)
    x = start.float()
    states, log_probs, means = [x], [], []
    j = 0
    for i in range(num_steps):
        sig, sig_n = float(sigmas[i]), float(sigmas[i + 1])
        v = policy.predict_velocity(x, sig, cond, uncond, guidance_scale)
        if stochastic[i]:
            out = stochastic_step(x, v, sig, sig_n, step_type, noise_level, sigma_max, noise=noise_all[:, j])
            j += 1
            x, lp, mean = out.prev_sample, out.log_prob, out.mean
        else:
            x = ode_step(x, v, sig, sig_n)
            lp, mean = torch.zeros(x.shape[0], device=device), x
        states.append(x)
        log_probs.append(lp)
        if record_means:
            means.append(mean)
    return Trajectory(latents=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1),
                      stochastic=effective, sigmas=sigmas,
                      means=torch.stack(means, dim=1) if record_means else None)

"""What training logs: per-iteration statistics of the rewards, advantages and loss, phase times, the
per-sample rows of ``samples.jsonl``, and the run's final summary (``metrics.json``).

The loss statistics are accumulated as device tensors (:class:`DeviceStats`) and read once per train
phase, so logging never makes the host wait for the device inside the step loops.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .advantages import Advantages


class DeviceStats:
    """Training statistics accumulated as device tensors and read once, at the end of the train phase
    (a ``float()`` per step would make the host wait for the device at every step).

    ``means()`` gives exactly what averaging the per-step Python floats gave: the per-step values are
    float32 scalars, averaged on the host in float64.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = {}
        self._scale: dict[str, float] = {}
        self._notes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, key: str, value: torch.Tensor | float, scale: float = 1.0) -> None:
        value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        self._values.setdefault(key, []).append(value.float().reshape(()))
        self._scale[key] = scale

    @staticmethod
    def _host(values: list[torch.Tensor]) -> np.ndarray:
        if len({v.device for v in values}) > 1:
            values = [v.cpu() for v in values]
        return torch.stack(values).cpu().numpy()  # one copy from the device per statistic

    def note(self, key: str, values: torch.Tensor, weights: torch.Tensor) -> None:
        """A weighted mean over the samples of one step; steps whose weights sum to 0 are left out."""
        values, weights = values.detach(), weights.detach()
        self._notes.setdefault(key, []).append(((values * weights).sum() / weights.sum(), weights.sum()))

    def means(self) -> dict[str, float]:
        out = {}
        for key, vals in self._values.items():
            out[key] = float(np.mean([float(v) * self._scale[key] for v in self._host(vals)]))
        for key, pairs in self._notes.items():
            ratios = self._host([r.float() for r, _ in pairs])
            weights = self._host([w.float() for _, w in pairs])
            kept = [float(r) for r, w in zip(ratios, weights) if float(w) > 0]
            if kept:
                out[key] = float(np.mean(kept))
        return out

    def train_phase_stats(self, lr: float) -> dict[str, float]:
        """The train phase's metrics: ``train/<key>`` for the loss statistics, ``<kind>/<key>`` as noted."""
        means = self.means()  # the phase's one wait for the device
        out = {f"train/{k}": v for k, v in means.items() if "/" not in k}
        out.update({k: v for k, v in means.items() if "/" in k})
        out["train/lr"] = lr
        return out


def velocity_grad_logger(note: Callable[[str, torch.Tensor, torch.Tensor], None], is_exemplar: torch.Tensor,
                         weights: torch.Tensor):
    """A backward hook on the predicted velocity: the gradient norm reaching each sample, logged for
    exemplars and generated samples separately (their share of the learning signal)."""

    def hook(grad: torch.Tensor) -> None:
        norms = grad.detach().flatten(1).norm(dim=1)
        note("exemplar/velocity_grad_norm", norms, weights * is_exemplar)
        note("generated/velocity_grad_norm", norms, weights * ~is_exemplar)

    return hook


def advantage_stats(rewards: np.ndarray, adv: Advantages, masked: np.ndarray, components: dict[str, np.ndarray],
                    is_exemplar: np.ndarray | None, exemplars_per_group: int | None) -> dict[str, float]:
    """The iteration's reward and advantage figures over all processes' samples. ``is_exemplar`` is None
    for a run without exemplars (no exemplar/generated split is logged)."""
    valid = ~masked
    scored = rewards[valid] if valid.any() else rewards  # masked rewards are fill values
    stats = {"reward/mean": float(scored.mean()), "reward/std": float(scored.std()),
             "reward/masked": float(masked.mean()),
             "advantage/abs_mean": float(np.abs(adv.advantages).mean()),
             "advantage/clipped_fraction": adv.clipped_fraction, "zero_std_fraction": adv.zero_std_fraction,
             "group/std_mean": float(np.unique(adv.group_std).mean())}
    if is_exemplar is not None:
        stats["exemplar/count"] = float(is_exemplar.sum())
        stats["exemplar/per_group"] = float(exemplars_per_group)
        for kind, sel in (("exemplar", is_exemplar), ("generated", ~is_exemplar)):
            if sel.any():
                stats[f"{kind}/reward_mean"] = float(rewards[sel].mean())
                stats[f"{kind}/advantage_mean"] = float(adv.advantages[sel].mean())
                stats[f"{kind}/advantage_abs_mean"] = float(np.abs(adv.advantages[sel]).mean())
    for name, values in components.items():
        stats[f"reward/{name}"] = float(values.mean())
    return stats


def sample_rows(groups: np.ndarray, prompts: Sequence[str], rewards: np.ndarray, components: dict[str, np.ndarray],
                adv: Advantages, masked: np.ndarray, exemplar_ids: Sequence[str | None]) -> list[dict[str, Any]]:
    """One ``samples.jsonl`` row per sample: what was sampled, how it scored and what advantage it got."""
    return [{"sample_index": i, "group": int(groups[i]), "prompt": prompts[i], "reward": float(rewards[i]),
             **{f"reward_{k}": float(v[i]) for k, v in components.items()},
             "advantage": float(adv.advantages[i]), "trained": bool(adv.mask[i]), "masked": bool(masked[i]),
             "exemplar": exemplar_ids[i]}
            for i in range(len(rewards))]


def phase_times(times: dict[str, float]) -> dict[str, float]:
    """``time/<phase>`` of the phases before logging, their sum ``time/iteration``, and the coarse
    ``time/sample`` (data + rollout + exemplar log-probs), ``time/score`` and ``time/train``."""
    out = {f"time/{k}": v for k, v in times.items() if k != "iteration"}
    out["time/sample"] = sum(times.get(k, 0.0) for k in ("data", "rollout", "exemplar_logp"))
    out["time/score"] = times.get("reward", 0.0)
    out["time/train"] = times.get("train_fwd_bwd", 0.0) + times.get("optimizer", 0.0)
    out["time/iteration"] = sum(v for k, v in times.items() if k != "iteration")
    return out


def summarize(history: list[dict[str, float]]) -> dict[str, Any]:
    """Final figures: reward at the start and end (mean of the first / last up-to-5 iterations)."""
    if not history:
        return {"iterations": 0}
    rewards = np.array([h["reward/mean"] for h in history])
    w = min(5, len(rewards))
    out = {"iterations": len(history), "reward_first": float(rewards[:w].mean()),
           "reward_last": float(rewards[-w:].mean()), "reward_gain": float(rewards[-w:].mean() - rewards[:w].mean()),
           "seconds_per_iteration": float(np.median([h["time/iteration"] for h in history]))}
    for key in ("train/kl", "train/approx_kl", "train/clip_fraction", "zero_std_fraction"):
        vals = [h[key] for h in history if key in h]
        if vals:
            out[key.replace("train/", "")] = float(vals[-1])
    return out

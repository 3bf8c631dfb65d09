"""Reward registry: every reward is a factory registered by name with one signature.

A reward maps a batch of images to one score per image::

    reward(images: Tensor[B, 3, H, W] in [0, 1], prompts: list[str], meta: list[dict]) -> np.ndarray[B]

A factory takes its options as keyword arguments (``reward.options.<name>`` in params). A reward may
also expose ``parts(images, prompts, meta) -> {"score": ..., <sub-score>: ...}``: its sub-scores
(e.g. AI-Portrait's "oily", "plastic") are then logged next to it as ``<name>/<sub-score>``.

:class:`RewardSet` combines the configured components (``reward.components`` in params: name -> weight)
into the dict that training, precompute and PortraitBench all use: one array per component (raw, as the
reward returned it), its sub-scores, and ``"total"``, the weighted sum of the (optionally normalised)
components that the trainer optimises.

Invalid scores (NaN/inf, or an image a reward could not score) never pass silently. With
``on_invalid="error"`` (the default) they raise :class:`RewardError` naming the reward and the images;
with ``"mask"`` the invalid entries are replaced by the mean of that component's valid scores in the
batch (so they carry no signal), counted in :attr:`RewardSet.invalid_counts`, logged as a warning, and
flagged per image in the extra output ``"masked"`` (1.0 where any component was masked) — which the
trainer logs as ``reward/masked``, the fraction of masked images. The trainer gives a masked image
advantage 0 and leaves it out of its group's statistics (:func:`portraitgen.advantages.group_advantages`).

An image with a non-finite pixel (NaN/inf: a diverged model) is invalid for every reward. It is checked
here, once, before any reward sees the batch: such images are never passed to a reward (which might
score a NaN image as black); they are an error, or masked in every component.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


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


# Where components scored outside this process come from (portraitgen/rewards/remote.py registers the
# reward server's): each maps (component names, options) to the rewards it serves. Registered, not imported
# here, so the registry stays below the modules that use it.
_REMOTE: list[Callable[[Sequence[str], Mapping[str, Any]], Mapping[str, "Reward"]]] = []


def register_remote(resolver: Callable[[Sequence[str], Mapping[str, Any]], Mapping[str, "Reward"]]):
    _REMOTE.append(resolver)
    return resolver


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def reward_factory(name: str) -> Callable[..., Reward] | None:
    """The registered factory of ``name`` (its signature lists the reward's options), or None."""
    return _REGISTRY.get(name)


def build_reward(name: str, **kwargs) -> Reward:
    if name not in _REGISTRY:
        raise RewardError(f"unknown reward {name!r} (reward.components in params); available: "
                          f"{', '.join(available_rewards())}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as exc:  # an unknown or missing option: name the params key
        raise RewardError(f"reward.options.{name}: {exc}") from None


class PartsReward:
    """Base for rewards with sub-scores: implement :meth:`parts`; calling returns ``parts(...)["score"]``.

    Per-image failures should be NaN in ``"score"`` (and a reason in ``self.last_errors[i]``), so that
    :class:`RewardSet` applies the configured invalid-score policy with a clear message.
    """

    last_errors: dict[int, str]

    def parts(self, images: torch.Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> np.ndarray:
        return self.parts(images, prompts, meta)["score"]


@dataclass(frozen=True)
class Normalization:
    """Per-component affine normalisation applied before weighting: ``(x - mean) / std``, then
    clipped to ``±clip`` (0 = no clip). Set ``mean``/``std`` from a reference run (e.g. the
    exemplars' or the base model's scores) so that weights compare like with like."""

    mean: float = 0.0
    std: float = 1.0
    clip: float = 0.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        return np.clip(z, -self.clip, self.clip) if self.clip > 0 else z


def _as_normalization(name: str, spec: Any) -> Normalization:
    if isinstance(spec, Normalization):
        norm = spec
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"mean", "std", "clip"})
        if unknown:
            raise RewardError(f"reward.normalize.{name}: unknown key {unknown[0]!r} (known: mean, std, clip)")
        norm = Normalization(**{k: float(v) for k, v in spec.items()})
    elif hasattr(spec, "mean") and hasattr(spec, "std"):  # config.RewardNormalizeConfig
        norm = Normalization(float(spec.mean), float(spec.std), float(getattr(spec, "clip", 0.0)))
    else:
        raise RewardError(f"reward.normalize.{name}: expected a mapping with mean/std/clip, got {spec!r}")
    if not norm.std > 0:
        raise RewardError(f"reward.normalize.{name}.std: expected > 0, got {norm.std}")
    return norm


class RewardSet:
    """The configured reward components, their weights, options, normalisation and invalid-score policy.

    ``RewardSet({"brightness": 1.0})`` is the plain form; :meth:`from_config` takes ``params.reward``.
    """

    def __init__(self, weights: Mapping[str, float], *, options: Mapping[str, Mapping[str, Any]] | None = None,
                 normalize: Mapping[str, Any] | None = None,
                 on_invalid: Literal["error", "mask"] = "error"):
        if not weights:
            raise RewardError("reward.components is empty: configure at least one reward")
        options = dict(options or {})
        normalize = dict(normalize or {})
        for key, table in (("options", options), ("normalize", normalize)):
            stray = sorted(set(table) - set(weights))
            if stray:
                raise RewardError(f"reward.{key}.{stray[0]}: {stray[0]!r} is not in reward.components "
                                  f"({', '.join(weights)})")
        if on_invalid not in ("error", "mask"):
            raise RewardError(f"reward.on_invalid: expected 'error' or 'mask', got {on_invalid!r}")
        self.weights = dict(weights)
        self.on_invalid = on_invalid
        self.normalize = {name: _as_normalization(name, spec) for name, spec in normalize.items()}
        remote: dict[str, Reward] = {}  # a component whose options name a `server` is scored by it
        for resolve in _REMOTE:
            remote.update(resolve(list(self.weights), options))
        self.rewards = {name: remote[name] if name in remote else build_reward(name, **dict(options.get(name) or {}))
                        for name in self.weights}
        self.invalid_counts: dict[str, int] = {name: 0 for name in self.weights}  # cumulative, per component

    @classmethod
    def from_config(cls, cfg) -> "RewardSet":
        """From ``params.reward`` (:class:`portraitgen.config.RewardConfig`)."""
        return cls(cfg.components, options=getattr(cfg, "options", None), normalize=getattr(cfg, "normalize", None),
                   on_invalid=getattr(cfg, "on_invalid", "error"))

    def _score_one(self, name: str, fn: Reward, images, prompts, meta) -> dict[str, np.ndarray]:
        n = images.shape[0]
        if callable(getattr(fn, "parts", None)):
            raw = fn.parts(images, prompts, meta)
        else:
            raw = {"score": fn(images, prompts, meta)}
        out = {}
        for key, values in raw.items():
            arr = np.asarray(values, dtype=np.float64).reshape(-1)
            if arr.shape[0] != n:
                raise RewardError(f"reward {name!r} returned {arr.shape[0]} {key} values for {n} images")
            out[key] = arr
        return out

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 meta: Sequence[dict] | None = None) -> dict[str, np.ndarray]:
        meta = list(meta) if meta is not None else [{} for _ in prompts]
        if images.ndim != 4 or images.shape[1] != 3:
            raise RewardError(f"rewards take images [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
        if not (len(prompts) == len(meta) == images.shape[0]):
            raise RewardError(f"{images.shape[0]} images, {len(prompts)} prompts and {len(meta)} meta entries")
        n = images.shape[0]
        out: dict[str, np.ndarray] = {}
        total = np.zeros(n, dtype=np.float64)
        masked = np.zeros(n, dtype=bool)
        finite = torch.isfinite(images.detach()).flatten(1).all(dim=1).cpu().numpy()
        if not finite.all():
            idx = np.flatnonzero(~finite).tolist()
            if self.on_invalid == "error":
                raise RewardError(f"images {idx[:10]} have non-finite pixels (NaN/inf): no reward can score them "
                                  f"(set reward.on_invalid: mask to mask them instead)")
            log.warning("%d of %d images have non-finite pixels (images %s): masked in every reward",
                        len(idx), n, idx[:10])
        keep = np.flatnonzero(finite)
        for name, fn in self.rewards.items():
            if len(keep) == n:
                parts = self._score_one(name, fn, images, prompts, meta)
            else:  # rewards see the finite images only; the others are NaN, masked below
                sub = (self._score_one(name, fn, images[torch.as_tensor(keep)], [prompts[i] for i in keep],
                                       [meta[i] for i in keep]) if len(keep) else {"score": np.zeros(0)})
                parts = {}
                for key, values in sub.items():
                    parts[key] = np.full(n, np.nan)
                    parts[key][keep] = values
            scores = parts.pop("score")
            bad = ~np.isfinite(scores)
            if bad.any():
                idx = np.flatnonzero(bad).tolist()
                reasons = dict(getattr(fn, "last_errors", None) or {})
                if len(keep) < n:  # the reward numbered the finite images only
                    reasons = {int(keep[i]): r for i, r in reasons.items() if i < len(keep)}
                    reasons.update({int(i): "non-finite pixels" for i in np.flatnonzero(~finite)})
                why = "; ".join(f"image {i}: {reasons[i]}" for i in idx[:3] if i in reasons)
                if self.on_invalid == "error":
                    raise RewardError(f"reward {name!r} produced non-finite scores for images {idx[:10]}"
                                      + (f" ({why})" if why else "")
                                      + " (set reward.on_invalid: mask to mask them instead)")
                fill = float(scores[~bad].mean()) if (~bad).any() else 0.0
                scores = np.where(bad, fill, scores)
                masked |= bad
                self.invalid_counts[name] += len(idx)
                log.warning("reward %r: masked %d of %d invalid scores (images %s)%s; %d masked so far", name,
                            len(idx), n, idx[:10], f" ({why})" if why else "", self.invalid_counts[name])
            out[name] = scores.astype(np.float32)
            for key, values in parts.items():
                # Sub-scores are for logging only; an undefined one (e.g. no face) is reported as 0.
                out[f"{name}/{key}"] = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
            norm = self.normalize.get(name)
            total += self.weights[name] * (norm(scores) if norm is not None else scores)
        if self.on_invalid == "mask":
            out["masked"] = masked.astype(np.float32)
        out["total"] = total.astype(np.float32)
        return out

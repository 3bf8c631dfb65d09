"""Turning raw image features into scores in [0, 1] calibrated on real photographs.

Each feature has a direction: ``higher_worse`` (e.g. the oily-highlight fraction), ``lower_worse``
(e.g. skin texture energy: too little is "plastic") or ``two_sided`` (e.g. mean luma). From the real
reference set we take the 5 %, 50 % and 95 % quantiles ``q05, q50, q95`` and a softness
``width = max((q95 - q05) / 4, min_width)``. On the bad side the score is a logistic in units of the
width whose midpoint lies two widths *beyond* the real range::

    higher_worse:  s(x) = sigmoid((q95 + 2·width - x) / width)

so a value inside the real 90 % range scores >= sigmoid(2) = 0.88 (the median ~0.98), a value one
reference range (4 widths) above q95 scores sigmoid(-2) = 0.12, and ``s`` is strictly monotone — a
worse image always scores lower, never tied at 1. ``two_sided`` is the product of both tails.

Scores of several features are combined by a weighted power mean with a negative exponent
(``power``, default -8): a soft minimum, so the combined score is about as high as its weakest
feature — a face is as real-looking as its most artificial aspect, and good texture cannot buy back
oily highlights. ``power = 0`` is the geometric mean; the result always stays in [0, 1].
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping

import numpy as np

from .registry import RewardError

Direction = Literal["higher_worse", "lower_worse", "two_sided"]


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class FeatureCalibration:
    direction: Direction
    q05: float
    q50: float
    q95: float
    width: float

    @classmethod
    def fit(cls, values: Iterable[float], direction: Direction, min_width: float) -> "FeatureCalibration":
        v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
        if v.size < 2:
            raise RewardError(f"calibration needs at least 2 finite reference values, got {v.size}")
        q05, q50, q95 = np.quantile(v, [0.05, 0.5, 0.95])
        return cls(direction, float(q05), float(q50), float(q95), float(max((q95 - q05) / 4.0, min_width)))

    def score(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        w = self.width
        high = _sigmoid((self.q95 + 2 * w - x) / w)  # penalises large values
        low = _sigmoid((x - (self.q05 - 2 * w)) / w)  # penalises small values
        if self.direction == "higher_worse":
            return high
        if self.direction == "lower_worse":
            return low
        return high * low


@dataclass(frozen=True)
class FeatureSpec:
    direction: Direction
    min_width: float  # the feature's natural resolution: the softness never drops below it
    weight: float = 1.0  # weight in the geometric mean


class Calibration:
    """Per-feature calibrations plus the weights that combine them; saved/loaded as JSON."""

    def __init__(self, features: Mapping[str, FeatureCalibration], weights: Mapping[str, float],
                 source: str = "", n_reference: int = 0, power: float = -8.0):
        self.features = dict(features)
        self.weights = {k: float(weights.get(k, 1.0)) for k in self.features}
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise RewardError(f"feature weights must be >= 0 with a positive sum, got {self.weights}")
        self.source = source
        self.n_reference = n_reference
        self.power = float(power)

    @classmethod
    def fit(cls, rows: list[Mapping[str, float]], specs: Mapping[str, FeatureSpec], source: str = "") -> "Calibration":
        """From one feature dict per reference image (rows with missing features are skipped per feature)."""
        feats = {}
        for name, spec in specs.items():
            values = [r[name] for r in rows if r is not None and name in r]
            try:
                feats[name] = FeatureCalibration.fit(values, spec.direction, spec.min_width)
            except RewardError as exc:
                raise RewardError(f"calibrating feature {name!r} on {source or 'the reference set'}: {exc}") from None
        return cls(feats, {n: s.weight for n, s in specs.items()}, source, sum(r is not None for r in rows))

    def scores(self, row: Mapping[str, float]) -> dict[str, float]:
        """Per-feature scores in [0, 1] and their weighted power mean as ``"score"``."""
        out = {name: float(cal.score(row[name])) for name, cal in self.features.items()}
        w = np.array([self.weights[n] for n in self.features]) / sum(self.weights.values())
        s = np.clip(np.array([out[n] for n in self.features]), 1e-12, 1.0)
        if self.power == 0:
            out["score"] = float(np.exp((w * np.log(s)).sum()))
        else:
            out["score"] = float((w * s ** self.power).sum() ** (1.0 / self.power))
        return out

    def with_combination(self, weights: Mapping[str, float] | None = None, power: float | None = None) -> "Calibration":
        """A copy with some feature weights and/or the power of the mean replaced."""
        unknown = sorted(set(weights or {}) - set(self.features))
        if unknown:
            raise RewardError(f"feature weight for unknown feature {unknown[0]!r}; features: {', '.join(self.features)}")
        return Calibration(self.features, {**self.weights, **(weights or {})}, self.source, self.n_reference,
                           self.power if power is None else power)

    def to_dict(self) -> dict:
        return {"source": self.source, "n_reference": self.n_reference, "weights": self.weights, "power": self.power,
                "features": {k: asdict(v) for k, v in self.features.items()}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path, expected: Iterable[str] = ()) -> "Calibration":
        try:
            d = json.loads(Path(path).read_text())
            feats = {k: FeatureCalibration(**v) for k, v in d["features"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RewardError(f"cannot read calibration {path}: {exc}") from None
        missing = sorted(set(expected) - set(feats))
        if missing:
            raise RewardError(f"calibration {path} lacks feature {missing[0]!r}")
        return cls(feats, d.get("weights", {}), d.get("source", str(path)), d.get("n_reference", 0), d.get("power", -8.0))

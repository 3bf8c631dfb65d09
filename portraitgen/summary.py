"""A stage's headline numbers, ``<out>/summary.json``: what DVC tracks as the stage's metrics.

``metrics.json`` holds everything a stage measured (dozens to hundreds of keys: counts, timings, every
bench metric of every model); ``dvc exp show`` and ``dvc metrics diff`` on it are walls of columns. The
summary keeps a handful per stage, rounded to four significant digits, so that
``dvc exp show --only-changed`` of a params change fits an 80-column terminal:

    pretrain    face_rate, artifact_rate (of the base model's samples)
    curate      kept, rejected
    invert      exemplars, psnr, z (traj_logprob_z_mean)
    precompute  prompts, exemplars, detector_auc (when a detector is trained)
    train       reward (mean of the last iterations), gain (over the run)
    bench       per compared model (its label): the difference to the baseline in the main metric, the
                first bench reward component (results/bench/report.html has the rest, with intervals)

Short names on purpose: after `dvc exp run -S train.lr=...` the changed columns are train.lr, reward,
gain and the bench labels, which with the experiment's name and date fit 80 columns.

It is written by ``portraitgen <stage>`` after the stage's own outputs (never by a part job, and not by
``precompute --bench-only``, which writes no metrics), from its ``metrics.json``. The file is small and
tracked by git (.gitignore lets ``results/*/summary.json`` through), so a commit or a DVC experiment
carries its numbers and ``dvc metrics diff`` / ``dvc exp show`` work on a fresh clone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from .io import atomic_write_text

SUMMARY = "summary.json"
STAGES = ("pretrain", "curate", "invert", "precompute", "train", "bench")

# stage -> (summary key, metrics.json key)
PICKS: dict[str, tuple[tuple[str, str], ...]] = {
    "pretrain": (("face_rate", "face_rate_samples"), ("artifact_rate", "artifact_rate_samples")),
    "curate": (("kept", "kept"), ("rejected", "rejected")),
    "invert": (("exemplars", "exemplars"), ("psnr", "psnr_mean"), ("z", "traj_logprob_z_mean")),
    "precompute": (("prompts", "prompts"), ("exemplars", "exemplars"), ("detector_auc", "detector_val_auc")),
    "train": (("reward", "reward_last"), ("gain", "reward_gain")),
}


def _round(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return value
    if not math.isfinite(value):
        return None
    return float(f"{value:.4g}")


def headline(stage: str, metrics: Mapping[str, Any], bench_components: tuple[str, ...] = ()) -> dict[str, Any]:
    """The summary of ``stage`` from its ``metrics.json`` content (absent or non-finite values left out)."""
    if stage == "bench":
        main = bench_components[0] if bench_components else None
        out: dict[str, Any] = {}
        for pair, diffs in (metrics.get("comparisons") or {}).items():
            value = _round(diffs.get(main)) if main else None
            if value is not None:
                out[pair.split("_vs_")[0]] = value
        return out
    picked = {key: _round(metrics.get(source)) for key, source in PICKS.get(stage, ())}
    return {k: v for k, v in picked.items() if v is not None}


def write_summary(stage: str, out_dir: str | Path, bench_components: tuple[str, ...] = ()) -> Path | None:
    """``<out_dir>/summary.json`` from ``<out_dir>/metrics.json``; None when the stage has no summary or
    wrote no metrics."""
    out_dir = Path(out_dir)
    metrics_file = out_dir / "metrics.json"
    if stage not in STAGES or not metrics_file.is_file():
        return None
    data = headline(stage, json.loads(metrics_file.read_text()), bench_components)
    return atomic_write_text(out_dir / SUMMARY, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_for_command(args) -> Path | None:
    """After a successful ``portraitgen <verb>``: the stage's summary, unless this run wrote no metrics
    (a part job, ``precompute --bench-only``)."""
    stage = getattr(args, "command", "")
    if stage not in STAGES or getattr(args, "bench_only", False):
        return None
    if getattr(args, "part", None) is not None and getattr(args, "num_parts", 1) > 1:
        return None
    components: tuple[str, ...] = ()
    if stage == "bench":
        from .config import load_params

        components = tuple(load_params(args.params).bench.reward.components)
    return write_summary(stage, args.out, components)

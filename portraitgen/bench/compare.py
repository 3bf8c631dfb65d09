"""PortraitBench's aggregation and comparisons: per-category means, paired differences with cluster
bootstrap intervals, and verdicts.

**Pairing.** Every model draws the image of ``(prompt_id, seed)`` from the same start noise, so a model's
image and the baseline's image of the same key differ only by the model; the comparison is over these
pairs (keys present in both, with finite values in both).

**Resampling unit: the prompt.** The seeds of a prompt share its text and are correlated, so images are
not independent draws; the bootstrap resamples whole prompts with replacement (a cluster bootstrap) and
recomputes the mean paired difference as ``sum of differences / number of pairs`` over the resampled
prompts. The interval is the percentile interval at ``bench.confidence``. Resampling is seeded by
``bench.bootstrap_seed`` (and depends on nothing else), so intervals are identical from run to run.

Paired differences smaller than 1e-9 relative to the values are float rounding and count as 0.

**Verdicts.** ``better``/``worse`` (by the metric's direction) only when the interval excludes 0;
``differs`` for a metric without a direction; otherwise empty. With dozens of metrics at 95 % a few
chance verdicts are expected between models that differ little: read verdicts together with their
effect sizes and the per-category table, and raise ``bench.confidence`` or the number of prompts for
a stricter bench. Two identical models give exactly zero differences and never a verdict.

**Set metrics** (the feature distance to the real set) are bootstrapped the same way, resampling the
model's prompts and, independently, the real images (:func:`portraitgen.bench.metrics.weighted_mmd2`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .metrics import poly_kernel, weighted_mmd2

ID_COLUMNS = ("model", "prompt_id", "prompt", "categories", "seed", "image")
ROUNDING = 1e-9  # relative size of a paired difference that counts as float rounding, i.e. as 0
COMPARISON_COLUMNS = ("model", "baseline", "metric", "mean_model", "mean_baseline", "diff", "lo", "hi", "n_pairs",
                      "verdict")


def cluster_counts(n_clusters: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n_clusters]``: how often each cluster is drawn in each resample (n_clusters draws each)."""
    idx = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    flat = (idx + n_clusters * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_clusters).reshape(n_boot, n_clusters).astype(np.float64)


def percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def cluster_mean_interval(sums: np.ndarray, counts: np.ndarray, *, n_boot: int, confidence: float,
                          seed: int) -> tuple[float, float]:
    """Percentile interval of ``sum(sums) / sum(counts)`` under resampling of the clusters (prompts)."""
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if len(sums) < 2:
        return math.nan, math.nan
    c = cluster_counts(len(sums), n_boot, np.random.default_rng(seed))
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (c @ sums) / (c @ counts)
    return percentile_interval(boot, confidence)


def verdict(lo: float, hi: float, higher_is_better: bool | None) -> str:
    """``better``/``worse`` when [lo, hi] excludes 0 (``differs`` without a direction), else ``""``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0.0 <= hi:
        return ""
    if higher_is_better is None:
        return "differs"
    return "better" if (lo > 0) == bool(higher_is_better) else "worse"


# ---------------------------------------------------------------------------------------------- categories
def categories_of(scores: pd.DataFrame) -> list[str]:
    """``all``, then every tag in the order of first appearance."""
    tags: dict[str, None] = {}
    for cats in scores["categories"].astype(str):
        for t in cats.split(","):
            if t:
                tags.setdefault(t, None)
    return ["all", *tags]


def per_category(scores: pd.DataFrame, info: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """model, category, metric, mean, std (ddof=1; NaN for n < 2), n (finite values) of every image and
    prompt metric. A prompt metric counts once per prompt; a group photo counts in each of its tags; a
    (model, category, metric) without any finite value has no row."""
    metrics = [m for m, i in info.items() if i["kind"] in ("image", "prompt") and m in scores.columns]
    cats = categories_of(scores)
    rows = []
    for model, g in scores.groupby("model", sort=False):
        tagsets = [set(c.split(",")) for c in g["categories"].astype(str)]
        first_of_prompt = ~g["prompt_id"].duplicated().to_numpy()
        values = {m: g[m].to_numpy(dtype=np.float64) for m in metrics}
        for cat in cats:
            sel = np.ones(len(g), dtype=bool) if cat == "all" else np.array([cat in t for t in tagsets])
            if not sel.any():
                continue
            for m in metrics:
                mask = sel & first_of_prompt if info[m]["kind"] == "prompt" else sel
                v = values[m][mask]
                v = v[np.isfinite(v)]
                if not v.size:  # nothing measured here (e.g. skin parts when no image has a face): no row
                    continue
                rows.append({"model": str(model), "category": cat, "metric": m,
                             "mean": float(v.mean()),
                             "std": float(v.std(ddof=1)) if v.size > 1 else math.nan, "n": int(v.size)})
    return pd.DataFrame(rows, columns=["model", "category", "metric", "mean", "std", "n"])


# ---------------------------------------------------------------------------------------------- pairs
def compare_pairs(scores: pd.DataFrame, info: Mapping[str, Mapping[str, Any]], models: Sequence[str], baseline: str,
                  *, n_boot: int, confidence: float, seed: int) -> pd.DataFrame:
    """One row per (model != baseline, image or prompt metric): the paired difference and its interval."""
    metrics = [m for m, i in info.items() if i["kind"] in ("image", "prompt") and m in scores.columns]
    order = {p: i for i, p in enumerate(dict.fromkeys(scores["prompt_id"].astype(str)))}
    base = scores[scores["model"] == baseline]
    rows = []
    for model in models:
        if model == baseline:
            continue
        cur = scores[scores["model"] == model]
        joined = cur.merge(base, on=["prompt_id", "seed"], suffixes=("", "__base"), how="inner")
        joined = joined.assign(_order=joined["prompt_id"].astype(str).map(order)).sort_values(["_order", "seed"],
                                                                                              kind="stable")
        for m in metrics:
            sub = joined.drop_duplicates("prompt_id") if info[m]["kind"] == "prompt" else joined
            a = sub[m].to_numpy(dtype=np.float64)
            b = sub[f"{m}__base"].to_numpy(dtype=np.float64)
            ok = np.isfinite(a) & np.isfinite(b)
            n = int(ok.sum())
            row = {"model": model, "baseline": baseline, "metric": m, "mean_model": math.nan,
                   "mean_baseline": math.nan, "diff": math.nan, "lo": math.nan, "hi": math.nan, "n_pairs": n,
                   "verdict": ""}
            if n:
                codes, _ = pd.factorize(sub["prompt_id"].to_numpy()[ok])
                d = a[ok] - b[ok]
                # A difference at float-rounding level (the same measurement summed in another order) is 0.
                d[np.abs(d) <= ROUNDING * (1.0 + np.abs(a[ok]) + np.abs(b[ok]))] = 0.0
                sums = np.bincount(codes, weights=d)
                counts = np.bincount(codes).astype(np.float64)
                lo, hi = cluster_mean_interval(sums, counts, n_boot=n_boot, confidence=confidence, seed=seed)
                row.update(mean_model=float(a[ok].mean()), mean_baseline=float(b[ok].mean()),
                           diff=float(d.mean()), lo=lo, hi=hi, verdict=verdict(lo, hi, info[m]["higher_is_better"]))
            rows.append(row)
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


# ---------------------------------------------------------------------------------------------- set metrics
def _weights(prompt_ids: Sequence[str], prompts: Sequence[str], counts: np.ndarray) -> np.ndarray:
    """Per-image resample weights: an image weighs as often as its prompt was drawn."""
    code = {p: i for i, p in enumerate(prompts)}
    return counts[:, [code[p] for p in prompt_ids]]


def feature_distance(z: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], z_ref: np.ndarray,
                     models: Sequence[str], baseline: str, *, n_boot: int, confidence: float, seed: int,
                     metric: str = "feature_distance_to_real",
                     higher_is_better: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """KID to the real set per model (value, interval) and each model's difference to the baseline.

    ``z[model] = (standardised features [n, D], prompt_id per row, seed per row)``. The model's prompts are
    resampled as clusters, real images one by one; a comparison restricts both models to the prompts they
    share and uses the same resamples for both, so its interval is that of the paired difference.
    """
    m_ref = len(z_ref)
    kyy = poly_kernel(z_ref, z_ref)
    wy = cluster_counts(m_ref, n_boot, np.random.default_rng([seed, 0])) if m_ref else np.zeros((n_boot, 0))
    ones_y = np.ones((1, m_ref))

    def prompt_counts(n_prompts: int) -> np.ndarray | None:
        return cluster_counts(n_prompts, n_boot, np.random.default_rng([seed, 1])) if n_prompts >= 2 else None

    def stats(model: str, prompts: Sequence[str], counts: np.ndarray | None):
        x, pids, _ = z[model]
        keep = np.isin(pids, list(prompts))
        x, pids = x[keep], pids[keep]
        if len(x) < 2 or m_ref < 2:
            return math.nan, None
        kxx, kxy = poly_kernel(x, x), poly_kernel(x, z_ref)
        point = float(weighted_mmd2(kxx, kyy, kxy, np.ones((1, len(x))), ones_y)[0])
        boot = None if counts is None else weighted_mmd2(kxx, kyy, kxy, _weights(pids, prompts, counts), wy)
        return point, boot

    set_rows, comp_rows = [], []
    for model in models:
        prompts = list(dict.fromkeys(z[model][1]))
        point, boot = stats(model, prompts, prompt_counts(len(prompts)))
        lo, hi = percentile_interval(boot, confidence) if boot is not None else (math.nan, math.nan)
        set_rows.append({"model": model, "metric": metric, "value": point, "lo": lo, "hi": hi})
    for model in models:
        if model == baseline:
            continue
        theirs = set(z[baseline][1])
        common = [p for p in dict.fromkeys(z[model][1]) if p in theirs]
        counts = prompt_counts(len(common))
        a, boot_a = stats(model, common, counts)
        b, boot_b = stats(baseline, common, counts)
        lo, hi = percentile_interval(boot_a - boot_b, confidence) if boot_a is not None and boot_b is not None \
            else (math.nan, math.nan)
        keys = [{(p, int(s)) for p, s in zip(z[m][1], z[m][2]) if p in set(common)} for m in (model, baseline)]
        comp_rows.append({"model": model, "baseline": baseline, "metric": metric, "mean_model": a, "mean_baseline": b,
                          "diff": a - b, "lo": lo, "hi": hi, "n_pairs": len(keys[0] & keys[1]),
                          "verdict": verdict(lo, hi, higher_is_better)})
    return (pd.DataFrame(set_rows, columns=["model", "metric", "value", "lo", "hi"]),
            pd.DataFrame(comp_rows, columns=list(COMPARISON_COLUMNS)))

"""The ablation's report: variants pooled over their training seeds, compared with paired bootstrap intervals.

Input: the ablation file, the runs' training folders (``<root>/<run>/train``) and the one PortraitBench run
that benched every run (``<root>/bench``: each run is a bench model labelled with its run name, and every
model's image of ``(prompt, bench seed)`` starts from the same noise). Output (``<root>/report``):

- ``table.csv``: per variant and metric, the mean over its runs' images and its interval;
- ``comparisons.csv``: every variant against the baseline variant and against the ablation file's
  ``controls`` (and ``--against``: the supervised control), difference and interval;
- ``curves.csv`` / ``curves.png``: training curves per variant (mean over seeds, band = min..max over seeds):
  the generated samples' reward at every iteration (``metrics.jsonl``) and, every checkpoint, the planted
  artifact rate and the chroma of images generated from that checkpoint (fixed prompts and noise);
- ``grid.png``: the same prompts and noise for every variant (first seed) and the real set, side by side;
- ``summary.json`` and ``report.md``; the curves and table also go to MLflow (stage ``ablation_report``).

**Intervals.** A variant's value is the mean over its runs (training seeds), prompts and bench seeds. Its
uncertainty has two sources: which prompts were benched, and which training seeds happened to be drawn.
The bootstrap resamples both: whole prompts with replacement (the same draw for every variant, so
comparisons are *paired* over prompts and noise) and, independently per variant, its training runs with
replacement (runs of different variants are not paired: a seed only fixes their start). The interval is
the percentile interval at ``bench.confidence``; with 3 seeds the seed part is coarse, which makes these
intervals wider, not narrower, than a prompt-only bootstrap.

**Metrics.** Every image and prompt metric of the bench (rewards such as AI-Portrait and OmniReward, the
face-detection rate, artifact flags, the per-prompt ``diversity`` across bench seeds), plus, computed here
from the saved images: ``planted_artifact`` (the independent planted-artifact detector of
:mod:`portraitgen.pretrain.artifact_detector`, never a training reward; flagged above its threshold), ``chroma`` (mean Lab
chroma: the training faces are greyscale LFW photos, so colour appearing is a reward-hacking sign),
``seed_diversity`` (per prompt and bench noise, the mean feature distance between the images of a variant's
different training seeds: a collapse into one template drives it to 0), and the feature distance (KID) to
the real set.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .ablation import Ablation, load_ablation, run_name
from .bench.compare import cluster_counts, feature_distance, percentile_interval, verdict

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ArtifactScorer:
    """The planted-artifact detector as the report uses it: probabilities of uint8 ``[N, H, W, 3]`` images,
    and the probability above which an image is flagged."""

    probabilities: Callable[[np.ndarray], np.ndarray]
    threshold: float = 0.5

    def flags(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.probabilities(images), dtype=np.float64) > self.threshold


def default_detector(model_path: str) -> str:
    """The detector ``portraitgen pretrain`` writes beside its model (``<out>/artifact_detector`` next to
    ``<out>/model``), when ``model.path`` is such a model; else ``""``."""
    if model_path.startswith("builtin:"):
        return ""
    from .pretrain.stage import DETECTOR_DIR

    candidate = Path(model_path).expanduser().parent / DETECTOR_DIR
    return str(candidate) if candidate.is_dir() else ""


def load_artifact_scorer(folder: str | Path) -> ArtifactScorer:
    """The detector ``portraitgen pretrain`` trains (:mod:`portraitgen.pretrain.artifact_detector`)."""
    from .pretrain.artifact_detector import load

    try:
        det = load(folder)
    except FileNotFoundError as exc:
        raise AblationReportError(f"--detector: {exc}") from None
    return ArtifactScorer(lambda images: det.probabilities(list(images)), det.settings.threshold)

# Metrics whose direction is known for the verdicts (others: "differs" when the interval excludes 0).
DIRECTION = {"planted_artifact": False, "planted_artifact_prob": False, "face_detected": True, "chroma": None,
             "diversity": True, "seed_diversity": True, "feature_distance_to_real": False}
TABLE_COLUMNS = ("variant", "metric", "kind", "mean", "lo", "hi", "runs", "n")
COMPARE_COLUMNS = ("variant", "against", "metric", "mean", "mean_against", "diff", "lo", "hi", "verdict")


class AblationReportError(ValueError):
    """The ablation's runs or bench are missing or do not match the ablation file."""


@dataclass(frozen=True)
class Run:
    name: str
    variant: str
    seed: int
    train_dir: Path


def runs_of(ablation: Ablation, root: Path) -> list[Run]:
    return [Run(run_name(v, s), v, s, root / run_name(v, s) / "train") for v in ablation.variants
            for s in ablation.seeds]


# ---------------------------------------------------------------------------------------------- per image
def chroma(rgb: np.ndarray) -> float:
    """Mean CIE-Lab chroma ``sqrt(a^2 + b^2)`` of a uint8 image (0 for a grey image, ~10-30 for colour photos)."""
    import cv2

    lab = cv2.cvtColor(np.ascontiguousarray(rgb).astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    return float(np.sqrt(lab[..., 1] ** 2 + lab[..., 2] ** 2).mean())


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_table(bench_dir: Path, runs: Sequence[Run], scorer: ArtifactScorer | None) -> tuple[pd.DataFrame, np.ndarray]:
    """The bench's per-image scores of the runs, with variant/run columns and the metrics computed here;
    and the raw feature vectors of those images (rows aligned)."""
    from .bench.metrics import image_features

    path = bench_dir / "scores.parquet"
    if not path.is_file():
        raise AblationReportError(f"{path} not found: run the ablation's bench first (snakemake ablation)")
    scores = pd.read_parquet(path)
    by_name = {r.name: r for r in runs}
    missing = sorted(set(by_name) - set(scores["model"]))
    if missing:
        raise AblationReportError(f"{path}: run {missing[0]!r} was not benched (models: "
                                  f"{', '.join(sorted(set(scores['model'])))}); re-run the ablation's bench")
    table = scores[scores["model"].isin(list(by_name))].reset_index(drop=True)
    table["variant"] = [by_name[m].variant for m in table["model"]]
    table["train_seed"] = [by_name[m].seed for m in table["model"]]
    images = [load_rgb(bench_dir / rel) for rel in table["image"]]
    table["chroma"] = [chroma(im) for im in images]
    feats = np.stack([image_features(im) for im in images]) if images else np.zeros((0, 1))
    if scorer is not None and images:
        prob = np.concatenate([np.asarray(scorer.probabilities(np.stack(images[i:i + 64])), dtype=np.float64)
                               for i in range(0, len(images), 64)])
        table["planted_artifact_prob"] = prob
        table["planted_artifact"] = (prob > scorer.threshold).astype(np.float64)
    return table, feats


def seed_diversity(table: pd.DataFrame, z: np.ndarray) -> np.ndarray:
    """Per image: the mean standardised-feature distance to the images of the same variant, prompt and bench
    seed made by the variant's *other* training runs (NaN with a single run)."""
    out = np.full(len(table), np.nan)
    dim = math.sqrt(z.shape[1]) if z.ndim == 2 and z.shape[1] else 1.0
    for _, idx in table.groupby(["variant", "prompt_id", "seed"], sort=False).indices.items():
        if len(idx) < 2:
            continue
        d = np.sqrt(((z[idx][:, None, :] - z[idx][None, :, :]) ** 2).sum(-1)) / dim
        out[idx] = d.sum(1) / (len(idx) - 1)
    return out


# ---------------------------------------------------------------------------------------------- bootstrap
def run_prompt_sums(table: pd.DataFrame, variant: str, metric: str, prompts: Sequence[str],
                    prompt_level: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(sums, counts)`` ``[runs, prompts]`` of the finite values of ``metric`` for ``variant``; a prompt
    metric counts once per (run, prompt)."""
    sub = table[table["variant"] == variant]
    if prompt_level:
        sub = sub.drop_duplicates(["model", "prompt_id"])
    runs = list(dict.fromkeys(sub["model"]))
    col = {p: i for i, p in enumerate(prompts)}
    sums, counts = np.zeros((len(runs), len(prompts))), np.zeros((len(runs), len(prompts)))
    values = sub[metric].to_numpy(dtype=np.float64)
    ok = np.isfinite(values)
    r = np.array([runs.index(m) for m in sub["model"]], dtype=int)
    p = np.array([col.get(x, -1) for x in sub["prompt_id"].astype(str)], dtype=int)
    keep = ok & (p >= 0)
    np.add.at(sums, (r[keep], p[keep]), values[keep])
    np.add.at(counts, (r[keep], p[keep]), 1.0)
    return sums, counts


def hierarchical_boot(sums: np.ndarray, counts: np.ndarray, prompt_draws: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means: prompts weighted by ``prompt_draws`` [B, P] (shared across variants), runs
    resampled with replacement here. ``[B]``."""
    n_boot = len(prompt_draws)
    run_draws = cluster_counts(len(sums), n_boot, rng) if len(sums) > 1 else np.ones((n_boot, len(sums)))
    num = np.einsum("br,rp,bp->b", run_draws, sums, prompt_draws)
    den = np.einsum("br,rp,bp->b", run_draws, counts, prompt_draws)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def compare_variants(table: pd.DataFrame, metrics: Mapping[str, str], variants: Sequence[str],
                     pairs: Sequence[tuple[str, str]], *, n_boot: int, confidence: float,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-variant values and ``(variant, against)`` differences of ``metrics`` (name -> "image"|"prompt")."""
    prompts = list(dict.fromkeys(table["prompt_id"].astype(str)))
    draws = cluster_counts(len(prompts), n_boot, np.random.default_rng([seed, 0]))
    rows, comp = [], []
    for k, (metric, kind) in enumerate(metrics.items()):
        if metric not in table.columns:
            continue
        boots, points = {}, {}
        for j, v in enumerate(variants):
            sums, counts = run_prompt_sums(table, v, metric, prompts, prompt_level=kind == "prompt")
            if counts.sum() == 0:
                continue
            points[v] = float(sums.sum() / counts.sum())
            boots[v] = hierarchical_boot(sums, counts, draws, np.random.default_rng([seed, 1, k, j]))
            lo, hi = percentile_interval(boots[v], confidence)
            rows.append({"variant": v, "metric": metric, "kind": kind, "mean": points[v], "lo": lo, "hi": hi,
                         "runs": len(sums), "n": int(counts.sum())})
        for v, against in pairs:
            if v in boots and against in boots:
                lo, hi = percentile_interval(boots[v] - boots[against], confidence)
                comp.append({"variant": v, "against": against, "metric": metric, "mean": points[v],
                             "mean_against": points[against], "diff": points[v] - points[against], "lo": lo,
                             "hi": hi, "verdict": verdict(lo, hi, DIRECTION.get(metric, _reward_direction(metric)))})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS)), pd.DataFrame(comp, columns=list(COMPARE_COLUMNS))


def _reward_direction(metric: str) -> bool | None:
    if metric.startswith("artifact") or metric.startswith("flag"):
        return False
    if metric.startswith(("ai_portrait", "omni", "reward")):
        return True
    return None


def distance_to_real(table: pd.DataFrame, z: np.ndarray, z_ref: np.ndarray, variants: Sequence[str],
                     pairs: Sequence[tuple[str, str]], *, n_boot: int, confidence: float,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """KID to the real set per variant (all its runs' images pooled) and paired differences."""
    zs = {v: (z[(table["variant"] == v).to_numpy()],
              table.loc[table["variant"] == v, "prompt_id"].to_numpy(dtype=str),
              table.loc[table["variant"] == v, "seed"].to_numpy()) for v in variants}
    rows, comp = [], []
    against_all = list(dict.fromkeys(a for _, a in pairs))
    for against in against_all:
        order = [against] + [v for v in variants if v != against]
        set_rows, cmp = feature_distance(zs, z_ref, order, against, n_boot=n_boot, confidence=confidence, seed=seed)
        if not rows:
            rows = [{"variant": r.model, "metric": r.metric, "kind": "set", "mean": r.value, "lo": r.lo, "hi": r.hi,
                     "runs": int((table[table["variant"] == r.model]["model"]).nunique()),
                     "n": int((table["variant"] == r.model).sum())} for r in set_rows.itertuples()]
        wanted = {v for v, a in pairs if a == against}
        comp += [{"variant": r.model, "against": against, "metric": r.metric, "mean": r.mean_model,
                  "mean_against": r.mean_baseline, "diff": r.diff, "lo": r.lo, "hi": r.hi, "verdict": r.verdict}
                 for r in cmp.itertuples() if r.model in wanted]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS)), pd.DataFrame(comp, columns=list(COMPARE_COLUMNS))


# ---------------------------------------------------------------------------------------------- curves
def reward_curves(runs: Sequence[Run]) -> pd.DataFrame:
    """variant, seed, iteration, reward: the *generated* samples' mean reward of every iteration (with
    exemplars in the groups, ``reward/mean`` would include the real images' fixed rewards)."""
    rows = []
    for r in runs:
        path = r.train_dir / "metrics.jsonl"
        if not path.is_file():
            raise AblationReportError(f"{path} not found: run {r.name} has not trained")
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            value = rec.get("generated/reward_mean", rec.get("reward/mean"))
            if value is not None:
                rows.append({"variant": r.variant, "seed": r.seed, "iteration": int(rec["iteration"]),
                             "metric": "reward", "value": float(value)})
    return pd.DataFrame(rows, columns=["variant", "seed", "iteration", "metric", "value"])


def exemplar_gradient_share(runs: Sequence[Run], group_size: int) -> pd.DataFrame:
    """variant, seed, share: the exemplars' share of the velocity-gradient norm in each exemplar run (mean
    over iterations of ``E g_ex / (E g_ex + (G - E) g_gen)`` from the per-sample norms the trainer logs),
    to set beside the supervised control's ``train.sft.share``."""
    rows = []
    for r in runs:
        shares = []
        for line in (r.train_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            ex, gen = rec.get("exemplar/velocity_grad_norm"), rec.get("generated/velocity_grad_norm")
            e = rec.get("exemplar/per_group", 0)
            if e and ex is not None and gen is not None and math.isfinite(ex) and math.isfinite(gen) and ex + gen > 0:
                shares.append(e * ex / (e * ex + (group_size - e) * gen))
        if shares:
            rows.append({"variant": r.variant, "seed": r.seed, "share": float(np.mean(shares))})
    return pd.DataFrame(rows, columns=["variant", "seed", "share"])


def checkpoint_curves(runs: Sequence[Run], params_of: Callable[[Run], Any], scorer: ArtifactScorer | None,
                      prompts: Sequence[str], *, images_per_prompt: int = 2, num_steps: int = 0,
                      seed: int = 0) -> pd.DataFrame:
    """Every kept checkpoint of every run (and iteration -1: the base model): images generated from fixed
    prompts and noise, scored for the planted artifact and chroma. The base model is generated once."""
    import torch

    from .checkpointing import list_checkpoints, load_checkpoint
    from .fingerprint import fingerprint_hash
    from .generate import generate_images
    from .policies import load_policy

    def measure(policy, p) -> dict[str, float]:
        # Sampled like the bench (its steps and guidance), so the curve's last point and the table agree.
        imgs = generate_images(policy, prompts, resolution=p.model.resolution, num_steps=num_steps or p.bench.num_steps,
                               guidance_scale=p.bench.guidance_scale, seed=seed, num_images=images_per_prompt,
                               batch_size=16)
        rgb = (imgs.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        out = {"chroma": float(np.mean([chroma(im) for im in rgb]))}
        if scorer is not None:
            out["planted_artifact"] = float(scorer.flags(rgb).mean())
        return out

    rows, base_cache = [], {}
    for r in runs:
        p = params_of(r)
        ckpts = list_checkpoints(r.train_dir / "checkpoints" / fingerprint_hash(p))
        if not ckpts:
            log.warning("ablation report: run %s kept no checkpoints: no artifact curve for it", r.name)
            continue
        key = (p.model.family, p.model.path)
        policy = load_policy(p.model.family, p.model.path)
        if key not in base_cache:
            base_cache[key] = measure(policy, p)
        points = [(-1, base_cache[key])]
        policy.freeze_all()
        if p.train.finetune == "lora":
            policy.enable_lora(p.train.lora.rank, p.train.lora.alpha, p.train.lora.target_modules)
        for ck in ckpts:
            state = load_checkpoint(ck)
            missing = set(state["trainable"]) - {n for n, _ in policy.transformer.named_parameters()}
            if missing:
                raise AblationReportError(f"{ck}: weights {sorted(missing)[:1]} do not fit run {r.name}'s model")
            policy.transformer.load_state_dict(state["trainable"], strict=False)
            points.append((int(state["state"]["iteration"]), measure(policy, p)))
        for it, values in points:
            for metric, value in values.items():
                rows.append({"variant": r.variant, "seed": r.seed, "iteration": it + 1, "metric": metric,
                             "value": value})
    return pd.DataFrame(rows, columns=["variant", "seed", "iteration", "metric", "value"])


def plot_curves(curves: pd.DataFrame, path: Path, smooth: int = 5) -> Path:
    """One panel per metric; per variant the mean over seeds and a min..max band (reward: a moving
    average over ``smooth`` iterations first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(curves["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.3), squeeze=False)
    titles = {"reward": "training reward (generated samples)", "planted_artifact": "planted-artifact rate",
              "chroma": "chroma (greyscale domain: 0)"}
    for ax, metric in zip(axes[0], metrics):
        sub = curves[curves["metric"] == metric]
        for i, (variant, g) in enumerate(sub.groupby("variant", sort=False)):
            wide = g.pivot_table(index="iteration", columns="seed", values="value").sort_index()
            if metric == "reward" and smooth > 1:
                wide = wide.rolling(smooth, min_periods=1).mean()
            x = wide.index.to_numpy()
            ax.plot(x, wide.mean(axis=1), label=variant, color=f"C{i}", marker="o" if metric != "reward" else None,
                    ms=3)
            ax.fill_between(x, wide.min(axis=1), wide.max(axis=1), color=f"C{i}", alpha=0.18, lw=0)
        ax.set_title(titles.get(metric, metric), fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(table: pd.DataFrame, bench_dir: Path, variants: Sequence[str], real: Sequence[np.ndarray],
                path: Path, n: int = 8, scale: int = 3) -> Path:
    """Rows: the variants' first runs (same prompts and noise), then real images. Upscaled for viewing."""
    from PIL import Image

    keys = table[["prompt_id", "seed"]].drop_duplicates().head(n)
    rows = []
    for v in variants:
        sub = table[table["variant"] == v]
        first = sub[sub["train_seed"] == sub["train_seed"].min()]
        row = []
        for k in keys.itertuples():
            hit = first[(first["prompt_id"] == k.prompt_id) & (first["seed"] == k.seed)]
            row.append(load_rgb(bench_dir / hit["image"].iloc[0]) if len(hit) else None)
        rows.append(row)
    rows.append(list(real[:n]))
    side = max(im.shape[0] for row in rows for im in row if im is not None)
    pad = 2
    grid = np.full((len(rows) * (side + pad), n * (side + pad), 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row[:n]):
            if im is None:
                continue
            if im.shape[0] != side:
                im = np.asarray(Image.fromarray(im).resize((side, side)))
            grid[i * (side + pad):i * (side + pad) + side, j * (side + pad):j * (side + pad) + side] = im
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# ---------------------------------------------------------------------------------------------- the report
def _fmt(mean: float, lo: float, hi: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    prec = 3 if abs(mean) < 10 else 1
    iv = f" [{lo:.{prec}f}, {hi:.{prec}f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
    return f"{mean:.{prec}f}{iv}"


def markdown(table: pd.DataFrame, comp: pd.DataFrame, variants: Sequence[str], scale: Mapping[str, Any]) -> str:
    metrics = list(dict.fromkeys(table["metric"]))
    lines = ["| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for m in metrics:
        cells = []
        for v in variants:
            r = table[(table["variant"] == v) & (table["metric"] == m)]
            cells.append(_fmt(*r[["mean", "lo", "hi"]].iloc[0]) if len(r) else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | vs | metric | difference [interval] | verdict |", "|---|---|---|---|---|"]
    for r in comp.itertuples():
        lines.append(f"| {r.variant} | {r.against} | {r.metric} | {_fmt(r.diff, r.lo, r.hi)} | {r.verdict} |")
    lines += ["", "Scale: " + ", ".join(f"{k} = {v}" for k, v in scale.items())]
    return "\n".join(lines) + "\n"


def write_report(params, ablation_path: str | Path, root: str | Path, *, against: Sequence[str] = (),
                 scorer: ArtifactScorer | None = None, curve_prompts: int = 8, out: str | Path | None = None,
                 params_of: Callable[[Run], Any] | None = None) -> dict[str, Any]:
    """Build everything listed in the module docstring; returns the summary (also ``summary.json``)."""
    from .bench.metrics import FeatureScaler, image_features, load_reference
    from .config import load_params

    ablation = load_ablation(ablation_path)
    root = Path(root)
    out = Path(out) if out else root / "report"
    bench_dir = root / "bench"
    runs = runs_of(ablation, root)
    variants = list(ablation.variants)
    against = list(dict.fromkeys([*ablation.controls, *against]))
    for a in against:
        if a not in variants:
            raise AblationReportError(f"--against {a!r} is not a variant of {ablation.source} ({', '.join(variants)})")
    pairs = [(v, ablation.baseline) for v in variants if v != ablation.baseline]
    pairs += [(v, a) for a in against for v in variants if v not in (a, ablation.baseline)]
    b = params.bench

    table, feats = image_table(bench_dir, runs, scorer)
    ref_images, ref_what = load_reference(b.reference, params.model.resolution)
    ref_feats = np.stack([image_features(im) for im in ref_images])
    scaler = FeatureScaler.fit(ref_feats)
    z = scaler(feats)
    table["seed_diversity"] = seed_diversity(table, z)
    info = json.loads((bench_dir / "metrics_info.json").read_text()) if (bench_dir / "metrics_info.json").is_file() else {}
    metrics = {"planted_artifact": "image", "planted_artifact_prob": "image"}
    metrics |= {m: i["kind"] for m, i in info.items() if i.get("kind") in ("image", "prompt") and m in table.columns}
    metrics |= {"chroma": "image", "seed_diversity": "image"}
    for m, i in info.items():
        if "higher_is_better" in i and m not in DIRECTION:
            DIRECTION[m] = i["higher_is_better"]
    kw = {"n_boot": b.bootstrap, "confidence": b.confidence, "seed": b.bootstrap_seed}
    vt, vc = compare_variants(table, metrics, variants, pairs, **kw)
    st, sc = distance_to_real(table, z, scaler(ref_feats), variants, pairs, **kw)
    per_variant = pd.concat([vt, st], ignore_index=True)
    comparisons = pd.concat([vc, sc], ignore_index=True)

    params_of = params_of or (lambda r: load_params(root / r.name / "params.yaml"))
    curves = reward_curves(runs)
    prompts = list(dict.fromkeys(table["prompt"]))[:curve_prompts]
    curves = pd.concat([curves, checkpoint_curves(runs, params_of, scorer, prompts)], ignore_index=True)

    out.mkdir(parents=True, exist_ok=True)
    per_variant.to_csv(out / "table.csv", index=False)
    comparisons.to_csv(out / "comparisons.csv", index=False)
    curves.to_csv(out / "curves.csv", index=False)
    plot_curves(curves, out / "curves.png")
    real_rgb = [im for im in ref_images]
    sample_grid(table, bench_dir, variants, real_rgb, out / "grid.png")
    real_chroma = float(np.mean([chroma(im) for im in ref_images]))
    real_artifact = float(scorer.flags(np.stack(ref_images)).mean()) if scorer is not None else math.nan
    p0 = params_of(runs[0])
    shares = exemplar_gradient_share(runs, p0.sample.group_size)
    share_text = "; ".join(f"{v} {g['share'].mean():.3f} (runs {g['share'].min():.3f}-{g['share'].max():.3f})"
                           for v, g in shares.groupby("variant", sort=False))
    scale = {"variants": len(variants), "seeds": list(ablation.seeds), "runs": len(runs),
             "iterations": p0.train.iterations, "images_per_iteration": p0.sample.global_batch_size,
             "group_size": p0.sample.group_size, "bench_prompts": int(table["prompt_id"].nunique()),
             "bench_seeds": int(table["seed"].nunique()), "bench_images": len(table),
             "resolution": p0.model.resolution, "model": p0.model.path}
    summary = {"ablation": str(ablation.source), "baseline": ablation.baseline, "against": against,
               "scale": scale, "reference": ref_what, "real_chroma": real_chroma, "real_planted_artifact": real_artifact,
               "exemplar_gradient_share": shares.to_dict(orient="records"),
               "table": per_variant.to_dict(orient="records"), "comparisons": comparisons.to_dict(orient="records")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    text = (f"# Ablation report ({ablation.source})\n\nReal set ({ref_what}): chroma {real_chroma:.2f}, planted-"
            f"artifact rate {real_artifact:.3f}.\n\n" +
            (f"Exemplars' share of the velocity-gradient norm (compare train.sft.share): {share_text}.\n\n"
             if share_text else "") + markdown(per_variant, comparisons, variants, scale) +
            "\n![curves](curves.png)\n\n![grid](grid.png)\n")
    (out / "report.md").write_text(text)
    _track(params, out, curves, per_variant)
    return summary


def _track(params, out: Path, curves: pd.DataFrame, table: pd.DataFrame) -> None:
    from .stage import tracked

    with tracked(params.tracking, "ablation_report", params={}) as tracker:
        mean = curves.groupby(["variant", "metric", "iteration"])["value"].mean().reset_index()
        for (variant, metric), g in mean.groupby(["variant", "metric"]):
            for it, value in zip(g["iteration"], g["value"]):
                tracker.log_metrics({f"{variant}/{metric}": float(value)}, step=max(int(it), 0))
        tracker.log_metrics({f"{r.variant}/final_{r.metric}": float(r.mean) for r in table.itertuples()
                             if math.isfinite(r.mean)}, step=0)
        for name in ("curves.png", "grid.png", "table.csv", "comparisons.csv", "report.md"):
            tracker.log_artifact(out / name, "ablation")


def report_cli(args) -> int:
    """``portraitgen ablation report``: the report of an ablation that has trained and benched."""
    from .config import load_params

    params = load_params(args.params)
    detector = args.detector or default_detector(params.model.path)
    scorer = load_artifact_scorer(detector) if detector else None
    if scorer is None:
        log.warning("ablation report: no planted-artifact detector (model.path %s has none beside it, no --detector): "
                    "no artifact rate", params.model.path)
    summary = write_report(params, args.variants, args.root, against=args.against, scorer=scorer)
    out = Path(args.root) / "report"
    print(f"ablation report: {len(summary['table'])} values, {len(summary['comparisons'])} comparisons -> {out}")
    for r in summary["comparisons"]:
        if r["verdict"]:
            print(f"  {r['variant']} vs {r['against']}: {r['metric']} {r['diff']:+.4g} "
                  f"[{r['lo']:.4g}, {r['hi']:.4g}] {r['verdict']}")
    return 0

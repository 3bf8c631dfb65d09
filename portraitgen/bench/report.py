"""PortraitBench's report: ``report.html`` (+ ``report_assets/``), DVC plot data and MLflow logging.

    from portraitgen.bench.report import write_report
    write_report(Path("results/bench"), tracker)      # after the bench stage wrote its artifacts

Reads only the bench folder's artifacts (the contract with the bench stage), never its code:

    images/<model>/<prompt_id>_s<seed>.png
    scores.parquet        one row per (model, prompt_id, seed): model, prompt_id, prompt, categories
                          ("shot:headshot,light:studio"), seed, image (relative path), one float per metric
    metrics_info.json     {metric: {"description", "higher_is_better", "kind": image|prompt|set}}
                          (optional extra key: "main": true marks the metric the grids are chosen by)
    per_category.parquet  model, category ("all" included), metric, mean, std, n
    set_metrics.parquet   model, metric, value, lo, hi
    comparisons.parquet   model, baseline, metric, mean_model, mean_baseline, diff, lo, hi, n_pairs, verdict
    metrics.json          numbers for `dvc metrics diff` (a "suite" entry, if any, names the suite)

and writes

    report.html           one page, no JavaScript, no network: header, verdicts, plots, the per-category
                          table, set metrics, side-by-side grids, worst cases, the metric glossary
    report_assets/        plots/*.png, thumbs/ (256 px JPEGs of the images shown; a thumbnail links to its
                          full image), grids/*.png (one composite per grid, for MLflow); rebuilt each time
    plots/comparisons.csv, plots/per_category.csv   for `dvc plots` (bar_horizontal; see README)

A verdict is listed only where a comparison's interval excludes 0; its word is the bench's verdict
("better"/"worse", which knows the metric's direction). The report is deterministic: the same bench
folder gives the same bytes (no timestamps; grid prompts and worst cases are chosen by sorted scores).
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import numpy as np
import pandas as pd

from ..io import atomic_write_text

log = logging.getLogger(__name__)

GRID_PROMPTS = 6  # prompt/seed pairs shown side by side across models
WORST_K = 4  # worst images per model and metric
THUMB = 256  # px, longest side of a thumbnail in report_assets/thumbs
HEATMAP_MAX = 2.0  # the per-category heatmap's colours saturate at this many baseline stds
# The metric the grids are chosen by, when metrics_info.json marks none as "main": the first of these
# present, else the first per-image metric with a direction and no "/" (a whole reward, not a part).
MAIN_PREFERENCE = ("total", "reward", "ai_portrait", "ai_portrait_classic", "ai_portrait_vlm",
                   "ai_portrait_detector", "omni", "omni_classic", "omni_vlm")
ID_COLUMNS = ("model", "prompt_id", "prompt", "categories", "seed", "image")
REQUIRED = {
    "per_category.parquet": ("model", "category", "metric", "mean", "std", "n"),
    "set_metrics.parquet": ("model", "metric", "value", "lo", "hi"),
    "comparisons.parquet": ("model", "baseline", "metric", "mean_model", "mean_baseline", "diff", "lo", "hi",
                            "n_pairs", "verdict"),
}
CSS = ("body{font-family:sans-serif;margin:2em;max-width:1600px}table{border-collapse:collapse}"
       "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}"
       "td.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#666}"
       ".scroll{overflow-x:auto}.good{color:#1a7f37}.bad{color:#c62828}.sig{font-weight:bold}"
       ".diff{font-size:11px}ul.verdicts li{font-family:monospace;font-size:14px;margin:2px 0}"
       "li.better{color:#1a7f37}li.worse{color:#c62828}"
       ".grid{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:1.5em}"
       ".tile{width:264px;font-size:11px;word-wrap:break-word;margin:0}"
       ".tile img{display:block;width:256px;height:auto;background:#eee}"
       ".worst .tile{width:140px}.worst .tile img{width:128px}"
       ".rowlabel{width:110px;font-weight:bold;font-size:13px;align-self:center}"
       "figure.plot{margin:0 0 1em 0}figure.plot img{max-width:100%}"
       "details{margin:0 0 .8em 0}summary{cursor:pointer;font-size:15px}q{font-style:italic}")


class BenchReportError(ValueError):
    """The bench folder does not hold what the report needs."""


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class MetricInfo:
    name: str
    description: str = ""
    higher_is_better: bool | None = None  # None: no direction (no better/worse colouring)
    kind: str = "image"  # image | prompt | set

    @property
    def sign(self) -> int:
        return 0 if self.higher_is_better is None else (1 if self.higher_is_better else -1)

    @property
    def arrow(self) -> str:
        return {1: " ↑", -1: " ↓", 0: ""}[self.sign]


@dataclass
class Bench:
    """The bench folder's artifacts, read once, plus what the report derives from them."""

    dir: Path
    scores: pd.DataFrame
    info: dict[str, MetricInfo]  # in metrics_info.json order, then any unlisted score columns
    per_category: pd.DataFrame
    set_metrics: pd.DataFrame
    comparisons: pd.DataFrame  # category "all" only (or no category column)
    comparisons_by_category: pd.DataFrame  # empty unless the bench compares per category
    metrics_json: dict[str, Any]
    models: list[str]
    pairs: list[tuple[str, str]]  # (model, baseline) in the order of comparisons.parquet
    main_metric: str | None
    missing: list[str] = field(default_factory=list)  # optional files that were not there

    def image_metrics(self) -> list[str]:
        """Per-image score columns, in metric order."""
        return [m for m in self.info if m in self.scores.columns]

    def ordered(self, metrics: Iterable[str]) -> list[str]:
        order = {m: i for i, m in enumerate(self.info)}
        return sorted(set(metrics), key=lambda m: (order.get(m, len(order)), m))


def _read_table(path: Path, required: tuple[str, ...], missing: list[str]) -> pd.DataFrame:
    if not path.is_file():
        missing.append(path.name)
        log.warning("bench report: %s not found; its section stays empty", path)
        return pd.DataFrame({c: [] for c in required})
    df = pd.read_parquet(path)
    absent = [c for c in required if c not in df.columns]
    if absent:
        raise BenchReportError(f"{path}: missing column(s) {', '.join(absent)}; expected {', '.join(required)}")
    return df


def load_bench(bench_dir: str | Path, main_metric: str | None = None) -> Bench:
    bench_dir = Path(bench_dir)
    scores_path, info_path = bench_dir / "scores.parquet", bench_dir / "metrics_info.json"
    for p in (scores_path, info_path):
        if not p.is_file():
            raise BenchReportError(f"{p} not found: write_report reads a finished bench folder "
                                   f"(scores.parquet, metrics_info.json, per_category.parquet, ...)")
    scores = pd.read_parquet(scores_path)
    absent = [c for c in ID_COLUMNS if c not in scores.columns]
    if absent:
        raise BenchReportError(f"{scores_path}: missing column(s) {', '.join(absent)}; "
                               f"expected {', '.join(ID_COLUMNS)} and one column per metric")
    raw_info = json.loads(info_path.read_text())
    info: dict[str, MetricInfo] = {}
    marked_main = None
    for name, d in raw_info.items():
        hib = d.get("higher_is_better")
        info[name] = MetricInfo(name, str(d.get("description", "")), None if hib is None else bool(hib),
                                str(d.get("kind", "image")))
        if d.get("main") and marked_main is None:
            marked_main = name
    for c in scores.columns:  # a score column the info forgot: shown, without a direction
        if c not in ID_COLUMNS and c not in info and pd.api.types.is_numeric_dtype(scores[c]):
            info[c] = MetricInfo(c)
    missing: list[str] = []
    per_cat = _read_table(bench_dir / "per_category.parquet", REQUIRED["per_category.parquet"], missing)
    set_m = _read_table(bench_dir / "set_metrics.parquet", REQUIRED["set_metrics.parquet"], missing)
    comp = _read_table(bench_dir / "comparisons.parquet", REQUIRED["comparisons.parquet"], missing)
    comp_cat = comp.iloc[0:0]
    if "category" in comp.columns:  # a bench that also compares per category: "all" is the overall line
        comp_cat = comp[comp["category"] != "all"].reset_index(drop=True)
        comp = comp[comp["category"] == "all"].reset_index(drop=True)
    mj_path = bench_dir / "metrics.json"
    metrics_json = json.loads(mj_path.read_text()) if mj_path.is_file() else {}
    models = list(dict.fromkeys(scores["model"].astype(str)))
    pairs = list(dict.fromkeys(zip(comp["model"].astype(str), comp["baseline"].astype(str))))
    bench = Bench(bench_dir, scores, info, per_cat, set_m, comp, comp_cat, metrics_json, models, pairs, None, missing)
    bench.main_metric = _main_metric(bench, main_metric or marked_main)
    return bench


def _main_metric(b: Bench, wanted: str | None) -> str | None:
    cols = b.image_metrics()
    if wanted:
        if wanted not in b.scores.columns:
            raise BenchReportError(f"main metric {wanted!r} is not a column of scores.parquet "
                                   f"(columns: {', '.join(cols)})")
        return wanted
    for name in MAIN_PREFERENCE:
        if name in cols:
            return name
    for name in cols:
        if b.info[name].sign and "/" not in name and b.info[name].kind == "image":
            return name
    return cols[0] if cols else None


# ---------------------------------------------------------------------------------------------- numbers
def fmt(x: Any, sign: bool = False) -> str:
    """Three significant digits, without exponents for ordinary magnitudes; "n/a" for NaN/None."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(x):
        return "n/a"
    s = "+" if sign and x > 0 else ""
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e3:
        digits = max(0, 2 - math.floor(math.log10(abs(x))))
        text = f"{x:.{digits}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return s + text
    if 1e3 <= abs(x) < 1e7:
        return s + f"{x:.0f}"
    return s + f"{x:.3g}"


def excludes_zero(lo: Any, hi: Any) -> bool:
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        return False
    return (math.isfinite(lo) and lo > 0) or (math.isfinite(hi) and hi < 0)


@dataclass(frozen=True)
class Verdict:
    model: str
    baseline: str
    metric: str
    diff: float
    lo: float
    hi: float
    word: str  # better | worse | differs (no direction known)

    @property
    def line(self) -> str:
        return (f"{self.model} vs {self.baseline}: {self.metric} {fmt(self.diff, sign=True)} "
                f"[{fmt(self.lo)}, {fmt(self.hi)}] {self.word}")


def verdicts(b: Bench) -> list[Verdict]:
    """One per overall comparison whose interval excludes 0, by pair then metric order."""
    out = []
    order = {m: i for i, m in enumerate(b.info)}
    pair_order = {p: i for i, p in enumerate(b.pairs)}
    rows = sorted(b.comparisons.to_dict("records"),
                  key=lambda r: (pair_order[(str(r["model"]), str(r["baseline"]))], order.get(r["metric"], 1e9),
                                 str(r["metric"])))
    for r in rows:
        if not excludes_zero(r["lo"], r["hi"]):
            continue
        word = str(r.get("verdict") or "")
        if word not in ("better", "worse"):
            s = b.info.get(r["metric"], MetricInfo(r["metric"])).sign * np.sign(float(r["diff"]))
            word = {1: "better", -1: "worse"}.get(int(s), "differs") if math.isfinite(s) else "differs"
        out.append(Verdict(str(r["model"]), str(r["baseline"]), str(r["metric"]), float(r["diff"]),
                           float(r["lo"]), float(r["hi"]), word))
    return out


def _sorted_categories(cats: Iterable[str]) -> list[str]:
    """"all" first, then by tag group ("shot", "light", ...) and value."""
    return sorted(set(map(str, cats)), key=lambda c: (c != "all", c.split(":", 1)[0], c))


def _cat_means(b: Bench) -> dict[tuple[str, str, str], tuple[float, float, float]]:
    """(model, category, metric) -> (mean, std, n)."""
    return {(str(r.model), str(r.category), str(r.metric)): (float(r.mean), float(r.std), float(r.n))
            for r in b.per_category.itertuples(index=False)}


# ---------------------------------------------------------------------------------------------- files
def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._")[:60] or "x"


def fit_thumbnail(im):
    """``im`` scaled so its longest side is :data:`THUMB`: smaller with Lanczos, larger (a 24 px toy model's
    images) by whole pixels with nearest neighbour, so labels fit under a tile and pixels stay honest."""
    from PIL import Image

    side = max(im.size)
    if side > THUMB:
        im.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
        return im
    k = THUMB // side
    return im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST) if k > 1 else im


class Thumbs:
    """Thumbnails of the images the report shows, under report_assets/thumbs (one per image)."""

    def __init__(self, b: Bench, assets: Path):
        self.b, self.dir = b, assets / "thumbs"
        self.done: dict[str, str] = {}

    def __call__(self, rel: str) -> str:
        """The report-relative src of the thumbnail of bench image ``rel``."""
        if rel in self.done:
            return self.done[rel]
        from PIL import Image, ImageDraw

        digest = hashlib.sha256(rel.encode()).hexdigest()[:8]
        parts = Path(rel).parts
        sub = _safe(parts[-2]) if len(parts) >= 2 else "x"
        out = self.dir / sub / f"{_safe(Path(rel).stem)}-{digest}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        src = self.b.dir / rel
        try:
            with Image.open(src) as im:
                im = fit_thumbnail(im.convert("RGB"))
        except Exception as exc:  # a missing or unreadable image: a grey tile that says so
            log.warning("bench report: cannot read %s (%s)", src, exc)
            im = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
            ImageDraw.Draw(im).text((8, THUMB // 2 - 6), "missing image", fill=(90, 90, 90))
        im.save(out, format="JPEG", quality=90)
        self.done[rel] = out.relative_to(self.b.dir).as_posix()
        return self.done[rel]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparisons(b: Bench, out: Path) -> Path | None:
    """One panel per metric: the difference of each model to its baseline, with its interval."""
    if b.comparisons.empty:
        return None
    plt = _plt()
    metrics = b.ordered(b.comparisons["metric"].astype(str))
    ncol = min(4, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    labels = [f"{m} vs {base}" for m, base in b.pairs]
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 0.9 + (0.32 * len(labels) + 0.8) * nrow), squeeze=False)
    colour = {"better": "#2e7d32", "worse": "#c62828"}
    by_key = {(str(r["model"]), str(r["baseline"]), str(r["metric"])): r for r in b.comparisons.to_dict("records")}
    for ax, metric in zip(axes.flat, metrics):
        for y, (model, base) in enumerate(b.pairs):
            r = by_key.get((model, base, metric))
            if r is None:
                continue
            d, lo, hi = float(r["diff"]), float(r["lo"]), float(r["hi"])
            sig = excludes_zero(lo, hi)
            word = str(r.get("verdict") or "")
            c = colour.get(word, "#607d8b") if sig else "#b0bec5"
            ax.barh(y, d, color=c, height=0.6)
            if np.isfinite(lo) and np.isfinite(hi):
                ax.errorbar(d, y, xerr=[[max(d - lo, 0)], [max(hi - d, 0)]], fmt="none", ecolor="black", capsize=3, lw=1)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(metric + b.info.get(metric, MetricInfo(metric)).arrow, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("difference to baseline with its interval (green: better, red: worse, pale: interval includes 0)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def heatmap_values(b: Bench) -> tuple[list[str], list[str], list[np.ndarray], list[np.ndarray]]:
    """Categories, metrics, and per pair the colour values (difference / baseline std, signed so that
    positive is better) and the raw differences. A metric without a direction (e.g. a raw luma) has NaN
    colour values: it is drawn neutral, never as better or worse, with its raw difference written in."""
    means = _cat_means(b)
    metrics = b.ordered(m for m in b.per_category["metric"].astype(str) if b.info.get(m, MetricInfo(m)).kind != "set")
    cats = _sorted_categories(b.per_category["category"])
    zs, raws = [], []
    for model, base in b.pairs:
        z = np.full((len(cats), len(metrics)), np.nan)
        raw = np.full_like(z, np.nan)
        for j, metric in enumerate(metrics):
            sign = b.info.get(metric, MetricInfo(metric)).sign
            for i, cat in enumerate(cats):
                if (model, cat, metric) in means and (base, cat, metric) in means:
                    raw[i, j] = means[(model, cat, metric)][0] - means[(base, cat, metric)][0]
            if sign == 0:
                continue
            std = means.get((base, "all", metric), (0.0, np.nan, 0))[1]
            scale = std if np.isfinite(std) and std > 1e-12 else np.nanmax(np.abs(raw[:, j]), initial=0.0)
            z[:, j] = sign * raw[:, j] / (scale if scale > 1e-12 else 1.0)
        zs.append(z)
        raws.append(raw)
    return cats, metrics, zs, raws


def plot_category_heatmap(b: Bench, out: Path) -> Path | None:
    """Per pair, categories x metrics (see heatmap_values): green is better, grey has no direction or no
    data; cells are annotated with the raw difference."""
    cats, metrics, zs, raws = heatmap_values(b)
    if not b.pairs or not metrics or not cats:
        return None
    # One colour scale for all pairs, saturating at 2 std so that one huge effect does not wash out the rest.
    top = max(float(np.nanmax(np.abs(z), initial=0.0)) for z in zs)
    vmax = min(max(top, 1e-9), HEATMAP_MAX)
    plt = _plt()
    fig, axes = plt.subplots(1, len(b.pairs), squeeze=False, layout="constrained",
                             figsize=(len(b.pairs) * (1.8 + 0.55 * len(metrics)) + 1.2, 1.6 + 0.3 * len(cats)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d9d9d9")  # NaN: no direction or no data
    for ax, (model, base), z, raw in zip(axes.flat, b.pairs, zs, raws):
        im = ax.imshow(np.ma.masked_invalid(z), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([m + b.info.get(m, MetricInfo(m)).arrow for m in metrics], rotation=45, ha="right",
                           fontsize=7)
        ax.set_yticks(range(len(cats)))
        ax.set_yticklabels(cats, fontsize=7)
        ax.set_title(f"{model} - {base}", fontsize=9)
        if z.size <= 600:
            for i in range(len(cats)):
                for j in range(len(metrics)):
                    if np.isfinite(raw[i, j]):
                        ax.text(j, i, fmt(raw[i, j], sign=True), ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=list(axes.flat), shrink=0.8, extend="both" if top > vmax else "neither").set_label(
        "difference / baseline std (green: better; grey: no direction)", fontsize=7)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_main_by_category(b: Bench, out: Path) -> Path | None:
    """The main metric's mean per category and model, with ±1 standard error."""
    metric = b.main_metric
    pc = b.per_category[b.per_category["metric"].astype(str) == metric] if metric else b.per_category.iloc[0:0]
    if pc.empty:
        return None
    plt = _plt()
    cats = _sorted_categories(pc["category"])
    means = _cat_means(b)
    width = 0.8 / len(b.models)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * len(cats) * max(1, len(b.models) / 2)))
    for k, model in enumerate(b.models):
        vals = [means.get((model, c, metric), (np.nan, np.nan, 0)) for c in cats]
        y = np.arange(len(cats)) + (k - (len(b.models) - 1) / 2) * width
        err = [s / math.sqrt(n) if n > 0 and np.isfinite(s) else 0.0 for _, s, n in vals]
        ax.barh(y, [v[0] for v in vals], height=width, xerr=err, capsize=2, label=model)
    ax.set_yticks(range(len(cats)))
    ax.set_yticklabels(cats, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric}{b.info.get(metric, MetricInfo(metric)).arrow} (mean ± s.e.)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------- choices
def _primary_pair(b: Bench) -> tuple[str, str] | None:
    if b.pairs:
        return b.pairs[0]
    return (b.models[-1], b.models[0]) if len(b.models) > 1 else None


def grid_choices(b: Bench, n: int = GRID_PROMPTS) -> list[tuple[str, int, float | None]]:
    """(prompt_id, seed, improvement) for the grids: the largest gains of the primary pair's model over its
    baseline in the main metric, then its largest losses (one seed per prompt, distinct prompts)."""
    s = b.scores
    keys = s[["prompt_id", "seed"]].drop_duplicates().astype({"prompt_id": str})
    keys = sorted(zip(keys["prompt_id"], keys["seed"].astype(int)))
    pair, metric = _primary_pair(b), b.main_metric
    first_seed = list({p: (p, sd, None) for p, sd in reversed(keys)}.values())[::-1]  # per prompt, its lowest seed
    if pair is None or metric is None:
        return first_seed[:n]
    sign = b.info.get(metric, MetricInfo(metric)).sign or 1
    wide = s.assign(prompt_id=s["prompt_id"].astype(str), seed=s["seed"].astype(int)).pivot_table(
        index=["prompt_id", "seed"], columns="model", values=metric, aggfunc="first")
    if pair[0] not in wide.columns or pair[1] not in wide.columns:
        return first_seed[:n]
    gain = (sign * (wide[pair[0]] - wide[pair[1]])).dropna()
    # Best seed per prompt by |gain|; ties broken by (prompt_id, seed) through the stable sort.
    rows = sorted(((p, sd, float(g)) for (p, sd), g in gain.items()), key=lambda t: (t[0], t[1]))
    best: dict[str, tuple[str, int, float]] = {}
    for t in sorted(rows, key=lambda t: -abs(t[2])):
        best.setdefault(t[0], t)
    cands = list(best.values())
    gains = sorted((t for t in cands if t[2] > 0), key=lambda t: -t[2])
    losses = sorted((t for t in cands if t[2] < 0), key=lambda t: t[2])
    chosen = gains[: (n + 1) // 2] + losses[: n // 2]
    rest = sorted((t for t in cands if t not in chosen), key=lambda t: -abs(t[2]))
    chosen += rest[: n - len(chosen)]
    return sorted(chosen, key=lambda t: -t[2])


def worst_metrics(b: Bench) -> list[str]:
    """Artifact flags first, then every per-image metric with a direction."""
    cols = [m for m in b.image_metrics() if b.info[m].kind == "image"]
    flags = [m for m in cols if m.startswith("artifact/")]
    return flags + [m for m in cols if m not in flags and b.info[m].sign]


def worst_rows(b: Bench, metric: str, model: str, k: int) -> tuple[pd.DataFrame, str | None]:
    """The ``k`` worst images of ``model`` in ``metric`` and the column they are ranked by. For an
    artifact flag: the flagged images, ranked by the matching part score (``<reward>/<name>``) if any."""
    s = b.scores[b.scores["model"].astype(str) == model].copy()
    s["_pid"] = s["prompt_id"].astype(str)
    if metric.startswith("artifact/"):
        s = s[s[metric] >= 0.5]
        name = metric.split("/", 1)[1]
        parts = [m for m in b.image_metrics() if m.endswith("/" + name) and not m.startswith("artifact/")
                 and b.info[m].sign]
        by = parts[0] if parts else None
        if by is None:
            return s.sort_values(["_pid", "seed"], kind="stable").head(k), None
        asc = b.info[by].sign > 0
    else:
        by, asc = metric, b.info[metric].sign > 0
        s = s[s[metric].notna()]
    return s.sort_values([by, "_pid", "seed"], ascending=[asc, True, True], kind="stable").head(k), by


# ---------------------------------------------------------------------------------------------- html
esc = html.escape


def _href(rel: str) -> str:
    return esc(quote(Path(rel).as_posix()))


def _tile(thumbs: Thumbs, row: dict, caption: str, cls: str = "tile") -> str:
    rel = str(row["image"])
    return (f'<figure class="{cls}"><a href="{_href(rel)}"><img src="{_href(thumbs(rel))}" '
            f'alt="{esc(str(row["model"]))} {esc(str(row["prompt_id"]))} seed {int(row["seed"])}" '
            f'title="{esc(str(row["prompt"]))}"></a><figcaption>{caption}</figcaption></figure>')


def _header(b: Bench, n_verdicts: int) -> str:
    s = b.scores
    suite = b.metrics_json.get("suite")
    if isinstance(suite, dict):
        suite = ", ".join(f"{k} {v}" for k, v in suite.items())
    if suite is None and "suite" in s.columns and len(s):
        suite = ", ".join(map(str, dict.fromkeys(s["suite"].astype(str))))
    tags = sorted({t.strip() for c in s["categories"].astype(str) for t in c.split(",") if t.strip()})
    per_model = s.groupby(s["model"].astype(str)).size()
    seeds = sorted(set(s["seed"].astype(int)))
    rows = [("models", ", ".join(b.models)),
            ("comparisons", ", ".join(f"{m} vs {base}" for m, base in b.pairs) or "none"),
            ("suite", suite if suite is not None else "not named"),
            ("prompts", s["prompt_id"].nunique()),
            ("seeds", f"{len(seeds)} ({', '.join(map(str, seeds[:12]))}{', ...' if len(seeds) > 12 else ''})"),
            ("images", f"{len(s)} (" + ", ".join(f"{m}: {per_model.get(m, 0)}" for m in b.models) + ")"),
            ("categories", f"{len(tags)} tags"),
            ("metrics", f"{len(b.image_metrics())} per image, {len(set(b.set_metrics['metric'].astype(str)))} per set"),
            ("main metric (grids)", b.main_metric or "none"),
            ("significant differences", n_verdicts)]
    if b.missing:
        rows.append(("missing files", ", ".join(b.missing)))
    body = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
    return f'<table id="summary">{body}</table>'


def _verdict_section(b: Bench, vs: list[Verdict]) -> str:
    n_all = len(b.comparisons)
    lines = "".join(f'<li class="verdict {esc(v.word)}" data-model="{esc(v.model)}" data-baseline="{esc(v.baseline)}" '
                    f'data-metric="{esc(v.metric)}">{esc(v.line)}</li>' for v in vs)
    if not n_all:
        note = "No comparisons in this bench (a single model, or comparisons.parquet is empty)."
    elif not vs:
        note = f"None of the {n_all} comparisons has an interval that excludes 0."
    else:
        note = (f"{len(vs)} of {n_all} comparisons have an interval that excludes 0; the others are not listed "
                f"(all are in the plot below and in plots/comparisons.csv).")
    return (f'<section id="verdicts"><h2>Verdicts</h2><p class="muted">{esc(note)}</p>'
            f'<ul class="verdicts">{lines}</ul></section>')


def _plots_section(figs: list[tuple[Path, str]], bench_dir: Path) -> str:
    items = "".join(f'<figure class="plot"><img src="{_href(p.relative_to(bench_dir).as_posix())}" alt="{esc(c)}">'
                    f'<figcaption class="muted">{esc(c)}</figcaption></figure>' for p, c in figs)
    return f'<section id="plots"><h2>Plots</h2>{items or "<p class=muted>Nothing to plot.</p>"}</section>'


def _per_category_section(b: Bench) -> str:
    pc = b.per_category
    if pc.empty:
        return '<section id="per-category"><h2>Per category</h2><p class="muted">No per-category table.</p></section>'
    means = _cat_means(b)
    metrics = b.ordered(pc["metric"].astype(str))
    cats = _sorted_categories(pc["category"])
    sig = {(str(r["model"]), str(r["baseline"]), str(r["category"]), str(r["metric"])): excludes_zero(r["lo"], r["hi"])
           for r in b.comparisons_by_category.to_dict("records")}
    sig.update({(m, base, "all", metric): True for m, base, metric in
                ((v.model, v.baseline, v.metric) for v in verdicts(b))})
    head1 = "<tr><th rowspan='2'>category</th><th rowspan='2'>n</th>" + "".join(
        f'<th colspan="{len(b.models) + len(b.pairs)}" title="{esc(b.info.get(m, MetricInfo(m)).description)}">'
        f'{esc(m + b.info.get(m, MetricInfo(m)).arrow)}</th>' for m in metrics) + "</tr>"
    head2 = "<tr>" + "".join("".join(f"<th>{esc(x)}</th>" for x in b.models) +
                             "".join(f"<th>{esc(m)} − {esc(base)}</th>" for m, base in b.pairs)
                             for _ in metrics) + "</tr>"
    rows = []
    for cat in cats:
        ns = [v[2] for (mo, c, _), v in means.items() if c == cat and mo == b.models[0]] or [0]
        cells = [f"<th>{esc(cat)}</th><td class='num'>{int(max(ns))}</td>"]
        for metric in metrics:
            info = b.info.get(metric, MetricInfo(metric))
            for model in b.models:
                v = means.get((model, cat, metric))
                cells.append(f'<td class="num" data-model="{esc(model)}" data-metric="{esc(metric)}" '
                             f'title="{"" if v is None else esc(f"mean {fmt(v[0])} ± {fmt(v[1])}, n={int(v[2])}")}">'
                             f'{fmt(v[0]) if v else "–"}</td>')
            for model, base in b.pairs:
                a, c = means.get((model, cat, metric)), means.get((base, cat, metric))
                if a is None or c is None:
                    cells.append("<td class='num'>–</td>")
                    continue
                d = a[0] - c[0]
                if not math.isfinite(d):  # a mean that is NaN (nothing measured) or infinite: no difference
                    cells.append(f'<td class="num" data-model="{esc(model)}" data-baseline="{esc(base)}" '
                                 f'data-metric="{esc(metric)}">–</td>')
                    continue
                cls = ["diff"] + ({1: ["good"], -1: ["bad"]}.get(int(np.sign(d) * info.sign), []))
                if sig.get((model, base, cat, metric)):
                    cls.append("sig")
                cells.append(f'<td class="num {" ".join(cls)}" data-model="{esc(model)}" data-baseline="{esc(base)}" '
                             f'data-metric="{esc(metric)}">{fmt(d, sign=True)}</td>')
        rows.append(f'<tr data-category="{esc(cat)}">{"".join(cells)}</tr>')
    return ('<section id="per-category"><h2>Per category</h2><p class="muted">Mean per image in each category '
            '(hover for ± std and n); differences to the baseline in green where better, red where worse, bold where '
            'the bench\'s interval excludes 0. n: images per model.</p>'
            f'<div class="scroll"><table class="per-category">{head1}{head2}{"".join(rows)}</table></div></section>')


def _set_section(b: Bench) -> str:
    sm = b.set_metrics
    if sm.empty:
        return '<section id="set-metrics"><h2>Set metrics</h2><p class="muted">No set metrics.</p></section>'
    vals = {(str(r["model"]), str(r["metric"])): r for r in sm.to_dict("records")}
    models = [m for m in b.models if any(k[0] == m for k in vals)] + sorted(
        {k[0] for k in vals} - set(b.models))
    rows = []
    for metric in b.ordered(sm["metric"].astype(str)):
        info = b.info.get(metric, MetricInfo(metric))
        cells = []
        for m in models:
            r = vals.get((m, metric))
            cells.append("<td class='num'>–</td>" if r is None else
                         f'<td class="num" data-model="{esc(m)}" data-metric="{esc(metric)}">{fmt(r["value"])} '
                         f'<span class="muted">[{fmt(r["lo"])}, {fmt(r["hi"])}]</span></td>')
        rows.append(f"<tr><th>{esc(metric + info.arrow)}</th>{''.join(cells)}<td class='muted'>"
                    f"{esc(info.description)}</td></tr>")
    head = "<tr><th>metric</th>" + "".join(f"<th>{esc(m)}</th>" for m in models) + "<th>what</th></tr>"
    return ('<section id="set-metrics"><h2>Set metrics</h2><p class="muted">Computed over a model\'s whole set '
            f'of images; value [interval].</p><table class="set-metrics">{head}{"".join(rows)}</table></section>')


def _score_text(b: Bench, row: dict, metric: str | None) -> str:
    return "" if metric is None or metric not in row else f"{metric} {fmt(row[metric])}"


def _grids_section(b: Bench, thumbs: Thumbs, assets: Path, n: int) -> tuple[str, list[Path]]:
    choices = grid_choices(b, n)
    s = b.scores.assign(_pid=b.scores["prompt_id"].astype(str), _seed=b.scores["seed"].astype(int))
    pair, metric = _primary_pair(b), b.main_metric
    blocks, composites = [], []
    for k, (pid, seed, _gain) in enumerate(choices):
        rows = {str(r["model"]): r for r in s[(s["_pid"] == pid) & (s["_seed"] == seed)].to_dict("records")}
        if not rows:
            continue
        first = next(iter(rows.values()))
        base_row = rows.get(pair[1]) if pair else None
        tiles = []
        for model in b.models:
            r = rows.get(model)
            if r is None:
                continue
            cap = f"<b>{esc(model)}</b> {esc(_score_text(b, r, metric))}"
            if base_row is not None and model != pair[1] and metric:
                cap += f' <span class="muted">({esc(fmt(r[metric] - base_row[metric], sign=True))} vs {esc(pair[1])})</span>'
            tiles.append(_tile(thumbs, r, cap))
        what = ""
        if pair and metric and pair[0] in rows and pair[1] in rows:
            what = f" · {pair[0]} − {pair[1]}: {fmt(rows[pair[0]][metric] - rows[pair[1]][metric], sign=True)} {metric}"
        blocks.append(f'<div class="grid-block" data-prompt-id="{esc(pid)}" data-seed="{seed}">'
                      f'<h3>{esc(pid)} · seed {seed}<span class="muted">{esc(what)}</span></h3>'
                      f'<p><q>{esc(str(first["prompt"]))}</q> <span class="muted">{esc(str(first["categories"]))}</span></p>'
                      f'<div class="grid">{"".join(tiles)}</div></div>')
        composites.append(_composite(b, [rows[m] for m in b.models if m in rows], metric,
                                     assets / "grids" / f"{k:02d}_{_safe(pid)}_s{seed}.png"))
    intro = (f"The same prompt and seed for every model: the prompts where {pair[0]} differs most from {pair[1]} in "
             f"{metric} (largest gains first, then largest losses). Click an image for the full resolution."
             if pair and metric else "The same prompt and seed for every model.")
    return (f'<section id="grids"><h2>Side by side</h2><p class="muted">{esc(intro)}</p>{"".join(blocks)}</section>',
            composites)


def _composite(b: Bench, rows: list[dict], metric: str | None, out: Path) -> Path:
    """One PNG of a grid (models side by side, labelled), for MLflow."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    tiles = []
    for r in rows:
        try:
            with Image.open(b.dir / str(r["image"])) as im:
                im = fit_thumbnail(im.convert("RGB"))
        except Exception:
            im = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
        tiles.append(im)
    pad, top, label = 4, 22, 36
    w = sum(t.width for t in tiles) + pad * (len(tiles) + 1)
    h = max(t.height for t in tiles) + top + label + pad
    sheet = Image.new("RGB", (max(w, 200), h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    prompt = str(rows[0]["prompt"])
    max_chars = max(10, sheet.width // 7)
    draw.text((pad, 4), prompt if len(prompt) <= max_chars else prompt[: max_chars - 1] + "…", fill=(0, 0, 0), font=font)
    x = pad
    for r, t in zip(rows, tiles):
        sheet.paste(t, (x, top))
        draw.text((x, top + t.height + 3), str(r["model"])[:30], fill=(0, 0, 0), font=font)
        draw.text((x, top + t.height + 18), _score_text(b, r, metric)[:36], fill=(90, 90, 90), font=font)
        x += t.width + pad
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _worst_section(b: Bench, thumbs: Thumbs, k: int) -> str:
    blocks = []
    for metric in worst_metrics(b):
        info = b.info[metric]
        is_flag = metric.startswith("artifact/")
        if is_flag:
            rate = []
            for m in b.models:
                col = b.scores.loc[b.scores["model"].astype(str) == m, metric].dropna()
                rate.append(f"{m} {int((col >= 0.5).sum())}/{len(col)}")
            extra = " · flagged: " + ", ".join(rate)
        else:
            extra = f" · the {k} {'lowest' if info.sign > 0 else 'highest'} per model"
        rows_html = []
        for m in b.models:
            worst, by = worst_rows(b, metric, m, k)
            tiles = []
            for r in worst.to_dict("records"):
                score = f"{metric} {fmt(r[metric])}"
                if by and by != metric:
                    score += f" · {by} {fmt(r[by])}"
                tiles.append(_tile(thumbs, r, f"{esc(str(r['prompt_id']))} s{int(r['seed'])}<br>{esc(score)}<br>"
                                              f'<span class="muted">{esc(str(r["prompt"])[:80])}</span>'))
            body = "".join(tiles) or '<p class="muted">no image flagged</p>'
            rows_html.append(f'<div class="grid" data-model="{esc(m)}"><div class="rowlabel">{esc(m)}</div>{body}</div>')
        opened = " open" if is_flag or metric == b.main_metric else ""
        blocks.append(f'<details class="worst" data-metric="{esc(metric)}"{opened}><summary><b>{esc(metric + info.arrow)}</b>'
                      f' <span class="muted">{esc(info.description)}{esc(extra)}</span></summary>{"".join(rows_html)}</details>')
    body = "".join(blocks) or '<p class="muted">No per-image metric with a direction.</p>'
    return (f'<section id="worst-cases"><h2>Worst cases</h2><p class="muted">Per artifact, the flagged images '
            f'(ranked by the matching part score); per metric, the worst {k} images of each model.</p>{body}</section>')


def _glossary(b: Bench) -> str:
    rows = "".join(f"<tr><th>{esc(m)}</th><td>{esc(i.kind)}</td><td>{esc({1: 'higher', -1: 'lower', 0: '–'}[i.sign])}"
                   f"</td><td>{esc(i.description)}</td></tr>" for m, i in b.info.items())
    return ('<section id="metrics-info"><h2>Metrics</h2><table><tr><th>metric</th><th>kind</th><th>better</th>'
            f'<th>description</th></tr>{rows}</table></section>')


def render_html(b: Bench, assets: Path, *, grid_prompts: int = GRID_PROMPTS, worst_k: int = WORST_K) -> tuple[str, list[Path]]:
    """The page and the files it made under ``assets`` (plots, thumbnails, grid composites)."""
    (assets / "plots").mkdir(parents=True, exist_ok=True)
    figs = [(plot_comparisons(b, assets / "plots" / "comparisons.png"),
             "Difference to the baseline per metric, with the bench's interval."),
            (plot_category_heatmap(b, assets / "plots" / "per_category_heatmap.png"),
             "Per category: difference to the baseline in units of the baseline's std (green: better)."),
            (plot_main_by_category(b, assets / "plots" / "main_by_category.png"),
             f"{b.main_metric} per category and model (mean ± standard error).")]
    figs = [(p, c) for p, c in figs if p is not None]
    thumbs = Thumbs(b, assets)
    vs = verdicts(b)
    grids_html, composites = _grids_section(b, thumbs, assets, grid_prompts)
    nav = " · ".join(f'<a href="#{i}">{t}</a>' for i, t in (
        ("verdicts", "verdicts"), ("plots", "plots"), ("per-category", "per category"), ("set-metrics", "set metrics"),
        ("grids", "side by side"), ("worst-cases", "worst cases"), ("metrics-info", "metrics")))
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>PortraitBench report</title>"
            f"<style>{CSS}</style></head><body><h1>PortraitBench report</h1>{_header(b, len(vs))}<p>{nav}</p>"
            f"{_verdict_section(b, vs)}{_plots_section(figs, b.dir)}{_per_category_section(b)}{_set_section(b)}"
            f"{grids_html}{_worst_section(b, thumbs, worst_k)}{_glossary(b)}</body></html>\n")
    return page, [p for p, _ in figs] + composites + [b.dir / t for t in thumbs.done.values()]


# ---------------------------------------------------------------------------------------------- dvc plots
def _field(name: str) -> str:
    """A DVC/Vega-Lite field name: '.' and brackets would be read as nested access."""
    return re.sub(r"[.\[\]]", "_", name)


def write_plot_data(b: Bench, out_dir: Path) -> list[Path]:
    """``comparisons.csv`` (one row per comparison; ``label`` names it) and ``per_category.csv`` (one row per
    category; ``<model>/<metric>`` means and ``<model>_vs_<baseline>/<metric>`` differences)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    order = {m: i for i, m in enumerate(b.info)}
    pair_order = {p: i for i, p in enumerate(b.pairs)}
    comp = b.comparisons.copy()
    comp["model"], comp["baseline"], comp["metric"] = (comp[c].astype(str) for c in ("model", "baseline", "metric"))
    comp = comp.assign(_p=[pair_order[(m, base)] for m, base in zip(comp["model"], comp["baseline"])],
                       _m=[order.get(m, len(order)) for m in comp["metric"]])
    comp = comp.sort_values(["_p", "_m", "metric"], kind="stable")
    signs = np.array([b.info.get(m, MetricInfo(m)).sign for m in comp["metric"]], dtype=float)
    table = pd.DataFrame({
        "label": [f"{m} vs {base}: {metric}" for m, base, metric in zip(comp["model"], comp["baseline"], comp["metric"])],
        "comparison": [f"{m} vs {base}" for m, base in zip(comp["model"], comp["baseline"])],
        "model": comp["model"], "baseline": comp["baseline"], "metric": comp["metric"],
        "diff": comp["diff"].astype(float), "lo": comp["lo"].astype(float), "hi": comp["hi"].astype(float),
        "improvement": np.where(signs != 0, signs * comp["diff"].astype(float), np.nan),
        "mean_model": comp["mean_model"].astype(float), "mean_baseline": comp["mean_baseline"].astype(float),
        "n_pairs": comp["n_pairs"], "verdict": comp["verdict"].fillna("").astype(str),
        "significant": [int(excludes_zero(lo, hi)) for lo, hi in zip(comp["lo"], comp["hi"])]})
    comparisons = out_dir / "comparisons.csv"
    table.to_csv(comparisons, index=False, float_format="%.6g")

    means = _cat_means(b)
    metrics = b.ordered(b.per_category["metric"].astype(str))
    rows = []
    for cat in _sorted_categories(b.per_category["category"]):
        ns = [v[2] for (mo, c, _), v in means.items() if c == cat and mo == (b.models[0] if b.models else mo)] or [0]
        row: dict[str, Any] = {"category": cat, "n": int(max(ns))}
        for model in b.models:
            for metric in metrics:
                row[_field(f"{model}/{metric}")] = means.get((model, cat, metric), (np.nan,))[0]
        for model, base in b.pairs:
            for metric in metrics:
                a, c = means.get((model, cat, metric)), means.get((base, cat, metric))
                row[_field(f"{model}_vs_{base}/{metric}")] = np.nan if a is None or c is None else a[0] - c[0]
        rows.append(row)
    per_category = out_dir / "per_category.csv"
    pd.DataFrame(rows, columns=list(rows[0]) if rows else ["category", "n"]).to_csv(
        per_category, index=False, float_format="%.6g")
    return [comparisons, per_category]


# ---------------------------------------------------------------------------------------------- mlflow
def _metric_key(*parts: str) -> str:
    """MLflow accepts letters, digits, '_', '-', '.', ' ', ':' and '/' in a metric name."""
    return "/".join(re.sub(r"[^\w\-. :/]", "_", p) for p in parts)


def mlflow_metrics(b: Bench) -> dict[str, float]:
    """``bench/<model>/<metric>`` (mean over all images, or the set metric's value) and
    ``bench/<model>_vs_<baseline>/<metric>/{diff,lo,hi}``; non-finite values are left out."""
    out: dict[str, float] = {}
    for r in b.per_category[b.per_category["category"].astype(str) == "all"].to_dict("records"):
        out[_metric_key("bench", str(r["model"]), str(r["metric"]))] = float(r["mean"])
    for r in b.set_metrics.to_dict("records"):
        out[_metric_key("bench", str(r["model"]), str(r["metric"]))] = float(r["value"])
    for r in b.comparisons.to_dict("records"):
        pair = f"{r['model']}_vs_{r['baseline']}"
        for k in ("diff", "lo", "hi"):
            out[_metric_key("bench", pair, str(r["metric"]), k)] = float(r[k])
    return {k: v for k, v in out.items() if math.isfinite(v)}


def log_to_mlflow(b: Bench, tracker, report: Path, files: list[Path]) -> None:
    """Metrics, ``scores.parquet`` as an MLflow table, and the report with its assets as artifacts."""
    if tracker is None or not getattr(tracker, "enabled", False):
        return
    metrics = mlflow_metrics(b)
    items = sorted(metrics.items())
    for i in range(0, len(items), 500):  # well under MLflow's 1000 metrics per batch
        tracker.log_metrics(dict(items[i:i + 500]), step=0)
    if hasattr(tracker, "log_table"):
        tracker.log_table(b.scores, "bench/scores.json")
    else:  # until Tracker grows log_table: the same call on the tracker's own run
        import mlflow

        mlflow.log_table(b.scores, artifact_file="bench/scores.json", run_id=tracker.run_id)
    tracker.log_artifact(report, "bench")
    assets = b.dir / "report_assets"
    if hasattr(tracker, "log_artifacts") and assets.is_dir():  # one call for the folder (a remote store)
        tracker.log_artifacts(assets, "bench/report_assets")
        files = [f for f in files if assets not in f.parents]
    for f in files:
        rel = f.relative_to(b.dir).parent.as_posix()
        tracker.log_artifact(f, "bench" if rel == "." else f"bench/{rel}")
    for name in ("metrics.json", "metrics_info.json"):
        if (b.dir / name).is_file():
            tracker.log_artifact(b.dir / name, "bench")


# ---------------------------------------------------------------------------------------------- entry
def write_report(bench_dir: Path, tracker=None, *, main_metric: str | None = None, grid_prompts: int = GRID_PROMPTS,
                 worst_k: int = WORST_K) -> Path:
    """Write ``report.html`` (+ ``report_assets/``) and ``plots/*.csv`` into ``bench_dir``; log them, the
    metrics and the scores table to MLflow when ``tracker`` is enabled. Returns the report's path."""
    bench_dir = Path(bench_dir)
    b = load_bench(bench_dir, main_metric)
    assets = bench_dir / "report_assets"
    if assets.is_dir():  # rebuilt from scratch: no thumbnail of an earlier bench survives
        shutil.rmtree(assets)
    page, asset_files = render_html(b, assets, grid_prompts=grid_prompts, worst_k=worst_k)
    plot_files = write_plot_data(b, bench_dir / "plots")
    report = bench_dir / "report.html"
    atomic_write_text(report, page)
    log_to_mlflow(b, tracker, report, asset_files + plot_files)
    log.info("bench report: %s (%d verdicts, %d asset files)", report, len(verdicts(b)), len(asset_files))
    return report

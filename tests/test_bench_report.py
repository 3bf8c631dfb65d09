"""PortraitBench's report on a synthetic bench folder built to the bench stage's file contract (no bench
code is imported): the HTML's sections, verdicts, escaping and images (also as Chromium renders them),
the DVC plot data, and what lands in MLflow."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from portraitgen.bench.report import BenchReportError, fmt, write_report

MODELS = ("base", "grpo", "exemplar")
PROMPTS = {  # prompt_id -> (prompt, categories)
    "p000": ("a close-up portrait of an old man, golden hour", "shot:headshot,light:golden_hour,age:old"),
    "p001": ("a woman with freckles & curly hair <script>alert('x')</script>", "shot:headshot,stress:freckles"),
    "p002": ("a half-body photo of a man with glasses, studio light", "shot:half,light:studio,stress:glasses"),
    "p003": ("two friends laughing outdoors", "shot:half,light:daylight,group:2"),
}
SEEDS = (0, 1)
INFO = {
    "ai_portrait_classic": {"description": "AI-Portrait reward (classic)", "higher_is_better": True, "kind": "image"},
    "ai_portrait_classic/oily": {"description": "specular highlights on skin", "higher_is_better": True, "kind": "image"},
    "artifact/oily": {"description": "oily skin (part score below the real set's 5 %)", "higher_is_better": False,
                      "kind": "image"},
    "face_detected": {"description": "a face was found", "higher_is_better": True, "kind": "image"},
    "diversity": {"description": "mean pairwise distance across seeds", "higher_is_better": True, "kind": "prompt"},
    "feature_distance": {"description": "distance of feature statistics to the real set", "higher_is_better": False,
                         "kind": "set"},
}
# (model, baseline, metric, diff, lo, hi, verdict): the interval excludes 0 in exactly three rows.
COMPARISONS = [
    ("grpo", "base", "ai_portrait_classic", 0.041, 0.012, 0.07, "better"),
    ("grpo", "base", "ai_portrait_classic/oily", 0.02, -0.01, 0.05, ""),
    ("grpo", "base", "artifact/oily", -0.25, -0.5, -0.01, "better"),
    ("grpo", "base", "face_detected", 0.0, -0.1, 0.1, ""),
    ("grpo", "base", "diversity", 0.01, np.nan, np.nan, ""),
    ("exemplar", "base", "ai_portrait_classic", -0.02, -0.05, 0.01, ""),
    ("exemplar", "base", "feature_distance", 0.3, 0.1, 0.5, "worse"),
]
EXPECTED_VERDICTS = [
    "grpo vs base: ai_portrait_classic +0.041 [0.012, 0.07] better",
    "grpo vs base: artifact/oily -0.25 [-0.5, -0.01] better",
    "exemplar vs base: feature_distance +0.3 [0.1, 0.5] worse",
]


def make_bench(folder: Path) -> Path:
    """A finished bench folder: 3 models x 4 prompts x 2 seeds of 24 px images, with every table."""
    rng = np.random.default_rng(0)
    rows = []
    for mi, model in enumerate(MODELS):
        (folder / "images" / model).mkdir(parents=True, exist_ok=True)
        for pi, (pid, (prompt, cats)) in enumerate(PROMPTS.items()):
            for seed in SEEDS:
                colour = np.array([60 + 60 * mi, 40 + 50 * pi, 80 + 100 * seed], dtype=np.uint8)
                arr = np.clip(colour + rng.integers(-30, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
                rel = f"images/{model}/{pid}_s{seed}.png"
                Image.fromarray(arr).save(folder / rel)
                oily = float(np.round(0.3 + 0.1 * mi + 0.15 * pi - 0.05 * seed, 3))
                rows.append({"model": model, "prompt_id": pid, "prompt": prompt, "categories": cats, "seed": seed,
                             "image": rel, "ai_portrait_classic": 0.5 + 0.04 * mi * (pi - 1) + (0.01 + 0.005 * mi) * seed,
                             "ai_portrait_classic/oily": oily, "artifact/oily": float(oily < 0.56 and model != "exemplar"),
                             "face_detected": float(not (pid == "p003" and model == "base")),
                             "diversity": 0.2 + 0.01 * pi})
    scores = pd.DataFrame(rows)
    scores.to_parquet(folder / "scores.parquet", index=False)
    (folder / "metrics_info.json").write_text(json.dumps(INFO))
    long = scores.assign(category=scores["categories"].str.split(",")).explode("category")
    long = pd.concat([scores.assign(category="all"), long])
    per_cat = [{"model": m, "category": c, "metric": metric, "mean": float(g[metric].mean()),
                "std": float(g[metric].std(ddof=0)), "n": len(g)}
               for (m, c), g in long.groupby(["model", "category"], sort=False)
               for metric in INFO if INFO[metric]["kind"] != "set"]
    pd.DataFrame(per_cat).to_parquet(folder / "per_category.parquet", index=False)
    pd.DataFrame([{"model": m, "metric": "feature_distance", "value": 1.0 + 0.3 * i, "lo": 0.9 + 0.3 * i,
                   "hi": 1.1 + 0.3 * i} for i, m in enumerate(MODELS)]).to_parquet(folder / "set_metrics.parquet",
                                                                                 index=False)
    pd.DataFrame([{"model": m, "baseline": b, "metric": metric, "mean_model": 0.5 + d, "mean_baseline": 0.5,
                   "diff": d, "lo": lo, "hi": hi, "n_pairs": 8, "verdict": v}
                  for m, b, metric, d, lo, hi, v in COMPARISONS]).to_parquet(folder / "comparisons.parquet", index=False)
    (folder / "metrics.json").write_text(json.dumps({"suite": "portraitbench-test-v1", "grpo/ai_portrait_classic": 0.5}))
    return folder


class Page(HTMLParser):
    """What the tests look at: element ids, verdict lines, images, table cells, script elements."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.imgs, self.verdicts, self.cells, self.scripts, self.links = set(), [], [], [], 0, []
        self._li = self._td = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a["src"])
        if tag in ("link", "a") and a.get("href"):
            self.links.append(a["href"])
        if tag == "script":
            self.scripts += 1
        if tag == "li" and "verdict" in a.get("class", "").split():
            self._li = [a, ""]
        if tag == "td" and "data-metric" in a:
            self._td = [a, ""]

    def handle_data(self, data):
        if self._li is not None:
            self._li[1] += data
        if self._td is not None:
            self._td[1] += data

    def handle_endtag(self, tag):
        if tag == "li" and self._li is not None:
            self.verdicts.append(self._li)
            self._li = None
        if tag == "td" and self._td is not None:
            self.cells.append(self._td)
            self._td = None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    bench = make_bench(tmp_path_factory.mktemp("bench"))
    return write_report(bench, None)


def test_report_has_every_section_and_only_significant_verdicts(report):
    text = report.read_text(encoding="utf-8")
    page = Page(text)
    assert {"summary", "verdicts", "plots", "per-category", "set-metrics", "grids", "worst-cases"} <= page.ids
    assert [line for _, line in page.verdicts] == EXPECTED_VERDICTS
    assert [a["class"] for a, _ in page.verdicts] == ["verdict better", "verdict better", "verdict worse"]
    assert "portraitbench-test-v1" in text and "3 of 7 comparisons" in text
    # Every image is a local file of the bench folder; nothing is fetched from the network; no script.
    assert page.imgs and all((report.parent / src).is_file() for src in page.imgs)
    assert not any(s.startswith(("http:", "https:", "//")) for s in page.imgs + page.links)
    assert page.scripts == 0
    assert all((report.parent / h).is_file() for h in page.links if not h.startswith("#"))
    # The per-category table: grpo - base in ai_portrait_classic for the headshots, from the means.
    pc = pd.read_parquet(report.parent / "per_category.parquet").set_index(["model", "category", "metric"])["mean"]
    want = pc["grpo", "shot:headshot", "ai_portrait_classic"] - pc["base", "shot:headshot", "ai_portrait_classic"]
    diff_cells = [(a, t) for a, t in page.cells if a.get("data-baseline") == "base" and a.get("data-model") == "grpo"
                  and a["data-metric"] == "ai_portrait_classic"]
    assert len(diff_cells) == len(pd.read_parquet(report.parent / "per_category.parquet")["category"].unique())
    assert fmt(want, sign=True) in [t for _, t in diff_cells]
    assert any("good" in a["class"] and "sig" in a["class"] for a, _ in diff_cells)  # the "all" row: a verdict
    set_cells = {a["data-model"]: t for a, t in page.cells if a["data-metric"] == "feature_distance"}
    assert set_cells["exemplar"].startswith("1.6") and "[1.5, 1.7]" in set_cells["exemplar"]


def test_user_text_is_escaped(report):
    text = report.read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "freckles &amp; curly hair" in text


def test_grids_show_each_model_and_worst_cases_the_flagged_images(report):
    text = report.read_text(encoding="utf-8")
    grids = text[text.index('id="grids"'):text.index('id="worst-cases"')]
    # grpo - base in ai_portrait_classic is 0.04 * (prompt index - 1) + 0.005 * seed: the largest gains on
    # p003, p002, p001 (seed 1), the largest loss on p000 (seed 0). Each grid shows all three models.
    order = [grids.index(f'data-prompt-id="{p}" data-seed="{sd}"') for p, sd in
             (("p003", 1), ("p002", 1), ("p001", 1), ("p000", 0))]
    assert order == sorted(order)
    block = grids[grids.index('data-prompt-id="p003"'):].split("grid-block")[0]
    assert all(f"{m} p003 seed 1" in block for m in MODELS)
    grid_pngs = sorted((report.parent / "report_assets" / "grids").glob("*.png"))
    assert len(grid_pngs) == 4
    # 24 px images are enlarged by whole pixels, so each model's label and score fit under its tile:
    # tiles of 240 px (x10), not 24 px ones whose labels overlap.
    sheet = np.asarray(Image.open(grid_pngs[0]).convert("RGB"))
    assert sheet.shape[1] >= 3 * 240
    tile = sheet[22:22 + 240, 4:4 + 240]
    assert (tile[::10, ::10].repeat(10, 0).repeat(10, 1) == tile).all()  # nearest neighbour: 10x10 blocks
    thumb = next((report.parent / "report_assets" / "thumbs").rglob("*.jpg"))
    assert max(Image.open(thumb).size) == 240
    worst = text[text.index('id="worst-cases"'):]
    oily = worst[worst.index('data-metric="artifact/oily"'):].split("</details>")[0]
    scores = pd.read_parquet(report.parent / "scores.parquet")
    flagged = scores[(scores["model"] == "base") & (scores["artifact/oily"] == 1)]
    assert len(flagged) == 5 and "base 5/8" in oily and "exemplar 0/8" in oily
    base_row = oily[oily.index('data-model="base"'):oily.index('data-model="grpo"')]
    shown = [f"{r.prompt_id} s{r.seed}<" for r in flagged.sort_values(["ai_portrait_classic/oily", "prompt_id"]).itertuples()]
    positions = [base_row.find(x) for x in shown]
    assert all(p >= 0 for p in positions[:4]) and positions[:4] == sorted(positions[:4]) and positions[4] == -1
    exemplar_row = oily[oily.index('data-model="exemplar"'):]
    assert "no image flagged" in exemplar_row and "<img" not in exemplar_row
    lowest = worst[worst.index('data-metric="face_detected"'):].split("</details>")[0]
    base_row = lowest[lowest.index('data-model="base"'):lowest.index('data-model="grpo"')]
    assert base_row.index("p003 s0<") < base_row.index("p003 s1<") < base_row.index("p000 s0<")  # no face first


def test_dvc_plot_data(report):
    plots = report.parent / "plots"
    comp = pd.read_csv(plots / "comparisons.csv")
    assert list(comp.columns[:8]) == ["label", "comparison", "model", "baseline", "metric", "diff", "lo", "hi"]
    assert len(comp) == len(COMPARISONS) and comp["label"].is_unique
    assert comp["significant"].sum() == 3
    row = comp.set_index("label").loc["grpo vs base: artifact/oily"]
    assert row["improvement"] == pytest.approx(0.25) and row["verdict"] == "better"
    pc = pd.read_csv(plots / "per_category.csv")
    cats = {t for c in PROMPTS.values() for t in c[1].split(",")}
    assert pc["category"].tolist()[0] == "all" and set(pc["category"]) == cats | {"all"}
    assert {"base/ai_portrait_classic", "grpo_vs_base/ai_portrait_classic", "exemplar_vs_base/artifact/oily"} <= set(pc.columns)
    all_row = pc.set_index("category").loc["all"]
    assert all_row["grpo_vs_base/ai_portrait_classic"] == pytest.approx(
        all_row["grpo/ai_portrait_classic"] - all_row["base/ai_portrait_classic"], abs=1e-5)
    assert all_row["n"] == len(PROMPTS) * len(SEEDS)


def test_report_is_deterministic_and_needs_the_scores(report, tmp_path):
    again = make_bench(tmp_path / "bench")
    assert write_report(again, None).read_bytes() == report.read_bytes()
    (again / "scores.parquet").unlink()
    with pytest.raises(BenchReportError, match="scores.parquet"):
        write_report(again, None)


def test_a_single_model_without_comparisons_or_set_metrics(tmp_path):
    bench = make_bench(tmp_path / "bench")
    scores = pd.read_parquet(bench / "scores.parquet")
    scores[scores["model"] == "grpo"].to_parquet(bench / "scores.parquet", index=False)
    pc = pd.read_parquet(bench / "per_category.parquet")
    pc[pc["model"] == "grpo"].to_parquet(bench / "per_category.parquet", index=False)
    (bench / "comparisons.parquet").unlink()
    (bench / "set_metrics.parquet").unlink()
    page = Page((text := write_report(bench, None).read_text()))
    assert page.verdicts == [] and "No comparisons in this bench" in text
    assert "set_metrics.parquet, comparisons.parquet" in text  # named as missing in the header
    assert all((bench / src).is_file() for src in page.imgs) and len(list((bench / "report_assets/grids").glob("*.png"))) == 4
    assert pd.read_csv(bench / "plots/comparisons.csv").empty
    assert list(pd.read_csv(bench / "plots/per_category.csv").columns[:3]) == ["category", "n", "grpo/ai_portrait_classic"]


def test_a_nan_category_mean_shows_no_difference(tmp_path):
    """A per-category mean that is NaN (nothing measured there) gives "–" as its difference, not a crash."""
    bench = make_bench(tmp_path / "bench")
    pc = pd.read_parquet(bench / "per_category.parquet")
    hole = (pc["model"] == "grpo") & (pc["category"] == "stress:freckles") & (pc["metric"] == "artifact/oily")
    assert hole.sum() == 1
    pc.loc[hole, ["mean", "std"]] = np.nan
    pc.to_parquet(bench / "per_category.parquet", index=False)
    text = write_report(bench, None).read_text()
    row = text[text.index('<tr data-category="stress:freckles">'):].split("</tr>")[0]
    cell = Page(row).cells
    diff = [v for a, v in cell if a.get("data-model") == "grpo" and a.get("data-baseline") == "base"
            and a["data-metric"] == "artifact/oily"]
    assert diff == ["–"]
    other = [v for a, v in cell if a.get("data-model") == "exemplar" and a.get("data-baseline") == "base"
             and a["data-metric"] == "artifact/oily"]
    assert other and other[0] != "–"  # the other model's difference in that category is still shown


def test_mlflow_gets_metrics_table_and_report(report, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from portraitgen.config import TrackingConfig
    from portraitgen.tracking import Tracker

    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts go to ./mlruns
    bench = tmp_path / "bench"
    shutil.copytree(report.parent, bench)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="bench-test"), stage="bench", active=True)
    try:
        write_report(bench, tracker)
    finally:
        tracker.end()
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    m = run.data.metrics
    pc = pd.read_parquet(bench / "per_category.parquet").set_index(["model", "category", "metric"])["mean"]
    assert m["bench/grpo/ai_portrait_classic"] == pytest.approx(pc["grpo", "all", "ai_portrait_classic"])
    assert m["bench/exemplar/feature_distance"] == pytest.approx(1.6)
    assert m["bench/grpo_vs_base/ai_portrait_classic/diff"] == pytest.approx(0.041)
    assert m["bench/grpo_vs_base/artifact/oily/lo"] == pytest.approx(-0.5)
    assert "bench/grpo_vs_base/diversity/lo" not in m  # NaN intervals are left out
    top = {a.path for a in client.list_artifacts(run.info.run_id, "bench")}
    assert {"bench/report.html", "bench/scores.json", "bench/plots", "bench/report_assets", "bench/metrics.json"} <= top
    assets = {a.path for a in client.list_artifacts(run.info.run_id, "bench/report_assets")}
    assert {"bench/report_assets/grids", "bench/report_assets/plots", "bench/report_assets/thumbs"} <= assets
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "bench/scores.json", str(tmp_path))).read_text())
    assert len(table["data"]) == len(MODELS) * len(PROMPTS) * len(SEEDS) and "ai_portrait_classic" in table["columns"]


def test_chromium_renders_the_report(report, tmp_path):
    from browser import chromium_or_skip, dump_dom, screenshot, undecoded_images

    binary = chromium_or_skip()
    dom = dump_dom(binary, report)
    page = Page(dom)
    assert {"verdicts", "per-category", "set-metrics", "grids", "worst-cases"} <= page.ids
    assert [line for _, line in page.verdicts] == EXPECTED_VERDICTS
    assert len([a for a, _ in page.cells if a.get("data-baseline")]) > 0
    assert len(page.imgs) >= 3 * 4 + 3 and all((report.parent / s).is_file() for s in page.imgs)
    # Did the browser decode every image?
    assert undecoded_images(binary, report) == (len(page.imgs), [])
    shot = Image.open(screenshot(binary, report, tmp_path / "report.png")).convert("L")
    pixels = np.asarray(shot, dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and images, not a blank page


def test_a_metric_without_direction_is_neutral_in_the_heatmap(tmp_path):
    """raw_luma-like metrics (higher_is_better: null) get no better/worse colour, only their raw difference."""
    from portraitgen.bench.report import heatmap_values, load_bench, plot_category_heatmap

    bench = make_bench(tmp_path / "bench")
    info = json.loads((bench / "metrics_info.json").read_text())
    info["ai_portrait_classic/oily"]["higher_is_better"] = None
    (bench / "metrics_info.json").write_text(json.dumps(info))
    b = load_bench(bench)
    cats, metrics, zs, raws = heatmap_values(b)
    j = metrics.index("ai_portrait_classic/oily")
    k = metrics.index("ai_portrait_classic")
    for z, raw in zip(zs, raws):
        assert np.isfinite(raw[:, j]).any() and np.isnan(z[:, j]).all()  # shown, but not coloured
        assert np.isfinite(z[:, k]).any()  # a metric with a direction still is
    out = plot_category_heatmap(b, tmp_path / "heatmap.png")
    assert Image.open(out).size[0] > 100

"""PortraitBench: the versioned suite, the measurements, the paired cluster bootstrap, and the stage end to
end on tiny models (base, a trained checkpoint, an exported brightened model, a second copy of the base)."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from portraitgen.bench.compare import cluster_mean_interval, compare_pairs, feature_distance, per_category
from portraitgen.bench.metrics import (ArtifactThresholds, FeatureScaler, analyse_image, image_features, kid,
                                       load_reference, FEATURE_NAMES)
from portraitgen.bench.run import run_bench
from portraitgen.bench.suite import BenchError, build_suite_v1, load_suite
from portraitgen.cli import main
from portraitgen.config import params_from_dict

import helpers


def fast_params(**overrides) -> dict:
    """helpers.fast_params with the bench running the text encoders itself (the repository's params read the
    precompute stage's bench_prompt_embeddings.safetensors); the prompt-embedding tests below set the key."""
    # Only the base model unless a test names others: the repository's params bench results/train, which a
    # fresh clone does not have.
    return helpers.fast_params(**{"bench.prompt_embeddings": "", "bench.models": {"base": "base"}, **overrides})


CONTRACT_ID_COLUMNS = ["model", "prompt_id", "prompt", "categories", "seed", "image"]
SINGLE_AXES = ("people", "shot", "light", "setting", "stress")  # exactly one tag per prompt
PERSON_AXES = ("age", "gender", "skin")  # one per distinct level among the people


# ---------------------------------------------------------------------------------------------- suite
def test_builtin_suite_is_the_generated_file_tagged_and_balanced():
    full = load_suite("builtin:v1", "full")
    assert full == build_suite_v1()  # the shipped file is exactly what the documented generator makes
    assert len(full) == 300 and len({p.id for p in full}) == 300
    for p in full:
        axes = Counter(t.split(":")[0] for t in p.categories)
        assert all(axes[a] == 1 for a in SINGLE_AXES), p
        people = int(next(t for t in p.categories if t.startswith("people:")).split(":")[1])
        assert all(1 <= axes[a] <= people for a in PERSON_AXES), p
        if "stress:beard" in p.categories:
            assert " man with" in p.prompt
    counts = Counter(t for p in full for t in p.categories)
    levels = {}
    for tag, n in counts.items():
        levels.setdefault(tag.split(":")[0], []).append(n)
    for axis in ("light", "setting", "stress", "skin", "age", "gender"):
        assert max(levels[axis]) <= 1.1 * min(levels[axis]), (axis, levels[axis])  # balanced marginals
    assert {"stress:freckles", "stress:hands_near_face", "light:backlit", "people:3", "shot:headshot"} <= set(counts)
    cpu = load_suite("builtin:v1", "cpu")
    assert 24 <= len(cpu) <= 32
    assert {t for p in cpu for t in p.categories} == set(counts)  # every level of every axis is in the cpu subset
    assert Counter(next(t for t in p.categories if t.startswith("people:")) for p in cpu)["people:1"] >= 20


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "prompt": "x", "categories": ["shot:headshot"]}\n{"id": "a", "prompt": "y"}',
     "suite.jsonl:2: duplicate id 'a' (first on line 1)"),
    ('{"id": "a", "prompt": "x"}\nnot json', "suite.jsonl:2: not valid JSON"),
    ('{"id": "a/b", "prompt": "x"}', "suite.jsonl:1: 'id' must be"),
    ('{"id": "a", "prompt": ""}', "suite.jsonl:1: 'prompt' must be a non-empty string"),
    ('{"id": "a", "prompt": "x", "categories": ["headshot"]}', "suite.jsonl:1: category 'headshot' is not of the form"),
    ('{"id": "a", "prompt": "x", "tags": []}', "suite.jsonl:1: unknown field 'tags'"),
])
def test_bad_suite_rows_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "suite.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(BenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_suite(str(path), "full")
    with pytest.raises(BenchError, match="no prompt of .* is in subset 'cpu'"):
        load_suite(str(_suite_file(tmp_path / "ok.jsonl", 2)), "cpu")


def _suite_file(path: Path, n: int, subset_every: int = 0) -> Path:
    rows = []
    for i, p in enumerate(load_suite("builtin:v1", "full")[:n]):
        rows.append({"id": p.id, "prompt": p.prompt, "categories": ",".join(p.categories),
                     "subsets": ["mini"] if subset_every and i % subset_every == 0 else []})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_params_without_a_bench_section_load_with_the_defaults():
    data = fast_params()
    del data["bench"]
    bench = params_from_dict(data).bench
    assert bench.suite == "builtin:v1" and bench.models == {"base": "base"} and bench.seeds == (0, 1)
    assert set(bench.reward.components) == {"omni_classic", "ai_portrait_classic"}


# ---------------------------------------------------------------------------------------------- metrics
def _photos(n: int, size: int = 64) -> list[np.ndarray]:
    """Real portraits (crops of the shipped photos) at the bench's resolution."""
    return load_reference("builtin:portraits", size)[0][:n]


def test_artifact_flags_are_calibrated_on_the_real_set_and_catch_overexposure():
    real = _photos(24)
    raws = pd.DataFrame([analyse_image(im)[0] for im in real])
    assert raws["face_detected"].mean() > 0.5 and raws["skin_oily"].notna().sum() >= 5
    thr = ArtifactThresholds.fit(raws, 0.9)
    own = thr.flags(raws)
    # By construction about 10 % of the real set lies beyond its own 90 % quantile, per artifact.
    assert own["artifact/overexposed"].mean() <= 0.15 and own["artifact/oily"].mean() <= 0.15
    bright = [np.clip(im.astype(int) + 90, 0, 255).astype(np.uint8) for im in real]
    flagged = thr.flags(pd.DataFrame([analyse_image(im)[0] for im in bright]))
    assert flagged["artifact/overexposed"].mean() == 1.0 and flagged["artifact/underexposed"].sum() == 0
    assert flagged["artifact/any"].mean() == 1.0
    # A skin flag is undefined (NaN), not 0, on an image without a face.
    flat = np.full((64, 64, 3), 128, np.uint8)
    raw, feats = analyse_image(flat)
    assert raw["face_detected"] == 0 and np.isnan(thr.flags(pd.DataFrame([raw]))["artifact/oily"][0])
    assert feats.shape == (len(FEATURE_NAMES),) and np.isfinite(feats).all()


def test_feature_distance_is_near_zero_for_real_photos_and_grows_with_a_shift():
    real = np.stack([image_features(im) for im in _photos(24)])
    scaler = FeatureScaler.fit(real[::2])
    same, other = scaler(real[::2]), scaler(real[1::2])
    shifted = scaler(np.stack([image_features(np.clip(im.astype(int) + 70, 0, 255).astype(np.uint8))
                               for im in _photos(24)[1::2]]))
    assert kid(other, same) < 0.2 * kid(shifted, same)
    pids = np.array([f"p{i // 2}" for i in range(12)])  # 6 "prompts" of 2 images each
    seeds = np.array([i % 2 for i in range(12)])
    table, comp = feature_distance({"real": (other, pids, seeds), "bright": (shifted, pids, seeds)}, same,
                                   ["real", "bright"], "real", n_boot=300, confidence=0.95, seed=0)
    rows = table.set_index("model")
    assert rows.loc["bright", "lo"] > rows.loc["real", "hi"]
    assert comp.iloc[0]["verdict"] == "worse" and comp.iloc[0]["lo"] > 0 and comp.iloc[0]["n_pairs"] == 12


def test_reference_is_the_bench_split_with_a_logged_fallback(tmp_path, caplog):
    from helpers import make_manifest

    manifest = make_manifest(tmp_path / "curate", n=4, size=32)  # 4 train rows + 1 bench_reference row
    images, what = load_reference(str(manifest), 32)
    assert len(images) == 1 and "bench_reference" in what and images[0].shape == (32, 32, 3)
    df = pd.read_parquet(manifest)
    df[df["split"] == "train"].to_parquet(manifest)
    with caplog.at_level(logging.WARNING):
        images, what = load_reference(str(manifest), 32)
    assert len(images) == 4 and "no rows in split bench_reference" in caplog.text
    with pytest.raises(BenchError, match="bench.reference: not found"):
        load_reference(str(tmp_path / "nope.parquet"), 32)


# ---------------------------------------------------------------------------------------------- bootstrap
def _scores(values: dict[str, np.ndarray], prompts: int, seeds: int) -> pd.DataFrame:
    rows = []
    for model, v in values.items():
        for p in range(prompts):
            for s in range(seeds):
                rows.append({"model": model, "prompt_id": f"p{p:03d}", "prompt": "x", "seed": s, "image": "",
                             "categories": "shot:headshot" if p % 2 else "shot:full_body", "m": v[p * seeds + s]})
    return pd.DataFrame(rows)


def test_cluster_bootstrap_finds_a_planted_difference_and_none_between_identical_models():
    rng = np.random.default_rng(1)
    prompts, seeds = 40, 2
    prompt_effect = np.repeat(rng.normal(0, 1.0, prompts), seeds)  # seeds of a prompt are correlated
    base = prompt_effect + rng.normal(0, 0.3, prompts * seeds)
    info = {"m": {"higher_is_better": False, "kind": "image"}}
    scores = _scores({"base": base, "same": base.copy(), "up": base + 0.25 + rng.normal(0, 0.3, prompts * seeds)},
                     prompts, seeds)
    comp = compare_pairs(scores, info, ["base", "same", "up"], "base", n_boot=2000, confidence=0.95,
                         seed=0).set_index("model")
    assert comp.loc["same", "diff"] == 0 and comp.loc["same", "lo"] == 0 and comp.loc["same", "verdict"] == ""
    up = comp.loc["up"]
    assert up["lo"] > 0 and up["verdict"] == "worse" and up["n_pairs"] == 80  # higher is worse here
    assert up["lo"] < up["diff"] < up["hi"] and abs(up["diff"] - 0.25) < 0.15
    # Under no difference, a 95 % interval excludes 0 about 5 % of the time, also when the differences of a
    # prompt's seeds are correlated (a shared per-prompt part): resampling whole prompts keeps that honest.
    # Resampling single images instead (each its own cluster) would claim a difference three times as often.
    hits = {"prompts": 0, "images": 0}
    codes = np.repeat(np.arange(prompts), seeds)
    for rep in range(300):
        d = np.repeat(rng.normal(0, 0.3, prompts), seeds) + rng.normal(0, 0.1, prompts * seeds)
        for unit, (sums, counts) in {"prompts": (np.bincount(codes, weights=d), np.bincount(codes).astype(float)),
                                     "images": (d, np.ones_like(d))}.items():
            lo, hi = cluster_mean_interval(sums, counts, n_boot=500, confidence=0.95, seed=rep)
            hits[unit] += not lo <= 0 <= hi
    assert hits["prompts"] / 300 <= 0.09 and hits["images"] / 300 >= 0.11
    # The same call gives the same intervals (a fixed bootstrap seed).
    again = compare_pairs(scores, info, ["base", "up"], "base", n_boot=2000, confidence=0.95, seed=0)
    assert again.iloc[0]["lo"] == up["lo"] and again.iloc[0]["hi"] == up["hi"]
    cats = per_category(scores, info).set_index(["model", "category", "metric"])
    assert cats.loc[("base", "all", "m"), "n"] == 80 and cats.loc[("base", "shot:headshot", "m"), "n"] == 40
    assert cats.loc[("up", "all", "m"), "mean"] == pytest.approx(scores[scores.model == "up"]["m"].mean())


# ---------------------------------------------------------------------------------------------- end to end
BENCH = {"subset": "full", "seeds": [0, 1], "num_steps": 4, "bootstrap": 500, "reference": "builtin:portraits"}


def _lora_run(folder: Path) -> Path:
    """A training output folder as `portraitgen train` leaves it (``final/`` = an exported LoRA on the tiny
    base), with random adapter weights instead of GRPO's (training here would take most of the test's time)."""
    import torch

    from portraitgen.config import LoraConfig
    from portraitgen.export import export_policy
    from portraitgen.policies import load_policy

    policy = load_policy("sd3", "builtin:tiny")
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    policy.enable_lora(rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    export_policy(policy, folder / "final", base_model="builtin:tiny", family="sd3", finetune="lora",
                  lora=LoraConfig(rank=4, alpha=8.0), ema=False)
    return folder


def _bright_model(folder: Path, lift: float = 0.25) -> Path:
    """The tiny model exported as a full fine-tune whose VAE decodes every image ``lift`` brighter."""
    import torch

    from portraitgen.export import export_policy
    from portraitgen.policies import load_policy

    policy = load_policy("sd3", "builtin:tiny")
    with torch.no_grad():
        convs = [m for m in policy.vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
        convs[-1].bias += lift
    return export_policy(policy, folder, base_model="builtin:tiny", family="sd3", finetune="full", lora=None,
                         ema=False)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    models = {"base": "base", "trained": str(_lora_run(root / "train")), "same": "base",
              "bright": str(_bright_model(root / "bright"))}
    data = fast_params(**{f"bench.{k}": v for k, v in BENCH.items()},
                       **{"bench.suite": str(_suite_file(root / "suite.jsonl", 6)), "bench.models": models})
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))  # the same component order
    summary = run_bench(params_from_dict(data), root / "out", report=False)  # the CLI run below makes one
    return root, root / "out", summary


def test_bench_writes_every_artifact_to_the_contract(bench):
    root, out, summary = bench
    scores = pd.read_parquet(out / "scores.parquet")
    info = json.loads((out / "metrics_info.json").read_text())
    assert list(scores.columns[:6]) == CONTRACT_ID_COLUMNS and len(scores) == 4 * 6 * 2
    assert scores["seed"].dtype == np.int64 and scores["categories"].str.contains("shot:").all()
    assert list(scores["model"].unique()) == ["base", "trained", "same", "bright"]
    assert all((out / p).is_file() for p in scores["image"])
    assert Image.open(out / scores["image"][0]).size == (32, 32)
    metric_cols = [c for c in scores.columns if c not in CONTRACT_ID_COLUMNS]
    assert set(metric_cols) | {"feature_distance_to_real"} == set(info)  # every metric is described
    assert {"omni_classic", "ai_portrait_classic", "ai_portrait_classic/oily", "omni_classic/raw_brisque",
            "face_detected", "artifact/oily", "artifact/overexposed", "artifact/any", "diversity"} <= set(metric_cols)
    assert all(scores[c].dtype == np.float64 for c in metric_cols)
    assert info["diversity"]["kind"] == "prompt" and info["feature_distance_to_real"]["kind"] == "set"
    assert info["artifact/oily"]["higher_is_better"] is False and info["omni_classic"]["higher_is_better"] is True
    assert info["omni_classic/raw_luma"]["higher_is_better"] is None and info["ai_portrait_classic"].get("main")
    # The tiny model draws 4x4 colour blocks: no face anywhere, so skin parts/flags are undefined, not 0.
    assert scores["face_detected"].sum() == 0 and scores["artifact/oily"].isna().all()
    assert scores.groupby(["model", "prompt_id"])["diversity"].nunique().eq(1).all()
    assert (scores["diversity"] > 0).all()

    cats = pd.read_parquet(out / "per_category.parquet")
    assert list(cats.columns) == ["model", "category", "metric", "mean", "std", "n"]
    all_base = cats[(cats.model == "base") & (cats.category == "all")].set_index("metric")
    assert all_base.loc["omni_classic", "mean"] == pytest.approx(scores[scores.model == "base"]["omni_classic"].mean())
    assert all_base.loc["omni_classic", "n"] == 12 and all_base.loc["diversity", "n"] == 6
    assert "artifact/oily" not in all_base.index  # nothing measured: no row
    assert {"people:1", "shot:headshot"} <= set(cats["category"])
    sets = pd.read_parquet(out / "set_metrics.parquet")
    assert list(sets.columns) == ["model", "metric", "value", "lo", "hi"] and len(sets) == 4
    assert (sets["lo"] <= sets["value"]).all() and (sets["value"] <= sets["hi"]).all()
    comp = pd.read_parquet(out / "comparisons.parquet")
    assert list(comp.columns) == ["model", "baseline", "metric", "mean_model", "mean_baseline", "diff", "lo", "hi",
                                  "n_pairs", "verdict"]
    assert set(comp["model"]) == {"trained", "same", "bright"} and set(comp["baseline"]) == {"base"}
    assert set(comp["metric"]) == set(info) and len(comp) == 3 * len(info)  # every metric, every model
    nothing = comp[comp["n_pairs"] == 0]  # skin parts: no face, so no pair to compare
    assert set(nothing["metric"]) >= {"artifact/oily", "ai_portrait_classic/raw_oily"} and nothing["diff"].isna().all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["suite"] == "suite/full" and set(metrics) == {"suite", "base", "trained", "same", "bright",
                                                                  "comparisons"}
    assert metrics["base"]["omni_classic"] == pytest.approx(all_base.loc["omni_classic", "mean"])
    assert set(metrics["comparisons"]) == {"trained_vs_base", "same_vs_base", "bright_vs_base"}
    ref = json.loads((out / "reference.json").read_text())
    assert ref["images"] == 24 and ref["thresholds"]["overexposed"] > 0
    # The trained checkpoint really was loaded: its images are not the base model's.
    a = np.stack([np.asarray(Image.open(out / p)) for p in scores[scores.model == "base"]["image"]])
    b = np.stack([np.asarray(Image.open(out / p)) for p in scores[scores.model == "trained"]["image"]])
    assert (a != b).any()


def test_brightened_model_gets_a_verdict_and_an_identical_model_none(bench):
    _, out, summary = bench
    comp = pd.read_parquet(out / "comparisons.parquet").set_index(["model", "metric"])
    scores = pd.read_parquet(out / "scores.parquet")
    same = comp.loc["same"]
    assert (same["diff"].dropna() == 0).all() and (same["verdict"] == "").all()  # same noise and model: same images
    assert (same["lo"].fillna(0) == 0).all() and (same["hi"].fillna(0) == 0).all()
    luma = scores.groupby("model")["omni_classic/raw_luma"].mean()
    assert luma["bright"] > luma["base"] + 0.15  # the planted difference
    raw = comp.loc[("bright", "omni_classic/raw_luma")]
    assert raw["lo"] > 0.2 and raw["verdict"] == "differs"  # no direction: it differs, neither better nor worse
    exposure = comp.loc[("bright", "omni_classic/luma")]  # the calibrated exposure score: 1 inside the real range
    assert exposure["hi"] < -0.5 and exposure["verdict"] == "worse"
    over = comp.loc[("bright", "artifact/overexposed")]  # the real crops are darker than the tiny model's blocks:
    assert over["mean_model"] == 1 and over["lo"] > 0 and over["verdict"] == "worse"  # base is often flagged too
    assert any(line.startswith("bright vs base: artifact/overexposed +") for line in summary["verdicts"])
    assert not any(line.startswith("same vs base") for line in summary["verdicts"])


def test_parts_and_merge_reproduce_the_single_run(bench, capsys, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, out, _ = bench
    parted = root / "parts"
    monkeypatch.chdir(tmp_path)  # MLflow's sqlite store puts artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["tracking"] = {"enabled": True, "uri": uri, "experiment": "bench-test"}  # tracking is not in the parts' key
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    args = ["bench", "--params", str(tmp_path / "params.yaml"), "--out", str(parted), "--model", "base=base",
            "--model", f"bright={root / 'bright'}", "--baseline", "base", "--batch-size", "4"]
    for stale in ("images/old/pb1-000_s0.png", "images/base/pb1-299_s0.png"):  # left by an earlier bench
        (parted / stale).parent.mkdir(parents=True, exist_ok=True)
        (parted / stale).write_bytes(b"png")
    assert main(args + ["--merge-only", "--num-parts", "2"]) == 2
    assert "part 0 of 2 is missing" in capsys.readouterr().err
    assert main(args + ["--part", "1", "--num-parts", "2"]) == 0
    assert main(args + ["--part", "0", "--num-parts", "2"]) == 0
    assert not (parted / "scores.parquet").exists()  # a part job does not merge
    assert len(pd.read_parquet(parted / "parts" / "part-0000-of-0002.parquet")) == 2 * 4 * 2  # prompts 0-1, 4-5
    assert main(args + ["--merge-only", "--num-parts", "2"]) == 0
    assert "bright vs base: artifact/overexposed" in capsys.readouterr().out
    assert (parted / "report.html").is_file()  # the report engineer's page, from the merge
    assert not (parted / "images" / "old").exists() and not (parted / "images/base/pb1-299_s0.png").exists()
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("bench-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, from the merge (not the part jobs)
    assert runs[0].data.tags["portraitgen.stage"] == "bench" and runs[0].data.params["bench.seeds"] == "[0, 1]"
    # Every number of the single run (the same models, from another process path and batch size) again: the
    # images bit for bit; the scores to 1e-9, because BRISQUE (in omni_classic) sums in NumPy in an order that
    # depends on the memory alignment of its temporaries (the same image varies in the 13th digit).
    keep = ["base", "bright"]
    for name, keys in (("scores.parquet", ["model", "prompt_id", "seed"]),
                       ("per_category.parquet", ["model", "category", "metric"]),
                       ("set_metrics.parquet", ["model", "metric"]),
                       ("comparisons.parquet", ["model", "metric"])):
        single = pd.read_parquet(out / name)
        single = single[single["model"].isin(keep)].sort_values(keys).reset_index(drop=True)
        merged = pd.read_parquet(parted / name).sort_values(keys).reset_index(drop=True)
        pd.testing.assert_frame_equal(single, merged, check_exact=False, rtol=1e-9, atol=1e-12)
    for p in pd.read_parquet(parted / "scores.parquet")["image"]:
        assert (parted / p).read_bytes() == (out / p).read_bytes()
    single = json.loads((out / "metrics.json").read_text())
    merged = json.loads((parted / "metrics.json").read_text())
    for key in ("bright", "base"):
        assert merged[key] == pytest.approx(single[key], rel=1e-9, abs=1e-12)
    assert merged["comparisons"]["bright_vs_base"] == pytest.approx(single["comparisons"]["bright_vs_base"],
                                                                     rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("override, extra, message", [
    ({"bench.baseline": "nope"}, [], "params key 'bench.baseline': expected one of the labels in bench.models"),
    ({"bench.models": {"base": "base", "grpo": "/nonexistent/run"}}, [],
     "bench.models.grpo: model folder not found: /nonexistent/run"),
    ({}, ["--model", "grpo=base"], "bench.baseline: 'base' is not one of the benched models (grpo) (pass --baseline"),
    ({}, ["--model", "grpo=/nonexistent/run"], "--model grpo: model folder not found: /nonexistent/run"),
    ({}, ["--model", "grpo"], "--model expects LABEL=PATH"),
    ({"bench.suite": "SUITE"}, [], "bad.jsonl:2: 'prompt' must be a non-empty string"),
    ({"bench.subset": "nightly"}, [], "bench.subset: no prompt of builtin:v1 is in subset 'nightly'"),
    ({"bench.reference": "/nonexistent/manifest.parquet"}, [], "bench.reference: not found"),
    ({"bench.reward.components": {"hpsv3": 1.0}}, [], "bench.reward: unknown reward 'hpsv3'"),
])
def test_bad_input_exits_2_naming_the_key_before_any_work(tmp_path, capsys, override, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "b"}\n')
    override = {k: (str(bad) if v == "SUITE" else v) for k, v in override.items()}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(fast_params(**{"bench.reference": "builtin:portraits", **override})))
    out = tmp_path / "out"
    assert main(["bench", "--params", str(params), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (out / "images").exists()


# ---------------------------------------------------------------------------------------------- prompt embeddings
def _bench_prompt_embeddings(data: dict, out: Path) -> Path:
    """``portraitgen precompute --bench-only`` for these params: the suite's prompt embeddings."""
    from portraitgen.precompute import run_precompute

    summary = run_precompute(params_from_dict(data), out, bench_only=True)
    assert summary["path"] == str(out / "bench_prompt_embeddings.safetensors")
    return out / "bench_prompt_embeddings.safetensors"


@pytest.fixture
def text_encoder_spy(monkeypatch):
    """Every pipeline load's ``text_encoders`` argument; encoding a prompt with a text encoder fails."""
    from portraitgen.policies.base import FlowPolicy

    loads: list[bool] = []
    original = FlowPolicy.from_pretrained.__func__

    def from_pretrained(cls, path, *args, text_encoders: bool = True, **kwargs):
        loads.append(text_encoders)
        return original(cls, path, *args, text_encoders=text_encoders, **kwargs)

    def no_encoding(self, prompts):
        raise AssertionError(f"a text encoder ran on {prompts!r}")

    monkeypatch.setattr(FlowPolicy, "from_pretrained", classmethod(from_pretrained))
    return loads, lambda: monkeypatch.setattr(FlowPolicy, "encode_prompts", no_encoding)


def test_cached_prompt_embeddings_give_the_live_images_without_text_encoders(bench, tmp_path, text_encoder_spy):
    """The bench from bench.prompt_embeddings (base, a LoRA and a full fine-tune of model.path) draws the images
    and scores of the live-encoder bench (the module fixture) bit for bit, and never loads a text encoder."""
    root, live, _ = bench
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["bench"].update(suite=str(_suite_file(tmp_path / "suite.jsonl", 2)), bootstrap=100,  # 2 of the 6 prompts
                         models={k: v for k, v in data["bench"]["models"].items() if k != "same"})
    cache = _bench_prompt_embeddings(data, tmp_path / "precompute")
    loads, forbid_encoding = text_encoder_spy
    assert loads == [True]  # precompute --bench-only encoded the prompts
    loads.clear()
    forbid_encoding()
    data["bench"]["prompt_embeddings"] = str(cache)
    summary = run_bench(params_from_dict(data), tmp_path / "out", report=False)
    assert loads == [False, False, False]  # base, the LoRA's base, the full fine-tune: none with text encoders
    assert summary["prompt_conditioning"] == {"base": str(cache), "trained": str(cache), "bright": str(cache)}
    cached = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert len(cached) == 3 * 2 * 2
    single = pd.read_parquet(live / "scores.parquet").merge(cached[["model", "prompt_id", "seed"]])
    pd.testing.assert_frame_equal(cached.drop(columns="diversity"), single.drop(columns="diversity"),
                                  check_exact=False, rtol=1e-9, atol=1e-12)  # BRISQUE: see the parts test
    assert cached["diversity"].to_numpy() == pytest.approx(single["diversity"].to_numpy(), rel=1e-9)
    for rel in cached["image"]:
        assert (tmp_path / "out" / rel).read_bytes() == (live / rel).read_bytes()


def test_prompt_embeddings_must_match_the_base_and_the_suite(tmp_path, capsys, caplog, text_encoder_spy):
    """A file lacking a suite prompt or made by another model stops the bench before any model loads; a
    benched model on another base than model.path encodes its prompts with its own text encoders (warned)."""
    import shutil

    from portraitgen.policies import tiny_model_path

    other = tmp_path / "other-base"  # the tiny model's weights, but another model folder (another fingerprint)
    shutil.copytree(tiny_model_path("sd3"), other)
    (other / "transformer" / "NOTES.txt").write_text("a copy")  # inside a component: counted (top-level notes are not)
    one = {"bench.suite": str(_suite_file(tmp_path / "one.jsonl", 1)), "bench.subset": "full", "bench.seeds": [0],
           "bench.num_steps": 2, "bench.bootstrap": 100, "bench.reference": "builtin:portraits"}
    cache = _bench_prompt_embeddings(fast_params(**one), tmp_path / "precompute")
    loads, _ = text_encoder_spy
    loads.clear()

    def bench_cli(name: str, **overrides) -> int:
        params = tmp_path / f"{name}.yaml"
        params.write_text(yaml.safe_dump(fast_params(**{**one, "bench.prompt_embeddings": str(cache), **overrides})))
        return main(["bench", "--params", str(params), "--out", str(tmp_path / name)])

    two = _suite_file(tmp_path / "two.jsonl", 2)
    p1 = load_suite(str(two), "full")[1]
    assert bench_cli("more-prompts", **{"bench.suite": str(two)}) == 2
    err = capsys.readouterr().err
    assert f"bench.prompt_embeddings: {cache} has no embedding for 1 of the 3 prompts of two/full (e.g. {p1.id}: " \
           f"{p1.prompt!r})" in err and "--bench-only" in err, err
    assert bench_cli("stale", **{"model.path": str(other)}) == 2
    err = capsys.readouterr().err
    assert f"bench.prompt_embeddings: {cache} was made by another model" in err, err
    assert bench_cli("missing", **{"bench.prompt_embeddings": str(tmp_path / "nope.safetensors")}) == 2
    assert f"bench.prompt_embeddings: {tmp_path / 'nope.safetensors'} not found (run `portraitgen precompute" \
           in capsys.readouterr().err
    assert loads == [] and not any((tmp_path / n).exists() for n in ("more-prompts", "stale", "missing"))

    data = fast_params(**{**one, "bench.prompt_embeddings": str(cache), "bench.models": {"base": "base",
                                                                                        "other": str(other)}})
    with caplog.at_level(logging.WARNING, logger="portraitgen.bench.run"):
        summary = run_bench(params_from_dict(data), tmp_path / "fallback", report=False)
    assert f"bench.models.other is built on sd3:{other}" in caplog.text and "its own text encoders" in caplog.text
    assert loads == [False, True]  # base from the file, `other` with its text encoders
    assert summary["prompt_conditioning"] == {"base": str(cache), "other": "text encoders"}
    scores = pd.read_parquet(tmp_path / "fallback" / "scores.parquet")
    images = {m: (tmp_path / "fallback" / scores[scores.model == m]["image"].iloc[0]).read_bytes()
              for m in ("base", "other")}
    assert images["base"] == images["other"]  # the same weights, cached or live conditioning: the same image

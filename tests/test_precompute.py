"""The precompute stage: prompt-embedding cache (training without text encoders), the AI-Portrait
detector trained inside the stage, exemplar rewards, and parts/merge."""
import hashlib
import json
import shutil

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from portraitgen.config import params_from_dict
from portraitgen.embeddings import EmbeddingCache, EmbeddingCacheError, build_cache
from portraitgen.invert import run_invert
from portraitgen.policies import load_policy, model_fingerprint
from portraitgen.precompute import PrecomputeError, run_precompute
from portraitgen.training import GRPOTrainer

from helpers import fast_params, make_manifest, write_params


def test_training_from_cached_embeddings_matches_live_text_encoders(tmp_path):
    manifest = make_manifest(tmp_path / "curate", n=2, size=32)
    base = {"invert.manifest": str(manifest), "train.iterations": 2}
    summary = run_precompute(params_from_dict(fast_params(**base)), tmp_path / "pre")
    cache = tmp_path / "pre" / "prompt_embeddings.safetensors"
    assert summary["prompts"] == 8 and cache.is_file()
    live = GRPOTrainer(params_from_dict(fast_params(**base)), tmp_path / "live")
    live.run()
    cached = GRPOTrainer(params_from_dict(fast_params(**base, **{"train.prompt_embeddings": str(cache)})),
                         tmp_path / "cached")
    assert cached.policy.pipeline.text_encoder is None  # never loaded
    cached.run()
    for a, b in zip(live.history, cached.history):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == \
            {k: v for k, v in b.items() if not k.startswith("time/")}
    wa = load_file(str(tmp_path / "live" / "final" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(tmp_path / "cached" / "final" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cache_refuses_another_model_and_missing_prompts(tmp_path):
    policy = load_policy("sd3", "builtin:tiny")
    path = build_cache(policy, ["a portrait"], tmp_path / "c.safetensors", "someone-else")
    with pytest.raises(EmbeddingCacheError, match="made by another model"):
        EmbeddingCache(path, model_fingerprint("sd3", "builtin:tiny"))
    cache = EmbeddingCache(path)
    with pytest.raises(EmbeddingCacheError, match="no embedding for 1 prompt"):
        cache.lookup(["a headshot"])
    torch.testing.assert_close(cache.lookup(["a portrait"])["prompt_embeds"],
                               policy.encode_prompts(["a portrait"])["prompt_embeds"])


def test_bench_prompts_get_their_own_file_from_the_shared_store(tmp_path, capsys):
    """Training's cache holds the training prompts only; --bench-only writes the bench's (and nothing else)
    from the same per-prompt store: a prompt in both is encoded once, and neither run's pruning loses the
    other's entries."""
    from portraitgen.cli import main
    from portraitgen.prompts import load_prompts

    training = load_prompts("builtin:demo")
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": f"s{i}", "prompt": p, "categories": ["shot:headshot"]}) + "\n"
                             for i, p in enumerate([training[0], "a studio headshot of a bench-only person"])))
    over = {"bench.suite": str(suite), "bench.subset": "full", "invert.manifest": str(tmp_path / "none.parquet")}
    params_file = write_params(tmp_path / "params.yaml", **over)
    params = params_from_dict(fast_params(**over))
    out = tmp_path / "pre"
    first = run_precompute(params, out)
    assert first["prompts"] == len(training) and first["cache_prompts"] == len(training)
    assert EmbeddingCache(out / "prompt_embeddings.safetensors").prompts == ["", *training]
    assert not (out / "bench_prompt_embeddings.safetensors").exists()

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["precompute", "--params", str(params_file), "--out", str(out), "--bench-only"]) == 0
    bench_file = out / "bench_prompt_embeddings.safetensors"
    bench = EmbeddingCache(bench_file, model_fingerprint("sd3", "builtin:tiny"))
    assert bench.prompts == ["", training[0], "a studio headshot of a bench-only person"]
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    changed = {p for p in after if p not in before or after[p] != before[p]}
    chunks = {p for p in changed if p.parent == out / "cache" / "embeddings" and p not in before
              and p.suffix == ".safetensors"}
    # The file, and the new prompt's store entry, each with its checksum (portraitgen/integrity.py).
    assert changed == {f.with_name(f.name + s) for f in {bench_file} | chunks for s in ("", ".sha256")}
    assert len(chunks) == 1
    shared = EmbeddingCache(out / "prompt_embeddings.safetensors").lookup([training[0], ""])
    for name, rows in bench.lookup([training[0], ""]).items():
        assert torch.equal(rows, shared[name])  # one stored entry serves both files

    again = run_precompute(params, out)  # training's pruning keeps the bench's entries ...
    assert again["prompts_encoded"] == 0 and again["base_model_loads"] == 0
    bench_again = run_precompute(params, out, bench_only=True)  # ... so nothing is encoded again
    assert bench_again["prompts_encoded"] == 0 and bench_again["prompts_reused"] == 3
    assert bench_again["base_model_loads"] == 0

    assert main(["precompute", "--params", str(params_file), "--out", str(out), "--bench-only",
                 "--merge-only", "--num-parts", "2"]) == 2
    assert "--bench-only embeds PortraitBench's prompts in one process" in capsys.readouterr().err


def test_exemplar_rewards_are_scored_once_and_used_by_training(tmp_path):
    captions = ["a portrait photo of a smiling woman"] * 2 + ["a headshot of an old man"] * 2
    manifest = make_manifest(tmp_path / "curate", n=4, size=32, captions=captions)
    over = {"invert.manifest": str(manifest), "prompts.source": "exemplars", "invert.diagnostic_samples": 2}
    params = params_from_dict(fast_params(**over))
    first = run_precompute(params, tmp_path / "pre")
    assert first["exemplars"] == 4 and first["exemplars_scored"] == 4 and first["prompts"] == 2
    again = run_precompute(params, tmp_path / "pre")
    assert again["exemplars_scored"] == 0 and again["exemplars_reused"] == 4
    table = pd.read_parquet(tmp_path / "pre" / "exemplar_rewards.parquet")
    assert set(table.columns) >= {"id", "content_hash", "brightness", "total"} and len(table) == 4
    run_invert(params, tmp_path / "invert")
    trainer = GRPOTrainer(params_from_dict(fast_params(**over, **{
        "train.exemplars.per_group": 1, "train.exemplars.index": str(tmp_path / "invert" / "index.parquet"),
        "train.exemplars.rewards": str(tmp_path / "pre" / "exemplar_rewards.parquet"),
        "train.prompt_embeddings": str(tmp_path / "pre" / "prompt_embeddings.safetensors"),
        "train.iterations": 1})), tmp_path / "train")
    trainer.run()
    rows = [json.loads(ln) for ln in (tmp_path / "train" / "samples.jsonl").read_text().splitlines()]
    by_id = table.set_index("id")
    for r in rows:
        if r["exemplar"]:
            assert r["reward"] == pytest.approx(float(by_id.loc[r["exemplar"], "total"]), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The AI-Portrait detector, trained inside the stage
# --------------------------------------------------------------------------------------------------
# Tiny: 32 px centre crops, 8 channels, 8 epochs; generations of the tiny model with 2 sampler steps.
DETECTOR_TRAIN = {"crop": "center", "size": 32, "width": 8, "epochs": 8, "batch_size": 16, "num_steps": 2}


def detector_overrides(manifest, out) -> dict:
    return {"invert.manifest": str(manifest),
            "reward.components": {"brightness": 1.0, "ai_portrait_detector": 0.5},
            "reward.options": {"ai_portrait_detector": {"path": str(out / "detector"), "train": DETECTOR_TRAIN}}}


def test_detector_is_trained_reported_reused_and_retrained_when_real_images_change(tmp_path):
    from portraitgen.images import load_image
    from portraitgen.rewards import build_reward

    manifest = make_manifest(tmp_path / "curate", n=20, size=32)
    out = tmp_path / "pre"
    params = params_from_dict(fast_params(**detector_overrides(manifest, out)))
    first = run_precompute(params, out)
    report = json.loads((out / "detector" / "report.json").read_text())
    assert first["detector_trained"] is True
    assert report["n_real"] == 20 and report["n_generated"] == 20 and report["n_val"] == 10
    # real crops (smooth colour fields) vs the tiny model's blocky generations: separable
    assert report["val_auc"] >= 0.9 and report["val_accuracy"] >= 0.8, report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["detector_val_auc"] == first["detector_val_auc"] == report["val_auc"]
    assert "base model sd3:builtin:tiny" in report["sources"]["generated"]

    # The exemplar rewards were scored with the detector just trained (after it, never before).
    table = pd.read_parquet(out / "exemplar_rewards.parquet")
    reward = build_reward("ai_portrait_detector", path=str(out / "detector"))
    df = pd.read_parquet(manifest)
    df = df[df["split"] == "train"].sort_values("id").reset_index(drop=True)
    images = torch.stack([load_image(str(manifest.parent / p), 32) for p in df["image_path"]])
    assert list(table["id"]) == list(df["id"])
    assert table["ai_portrait_detector"].to_numpy() == pytest.approx(reward(images, [""] * 20, [{}] * 20), abs=1e-5)
    assert table["total"].to_numpy() == pytest.approx(
        (table["brightness"] + 0.5 * table["ai_portrait_detector"]).to_numpy(), abs=1e-6)

    # Rerun: nothing changed, so the detector is reused (its weights untouched) and nothing loads.
    weights = out / "detector" / "detector.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = run_precompute(params, out)
    assert again["detector_trained"] is False and again["base_model_loads"] == 0
    assert again["exemplars_scored"] == 0 and weights.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(pd.read_parquet(out / "exemplar_rewards.parquet"), table)

    # One real image changes: the detector is retrained, every exemplar gets its new detector score.
    changed = manifest.parent / df["image_path"][3]
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)
    full = pd.read_parquet(manifest)
    full.loc[full["id"] == df["id"][3], "content_hash"] = hashlib.sha256(changed.read_bytes()).hexdigest()
    full.to_parquet(manifest, index=False)
    third = run_precompute(params, out)
    assert third["detector_trained"] is True and third["detector_key"] != first["detector_key"]
    assert third["exemplars_scored"] == 20 and third["prompts_encoded"] == 0
    assert weights.stat().st_mtime_ns != stamp
    assert not list(out.glob(".*.tmp*")) and not list(out.glob(".*.old"))  # portraitgen/io.py's temporary names


def test_detector_options_are_checked_before_any_work(tmp_path):
    manifest = make_manifest(tmp_path / "curate", n=2, size=32)
    over = detector_overrides(manifest, tmp_path / "pre")
    over["reward.options"] = {"ai_portrait_detector": {"train": {"epochs": 1}}}
    with pytest.raises(PrecomputeError, match=r"reward.options.ai_portrait_detector.path: not set"):
        run_precompute(params_from_dict(fast_params(**over)), tmp_path / "pre")
    over = detector_overrides(manifest, tmp_path / "pre")
    over["reward.options"]["ai_portrait_detector"]["train"] = {"epoch": 3}
    with pytest.raises(PrecomputeError, match=r"ai_portrait_detector.train.epoch: unknown setting"):
        run_precompute(params_from_dict(fast_params(**over)), tmp_path / "pre")
    assert not (tmp_path / "pre" / "prompt_embeddings.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# Parts and merge
# --------------------------------------------------------------------------------------------------
def test_parts_and_merge_write_what_one_process_writes(tmp_path, capsys):
    from portraitgen.cli import main

    manifest = make_manifest(tmp_path / "curate", n=36, size=32)  # 3 blocks of SCORE_BLOCK = 16
    out = tmp_path / "pre"
    params_file = write_params(tmp_path / "params.yaml", **detector_overrides(manifest, out))
    cmd = ["precompute", "--params", str(params_file), "--out", str(out)]
    assert main(cmd) == 0
    one = pd.read_parquet(out / "exemplar_rewards.parquet")
    embeddings = load_file(str(out / "prompt_embeddings.safetensors"))
    shutil.rmtree(out / "cache" / "rewards")  # score everything again, now in parts
    (out / "exemplar_rewards.parquet").unlink()

    assert main([*cmd, "--part", "1", "--num-parts", "2"]) == 0
    assert len(pd.read_parquet(out / "parts" / "part-0001-of-0002.parquet")) == 16  # block 1
    assert main([*cmd, "--merge-only", "--num-parts", "2"]) == 2
    err = capsys.readouterr().err
    assert "part-0000-of-0002.parquet" in err and "missing" in err and "--part 0 --num-parts 2" in err
    assert main([*cmd, "--part", "0", "--num-parts", "2"]) == 0
    assert len(pd.read_parquet(out / "parts" / "part-0000-of-0002.parquet")) == 20  # blocks 0 and 2
    assert main([*cmd, "--merge-only", "--num-parts", "2"]) == 0
    merged = pd.read_parquet(out / "exemplar_rewards.parquet")
    pd.testing.assert_frame_equal(merged, one)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exemplars_scored"] == 36 and metrics["detector_trained"] is False
    again = load_file(str(out / "prompt_embeddings.safetensors"))
    assert all(torch.equal(embeddings[k], again[k]) for k in embeddings)

    # A part made with other reward settings is named as stale, not merged.
    write_params(params_file, **{**detector_overrides(manifest, out), "reward.components":
                                 {"brightness": 2.0, "ai_portrait_detector": 0.5}})
    assert main([*cmd, "--merge-only", "--num-parts", "2"]) == 2
    assert "part-0000-of-0002.parquet was made from other exemplars or reward settings" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The per-prompt embedding store
# --------------------------------------------------------------------------------------------------
def test_adding_a_prompt_encodes_only_that_prompt(tmp_path, sd3_policy, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a portrait photo of a woman\na headshot of an old man\na child laughing\n")
    over = {"prompts.source": str(prompts), "invert.manifest": str(tmp_path / "no-manifest.parquet")}
    out = tmp_path / "pre"
    first = run_precompute(params_from_dict(fast_params(**over)), out)
    rows = first["cache_prompts"] + 1  # and the empty prompt
    assert first["prompts"] == 3 and first["prompts_encoded"] == rows and first["base_model_loads"] == 1
    before = EmbeddingCache(out / "prompt_embeddings.safetensors", model_fingerprint("sd3", "builtin:tiny"))

    prompts.write_text(prompts.read_text() + "a bearded man with glasses\n")
    second = run_precompute(params_from_dict(fast_params(**over)), out)
    assert second["prompts_encoded"] == 1 and second["prompts_reused"] == rows
    after = EmbeddingCache(out / "prompt_embeddings.safetensors", model_fingerprint("sd3", "builtin:tiny"))
    assert len(after.prompts) == rows + 1
    for p in before.prompts:
        assert all(torch.equal(before.lookup([p])[k], after.lookup([p])[k]) for k in before.tensors)
    # stored and new entries alike are what the live text encoders give (training's fallback)
    live = EmbeddingCache.from_policy(sd3_policy, after.prompts)
    for k in after.tensors:
        assert torch.equal(after.lookup(after.prompts)[k], live.lookup(after.prompts)[k])

    # Another encoder setting is another key: everything is encoded again, and stale chunks go.
    from portraitgen.policies.sd3 import SD3Policy

    monkeypatch.setattr(SD3Policy, "max_sequence_length", 64)
    third = run_precompute(params_from_dict(fast_params(**over)), out)
    assert third["prompts_encoded"] == rows + 1
    assert len(list((out / "cache" / "embeddings").glob("emb-*.safetensors"))) == 1
    monkeypatch.undo()
    with pytest.raises(EmbeddingCacheError, match="other encoder settings"):
        EmbeddingCache(out / "prompt_embeddings.safetensors", model_fingerprint("sd3", "builtin:tiny"))

"""The precompute stage: prompt-embedding cache (training without text encoders) and exemplar rewards."""
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from portraitgen.config import params_from_dict
from portraitgen.embeddings import EmbeddingCache, EmbeddingCacheError, build_cache
from portraitgen.invert import run_invert
from portraitgen.policies import load_policy, model_fingerprint
from portraitgen.precompute import run_precompute
from portraitgen.training import GRPOTrainer

from helpers import fast_params, make_manifest


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

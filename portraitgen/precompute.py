"""``portraitgen precompute``: what training would otherwise recompute, done once.

    portraitgen precompute --params params.yaml --out results/precompute

- ``prompt_embeddings.safetensors``: the text encoders' outputs for every training prompt (the
  captions of the curated exemplars when ``prompts.source: exemplars``) and the empty prompt; training
  reads it with ``train.prompt_embeddings`` and then never loads the text encoders.
- ``exemplar_rewards.parquet``: every reward component of every curated training image (they never
  change); training reads it with ``train.exemplars.rewards``. Rows are reused when the image hash
  and the reward config are unchanged, so adding images scores only the new ones.
- ``metrics.json`` and an MLflow run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import Params
from .embeddings import build_cache
from .images import load_image
from .invert import read_manifest
from .policies import load_policy, model_fingerprint
from .prompts import load_prompts
from .rewards import RewardSet
from .tracking import Tracker

log = logging.getLogger(__name__)


def training_prompts(params: Params) -> list[str]:
    if params.prompts.source == "exemplars":
        return sorted(set(read_manifest(params.invert.manifest)["caption"].astype(str)))
    return load_prompts(params.prompts.source)


def reward_config_hash(params: Params) -> str:
    cfg = {"reward": asdict(params.reward), "resolution": params.model.resolution}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def score_exemplars(params: Params, out: Path, batch_size: int = 8) -> dict[str, Any]:
    """Score the curated training images; reuse rows whose image and reward config are unchanged."""
    df = read_manifest(params.invert.manifest)
    cfg = reward_config_hash(params)
    path = out / "exemplar_rewards.parquet"
    old = pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=["content_hash", "reward_config"])
    reuse = old[old["reward_config"] == cfg].drop_duplicates("content_hash").set_index("content_hash")
    todo = [i for i, h in enumerate(df["content_hash"]) if h not in reuse.index]
    rewards = RewardSet.from_config(params.reward)
    scored: dict[int, dict[str, float]] = {}
    t0 = time.perf_counter()
    for lo in tqdm(range(0, len(todo), batch_size), desc="score exemplars", disable=not todo):
        rows = todo[lo:lo + batch_size]
        images = torch.stack([load_image(df["image_file"][i], params.model.resolution) for i in rows])
        out_scores = rewards(images, [str(df["caption"][i]) for i in rows],
                             [{"id": str(df["id"][i]), "real": True} for i in rows])
        for k, i in enumerate(rows):
            scored[i] = {name: float(v[k]) for name, v in out_scores.items()}
    seconds = time.perf_counter() - t0
    records = []
    names = list(rewards.weights) + ["total"]
    for i in range(len(df)):
        h = df["content_hash"][i]
        vals = scored[i] if i in scored else {n: float(reuse.loc[h, n]) for n in names}
        records.append({"id": str(df["id"][i]), "content_hash": h, "caption": str(df["caption"][i]),
                        "reward_config": cfg, **vals})
    table = pd.DataFrame(records)
    tmp = out / ".exemplar_rewards.parquet.tmp"
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    return {"exemplars": len(df), "exemplars_scored": len(todo), "exemplars_reused": len(df) - len(todo),
            "exemplar_reward_mean": float(table["total"].mean()) if len(table) else float("nan"),
            "score_images_per_second": len(todo) / seconds if todo and seconds > 0 else None}


def run_precompute(params: Params, out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = training_prompts(params)  # fails on a bad prompt source before any model loads
    has_manifest = Path(params.invert.manifest).is_file()
    summary: dict[str, Any] = {"prompts": len(prompts)}
    t0 = time.perf_counter()
    policy = load_policy(params.model.family, params.model.path,
                         device="cuda" if torch.cuda.is_available() else "cpu")
    policy.freeze_all()
    build_cache(policy, prompts, out / "prompt_embeddings.safetensors",
                model_fingerprint(params.model.family, params.model.path))
    summary["embedding_seconds"] = time.perf_counter() - t0
    del policy
    if has_manifest:
        summary.update(score_exemplars(params, out))
    else:
        log.warning("no curated manifest at %s: exemplar rewards skipped", params.invert.manifest)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    tracker = Tracker(params.tracking, stage="precompute", active=True,
                      params={"reward.components": json.dumps(params.reward.components)})
    try:
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and np.isfinite(v)}, 0)
        if (out / "exemplar_rewards.parquet").is_file():
            tracker.log_artifact(out / "exemplar_rewards.parquet")
    finally:
        tracker.end()
    return summary

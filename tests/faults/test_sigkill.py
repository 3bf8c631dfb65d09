"""SIGKILL in a stage, then a rerun: the outputs are those of an uninterrupted run (issue 15, item 8).
Training's own kill-and-resume test is tests/test_distributed_resume.py; these cover invert, curate, precompute, bench
and pretrain.
A killed stage leaves its output lock behind: the rerun takes it over (portraitgen/locking.py)."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from portraitgen.locking import lock_path
from portraitgen.shards import read_shard

from helpers import make_manifest, write_params

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "portraitgen", *map(str, args)]


def _kill_when(cmd: list[str], ready, timeout: float = 300) -> bool:
    """Start ``cmd``, SIGKILL it once ``ready()``; False if it finished first (nothing to test then)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _shards(out: Path) -> dict[str, dict]:
    """Each shard's tensors (what training reads bit-exactly; diagnostics to float tolerance)."""
    return {p.name: read_shard(p)[0] for p in (out / "shards").glob("shard-*.safetensors")}


EXACT = ("latents", "trainable", "sigmas", "log_probs_ref")  # the trajectory training trains on


def test_invert_killed_then_rerun_matches_an_uninterrupted_run(tmp_path):
    manifest = make_manifest(tmp_path / "curate", n=8, size=32)
    params = write_params(tmp_path / "params.yaml", **{"invert.manifest": str(manifest), "invert.shard_size": 2,
                                                       "invert.diagnostic_samples": 2, "model.path": "builtin:tiny"})
    _run(_cli("invert", "--params", params, "--out", tmp_path / "ref"))
    out = tmp_path / "killed"
    killed = _kill_when(_cli("invert", "--params", params, "--out", out),
                        lambda: len(list((out / "shards").glob("*.sha256"))) >= 1 if (out / "shards").is_dir() else False)
    assert killed, "invert finished before it could be killed"
    assert not (out / "index.parquet").exists() and lock_path(out).exists()
    rerun = _run(_cli("invert", "--params", params, "--out", out))
    assert "taking over the lock" in rerun.stderr
    got, ref = _shards(out), _shards(tmp_path / "ref")
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].keys() == ref[name].keys()
        for key, tensor in ref[name].items():
            if key in EXACT:
                assert torch.equal(got[name][key], tensor), (name, key)
            else:  # diagnostics (residuals) depend on the batch an image was inverted in, to float rounding
                torch.testing.assert_close(got[name][key], tensor, rtol=1e-3, atol=1e-5, equal_nan=True)
    # The index names the same shards and exemplars; its file checksums differ with the diagnostics above.
    index, ref_index = (pd.read_parquet(o / "index.parquet").drop(columns=["checksum"]) for o in (out, tmp_path / "ref"))
    pd.testing.assert_frame_equal(index, ref_index, check_exact=False, rtol=1e-3)


def _faces(folder: Path, n: int) -> None:
    from skimage import data

    folder.mkdir(parents=True)
    faces = data.lfw_subset()
    for i in range(n):
        a = faces[i]
        a = np.clip(np.round(a * 255), 0, 255).astype(np.uint8) if a.dtype != np.uint8 else a
        buf = io.BytesIO()
        Image.fromarray(a).resize((96, 96)).save(buf, format="PNG")
        (folder / f"face_{i:03d}.png").write_bytes(buf.getvalue())


def test_curate_killed_then_rerun_matches_an_uninterrupted_run(tmp_path):
    src = tmp_path / "photos"
    _faces(src, 60)
    params = write_params(tmp_path / "params.yaml", **{"curate.source": str(src), "model.path": "builtin:tiny"})
    _run(_cli("curate", "--params", params, "--out", tmp_path / "ref", "--workers", 1))
    out = tmp_path / "killed"
    cache = out / "cache"
    killed = _kill_when(_cli("curate", "--params", params, "--out", out, "--workers", 1),
                        lambda: cache.is_dir() and len(list(cache.rglob("*.json"))) >= 5)
    assert killed, "curate finished before it could be killed"
    assert not (out / "manifest.parquet").exists()
    _run(_cli("curate", "--params", params, "--out", out, "--workers", 1))
    for name in ("manifest.parquet", "rejected.parquet"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    ref_images = {p.name: p.read_bytes() for p in (tmp_path / "ref" / "images").iterdir()}
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == ref_images


def test_bench_killed_then_rerun_matches_an_uninterrupted_run(tmp_path):
    import json

    from portraitgen.bench.suite import load_suite

    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "categories": ",".join(p.categories)}) + "\n"
                             for p in load_suite("builtin:v1", "full")[:16]))
    params = write_params(tmp_path / "params.yaml", **{
        "model.path": "builtin:tiny", "bench.suite": str(suite), "bench.subset": "full", "bench.seeds": [0, 1],
        "bench.num_steps": 4, "bench.bootstrap": 200, "bench.reference": "builtin:portraits",
        "bench.prompt_embeddings": "", "bench.models": {"base": "base", "same": "base"}})
    cmd = ["bench", "--params", params, "--batch-size", "2"]
    _run(_cli(*cmd, "--out", tmp_path / "ref"))
    out = tmp_path / "killed"
    killed = _kill_when(_cli(*cmd, "--out", out),
                        lambda: (out / "images").is_dir() and len(list((out / "images").rglob("*.png"))) >= 8)
    assert killed, "bench finished before it could be killed"
    assert not (out / "scores.parquet").exists() and lock_path(out).exists()
    _run(_cli(*cmd, "--out", out))
    for name in ("scores.parquet", "comparisons.parquet", "per_category.parquet", "set_metrics.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(tmp_path / "ref" / name),
                                      check_exact=False, rtol=1e-9)
    ref_images = {p.relative_to(tmp_path / "ref"): p.read_bytes() for p in (tmp_path / "ref" / "images").rglob("*.png")}
    assert {p.relative_to(out): p.read_bytes() for p in (out / "images").rglob("*.png")} == ref_images


def test_precompute_killed_then_rerun_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    manifest = make_manifest(tmp_path / "curate", n=96, size=32)
    overrides = {"invert.manifest": str(manifest), "model.path": "builtin:tiny",
                 "reward.components": {"brightness": 1.0, "jpeg_compressibility": 0.5}}
    params = write_params(tmp_path / "params.yaml", **overrides)
    _run(_cli("precompute", "--params", params, "--out", tmp_path / "ref"))
    out = tmp_path / "killed"
    store = out / "cache" / "embeddings"
    # Killed once the prompt embeddings are stored, while the exemplars' rewards are being scored.
    killed = _kill_when(_cli("precompute", "--params", params, "--out", out),
                        lambda: store.is_dir() and any(store.glob("*.sha256")))
    assert killed, "precompute finished before it could be killed"
    assert not (out / "exemplar_rewards.parquet").exists()
    _run(_cli("precompute", "--params", params, "--out", out))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "exemplar_rewards.parquet"),
                                  pd.read_parquet(tmp_path / "ref" / "exemplar_rewards.parquet"))
    got, ref = (load_file(str(o / "prompt_embeddings.safetensors")) for o in (out, tmp_path / "ref"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def _tree(folder: Path) -> dict[str, object]:
    """A folder's files: bytes, or for JSON files their content without timings (``*seconds`` keys)."""
    import json

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if not k.endswith("seconds")}
        return v

    return {str(p.relative_to(folder)): strip(json.loads(p.read_text())) if p.suffix == ".json" else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("phase", ["training", "detector"])
def test_pretrain_killed_then_rerun_matches_an_uninterrupted_run(tmp_path, phase):
    """Killed while the transformer trains (nothing saved yet) or after the model is saved, while the
    artifact detector trains: the rerun builds what is missing (and reuses the finished model) and ends
    with the uninterrupted run's model, detector and figures; no half folder is ever left in place."""
    import json

    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"family": "sd3", "path": "builtin:tiny", "resolution": 16}, "tracking": {"enabled": False},
        "pretrain": {"steps": 200 if phase == "training" else 20, "batch_size": 8, "num_layers": 1, "width": 32,
                     "eval_samples": 4, "detector": {"steps": 1500 if phase == "detector" else 10}},
        "bench": {"num_steps": 4}}))
    _run(_cli("pretrain", "--params", params, "--out", tmp_path / "ref"))
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    cmd = _cli("pretrain", "--params", params, "--out", out)
    if phase == "training":  # once the loop has logged its 50th step of 200
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.time() + 300
            while "pretrain step 50/200" not in log.read_text() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            killed = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    else:
        killed = _kill_when(cmd, lambda: (out / "model" / "model_index.json").is_file())
    assert killed, "pretrain finished before it could be killed"
    assert not (out / "metrics.json").exists() and not (out / "artifact_detector").exists()
    model_before = _tree(out / "model") if (out / "model").exists() else {}
    assert (phase == "detector") == bool(model_before)  # killed in training: no model folder at all
    _run(_cli("pretrain", "--params", params, "--out", out))
    ref = tmp_path / "ref"
    assert _tree(out / "model") == _tree(ref / "model")
    if model_before:
        assert (out / "model" / "model_index.json").stat().st_mtime_ns <= (out / "metrics.json").stat().st_mtime_ns
        assert _tree(out / "model") == model_before  # reused, not retrained
    assert _tree(out / "artifact_detector") == _tree(ref / "artifact_detector")
    got, want = (json.loads((o / "metrics.json").read_text()) for o in (out, ref))
    volatile = {"train_seconds", "sample_seconds", "detector_train_seconds", "model_reused"}
    assert {k: v for k, v in got.items() if k not in volatile} == {k: v for k, v in want.items() if k not in volatile}
    assert got["model_reused"] is bool(model_before)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary sibling left behind

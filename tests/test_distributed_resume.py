"""Multi-process group statistics and exact resume after SIGKILL (real subprocesses)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from portraitgen.launch import free_port
from portraitgen.policies import tiny_model_path

from helpers import PYTHON_BIN, write_params


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _samples(out):
    return [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_give_the_same_first_step_advantages(tmp_path):
    tiny_model_path("sd3")  # build once, before two processes race for it
    # 12 samples in groups of 4 over 2 processes: rank 0 holds samples 0-5, so group 1 straddles both ranks.
    params = write_params(tmp_path / "params.yaml", **{"train.iterations": 1, "sample.global_batch_size": 12,
                                                       "sample.group_size": 4, "train.global_batch_size": 4})
    one = subprocess.run([sys.executable, "-m", "portraitgen", "train", "--params", str(params), "--out",
                          str(tmp_path / "one")], env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # On a machine without GPUs, Accelerate 1.x starts several CPU processes through its torchrun path
    # (`--multi_gpu`); `--cpu` alone launches a single process unless MPI is installed.
    two = subprocess.run([str(PYTHON_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(free_port()), "-m", "portraitgen", "train",
                          "--params", str(params), "--out", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert [r["sample_index"] for r in a] == [r["sample_index"] for r in b] == list(range(12))
    assert [r["group"] for r in b] == [0] * 4 + [1] * 4 + [2] * 4
    np.testing.assert_allclose([r["reward"] for r in b], [r["reward"] for r in a], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["advantage"] for r in b], [r["advantage"] for r in a], rtol=0, atol=1e-3)
    # Whole-group statistics: every group's advantages (including the straddling one) are standardised.
    adv = np.array([r["advantage"] for r in b]).reshape(3, 4)
    np.testing.assert_allclose(adv.mean(axis=1), 0, atol=1e-4)
    assert np.all(np.abs(adv).sum(axis=1) > 0.5)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2
    m1 = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    m2 = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert m2["reward/mean"] == pytest.approx(m1["reward/mean"], abs=1e-6)


def _train_cmd(params, out):
    return [sys.executable, "-m", "portraitgen", "train", "--params", str(params), "--out", str(out)]


def _final_rows(out):
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_an_uninterrupted_run(tmp_path):
    tiny_model_path("sd3")
    params = write_params(tmp_path / "params.yaml", **{"train.iterations": 5, "train.checkpoint_every": 1,
                                                       "train.keep_checkpoints": 2})
    ref = subprocess.run(_train_cmd(params, tmp_path / "ref"), env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(params, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("checkpoints/*/checkpoint-000001/state.json")):
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "final").exists()  # killed mid-run: nothing exported yet

    resumed = subprocess.run(_train_cmd(params, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    assert _final_rows(out) == _final_rows(tmp_path / "ref")
    assert [json.loads(ln)["iteration"] for ln in (out / "samples.jsonl").read_text().splitlines()] == \
        [i for i in range(5) for _ in range(8)]
    w_ref = load_file(str(tmp_path / "ref" / "final" / "pytorch_lora_weights.safetensors"))
    w_res = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert (w_ref[k] == w_res[k]).all(), k
    ref_summary = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    res_summary = json.loads((out / "metrics.json").read_text())
    for key in ("reward_first", "reward_last", "kl", "approx_kl", "clip_fraction"):
        assert res_summary[key] == ref_summary[key]

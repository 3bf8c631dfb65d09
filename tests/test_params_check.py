"""Every check before any job: one plain line per problem (portraitgen check, the `tracked` wrapper)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from portraitgen.params_check import check_command, check_params
from portraitgen.rewards.registry import available_rewards

from helpers import fast_params

BIN = Path(sys.executable).parent


def _set(data: dict, dotted: str, value) -> dict:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return data


def test_schema_problems_are_all_named_at_once_in_plain_words():
    data = fast_params()
    for dotted, value in (("train.lr", "fast"), ("sample.num_steps", "ten"), ("model.famly", "sd3"),
                          ("invert.mode", "brige")):
        _set(data, dotted, value)
    del data["reward"]
    assert check_params(data) == [
        "reward: missing (a required section or key)",
        "invert.mode: expected one of euler, fixed_point, bridge, got 'brige'",
        "model.famly: unknown key (did you mean 'family'?); known keys: family, path, resolution",
        "sample.num_steps: expected an integer, got 'ten'",
        "train.lr: expected a number (float), got 'fast'",
    ]


def test_ranges_then_what_the_params_point_at(tmp_path):
    assert check_params(_set(fast_params(), "train.lr", -1.0)) == ["train.lr: expected > 0, got -1.0"]
    data = fast_params()
    _set(data, "model.path", str(tmp_path / "sd35"))
    data["curate"] = {"source": str(tmp_path / "photos")}
    data["reward"] = {"components": {"omni_clasic": 1.0, "brightness": 1.0}, "options": {"brightness": {"gain": 2}}}
    data["bench"]["suite"] = str(tmp_path / "suite.jsonl")
    assert check_params(data) == [
        f"model.path: expected a diffusers model folder (with model_index.json) or builtin:tiny, "
        f"got '{tmp_path / 'sd35'}' (not found)",
        f"curate.source: expected builtin:demo, a folder of photos or a list file, got '{tmp_path / 'photos'}' "
        f"(not found)",
        f"bench_embeddings reads '{tmp_path / 'suite.jsonl'}' (named in params): not found",
        # Every registered reward (other test modules register a few of their own in the same process).
        "reward.components.omni_clasic: unknown reward (did you mean 'omni_classic'?); available: "
        + ", ".join(available_rewards()),
        "reward.options.brightness.gain: unknown option; brightness takes no options",
    ]
    assert {"ai_portrait", "ai_portrait_classic", "ai_portrait_detector", "ai_portrait_vlm", "brightness",
            "jpeg_compressibility", "omni", "omni_classic", "omni_vlm"} <= set(available_rewards())
    (tmp_path / "sd35").mkdir()
    _set(data, "model.path", str(tmp_path / "sd35"))
    assert "(a folder without model_index.json)" in check_params(data)[0]
    # A model another stage makes (pretrain's) is no problem: it will exist when a job needs it.
    assert check_params(_set(fast_params(), "model.path", "results/pretrain/model")) == []


def test_check_verb_and_tracked_refuse_before_running_anything(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_set(fast_params(), "train.lr", "fast")))
    proc = subprocess.run([str(BIN / "portraitgen"), "check", "--params", str(params)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "train.lr: expected a number (float), got 'fast'"
    marker = tmp_path / "ran"
    proc = subprocess.run([str(BIN / "portraitgen"), "tracked", "--params", str(params), "--", "dvc", "repro",
                           "--dry"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "nothing was run" in proc.stderr and not marker.exists()
    assert not (tmp_path / "mlflow.db").exists()  # no parent run either


def test_an_experiments_settings_are_checked_with_the_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(fast_params()))
    assert check_command(params, ["dvc", "exp", "run", "-S", "train.lr=0.01"]) == []
    assert check_command(params, ["dvc", "exp", "run", "-S", "train.lr=fast", "--name", "x"]) == [
        "train.lr: expected a number (float), got 'fast' (with train.lr=fast)"]
    assert check_command(params, ["echo", "-S", "train.lr=fast"]) == []  # not a DVC run: not checked

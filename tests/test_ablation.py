"""Ablation files: variants x seeds -> per-run params files and DVC experiment commands."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from portraitgen.ablation import AblationError, dvc_commands, load_ablation, run_params, write_run_params
from portraitgen.config import load_params

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ablation.yaml"
    path.write_text(text)
    return path


def test_repository_ablation_file_gives_valid_runs(tmp_path):
    ablation = load_ablation(REPO / "ablation.yaml")
    assert ablation.baseline_run in ablation.runs
    for run in ablation.runs:
        out = write_run_params(REPO / "params.yaml", REPO / "ablation.yaml", run, tmp_path / run / "params.yaml")
        load_params(out)  # every run is a valid experiment


def test_run_params_override_keys_set_the_seed_and_own_the_stage_outputs(tmp_path):
    path = _write(tmp_path, "baseline: plain\nseeds: [1, 7]\nvariants:\n"
                            "  plain: {train.exemplars.per_group: 0}\n  euler: {invert.mode: euler, train.lr: 0.01}\n")
    ablation = load_ablation(path)
    assert ablation.runs == ["plain-s1", "plain-s7", "euler-s1", "euler-s7"]
    data = run_params(REPO / "params.yaml", ablation, "euler-s7", tmp_path / "runs" / "euler-s7")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    assert data["seed"] == 7 and data["invert"]["mode"] == "euler" and data["train"]["lr"] == 0.01
    assert data["train"]["exemplars"]["per_group"] == base["train"]["exemplars"]["per_group"]
    run_dir = tmp_path / "runs" / "euler-s7"
    assert data["train"]["exemplars"]["index"] == str(run_dir / "invert" / "index.parquet")
    assert data["train"]["prompt_embeddings"] == str(run_dir / "precompute" / "prompt_embeddings.safetensors")
    # Everything else is the base experiment's.
    assert data["curate"] == base["curate"] and data["invert"]["manifest"] == base["invert"]["manifest"]


@pytest.mark.parametrize("text, message", [
    ("variants: {}\n", "'variants' must be a non-empty mapping"),
    ("seeds: [1]\nvariants: {a: {}}\nextra: 1\n", "unknown key 'extra'"),
    ("baseline: b\nvariants: {a: {}}\n", "baseline 'b' is not a variant"),
    ("seeds: [one]\nvariants: {a: {}}\n", "'seeds' must be a non-empty list of integers"),
    ("variants: {'a b': {}}\n", "variant name 'a b'"),
    ("variants: {a: {train.lr: -1}}\n", "run a-s42: params key 'train.lr': expected > 0"),
    ("variants: {a: {train.no_such_key: 1}}\n", "unknown params key 'train.no_such_key'"),
])
def test_bad_ablation_files_are_named(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(AblationError, match="ablation.yaml") as err:
        ablation = load_ablation(path)
        for run in ablation.runs:
            run_params(REPO / "params.yaml", ablation, run, tmp_path / run)
    assert message in str(err.value)


def test_dvc_experiments_queue_one_run_each(tmp_path):
    path = _write(tmp_path, "seeds: [3]\nvariants:\n  plain: {train.exemplars.per_group: 0}\n"
                            "  mix: {train.exemplars.schedule: linear_decay, reward.components: {brightness: 2.0}}\n")
    commands = dvc_commands(load_ablation(path))
    assert commands[0] == ["dvc", "exp", "run", "--queue", "--name", "plain-s3", "-S", "seed=3",
                           "-S", "train.exemplars.per_group=0"]
    assert commands[1][-4:] == ["-S", "train.exemplars.schedule=linear_decay", "-S",
                                "reward.components={brightness: 2.0}"]
    assert commands[-1] == ["dvc", "exp", "run", "--run-all"]


def test_cli_lists_runs_and_reports_errors(tmp_path):
    cli = [sys.executable, "-m", "portraitgen", "ablation"]
    listed = subprocess.run([*cli, "list", "--variants", str(REPO / "ablation.yaml")], capture_output=True,
                            text=True, check=True).stdout.split()
    assert listed == load_ablation(REPO / "ablation.yaml").runs
    bad = subprocess.run([*cli, "list", "--variants", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and "ablation file not found" in bad.stderr

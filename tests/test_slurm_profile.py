"""workflow/profiles/slurm as Snakemake reads it (a dry run, no cluster needed): threads become the
commands' workers and the jobs' CPUs, model stages get a GPU and memory for real weights."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
MODEL_RULES = ("invert", "precompute", "bench_embeddings", "train", "bench")

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="needs snakemake (extra 'workflow')")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict[str, dict]:
    project = tmp_path_factory.mktemp("project")
    for name in ("workflow", "portraitgen"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("Snakefile", "dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, project / name)
    env = dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
               PYTHONPATH=str(project))
    proc = subprocess.run([SNAKEMAKE, "-n", "--workflow-profile", "workflow/profiles/slurm"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs, current = {}, None
    for line in proc.stdout.splitlines():
        if m := re.match(r"^rule (\w+):", line):
            current = jobs.setdefault(m.group(1), {"threads": 1})
        elif current is not None and (m := re.match(r"^\s+threads: (\d+)", line)):
            current["threads"] = int(m.group(1))
        elif current is not None and (m := re.match(r"^\s+resources: (.*)", line)):
            current.update(kv.split("=", 1) for kv in m.group(1).split(", "))
        elif current is not None and line.startswith("Shell command: "):
            current["shell"] = line
    return jobs


def test_threads_are_the_profiles_and_reach_the_command(dry_run):
    threads = yaml.safe_load(PROFILE.read_text())["set-threads"]
    assert dry_run["curate"]["threads"] == threads["curate"] == 16
    assert "--workers 16" in dry_run["curate"]["shell"]  # not capped at the login node's CPUs
    for rule in MODEL_RULES:
        assert dry_run[rule]["threads"] == threads[rule], rule


def test_model_stages_get_a_gpu_and_memory_for_real_weights(dry_run):
    for rule in MODEL_RULES:
        job = dry_run[rule]
        assert job["slurm_partition"] == "gpu" and int(job["gpu"]) == 1, rule
        assert int(job["mem_mb"]) >= 48000, rule  # T5-XXL alone is ~10 GB in bf16, loaded on the host
    assert int(dry_run["train"]["mem_mb"]) >= 128000 and int(dry_run["train"]["runtime"]) >= 1440
    assert dry_run["curate"]["slurm_partition"] == "cpu" and "gpu" not in dry_run["curate"]


def test_site_settings_are_documented_with_examples():
    text = PROFILE.read_text()
    for example in ('slurm_account: "proj1234"', 'gres: "gpu:a100:1"', 'constraint: "a100|h100"',
                    'qos: "normal"', 'slurm_extra: "--exclusive"'):
        assert example in text, example
    profile = yaml.safe_load(text)
    assert "slurm_account" not in profile["default-resources"]  # a placeholder is never submitted


def test_ablation_rules_and_the_reward_server_are_sized_like_their_stages():
    profile = yaml.safe_load(PROFILE.read_text())
    threads, resources = profile["set-threads"], profile["set-resources"]
    for stage in ("invert", "precompute", "train", "bench"):  # the ablation's twins of the stage rules
        assert threads[f"ablation_{stage}"] == threads[stage], stage
        assert resources[f"ablation_{stage}"] == resources[stage], stage
    server = resources["reward_server"]  # workflow/rules/reward_server.smk asks for a GPU
    assert server["slurm_partition"] == "gpu" and server["gpu"] == 1 and threads["reward_server"] >= 4
    assert server["runtime"] >= resources["train"]["runtime"]  # it serves a whole training job

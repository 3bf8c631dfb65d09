"""One MLflow parent run per pipeline invocation, the stages' runs as its children."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from portraitgen.config import load_params
from portraitgen.pipeline_run import end_parent_run, start_parent_run
from portraitgen.tracking import PARENT_ENV, Tracker
from tests.helpers import fast_params


def _params(tmp_path: Path) -> Path:
    p = fast_params()
    p["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "pipe"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def test_stage_runs_become_children_and_the_parent_collects_their_metrics(tmp_path, monkeypatch):
    params_path = _params(tmp_path)
    params = load_params(params_path)
    parent = start_parent_run(params_path, launcher="snakemake", command="snakemake --cores 2")
    monkeypatch.setenv(PARENT_ENV, parent)
    monkeypatch.setenv("PORTRAITGEN_SYSTEM_METRICS", "0")
    for stage, value in (("curate", 3.0), ("train", 0.5)):
        tracker = Tracker(params.tracking, stage=stage, active=True)
        tracker.log_metrics({"score": value}, step=0)
        tracker.end()
    assert end_parent_run(params_path, parent, "FINISHED") == 2

    client = MlflowClient(params.tracking.uri)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.tags["portraitgen.launcher"] == "snakemake"
    assert run.data.tags["portraitgen.stages"] == "curate,train"
    assert run.data.metrics == {"curate/score": 3.0, "train/score": 0.5}
    assert run.data.params["train.lr"] == str(params.train.lr)  # the experiment's params on the parent
    assert [a.path for a in client.list_artifacts(parent)] == ["params.yaml"]
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.data.tags["portraitgen.stage"] for c in children) == ["curate", "train"]


def test_tracked_wraps_a_command_and_fails_the_parent_with_it(tmp_path):
    params_path = _params(tmp_path)
    stage = tmp_path / "stage.py"
    stage.write_text(textwrap.dedent(f"""
        import sys
        from portraitgen.config import load_params
        from portraitgen.tracking import Tracker
        t = Tracker(load_params({str(params_path)!r}).tracking, stage="bench", active=True)
        t.log_metrics({{"x": 1.0}}, step=0)
        t.end()
        sys.exit(int(sys.argv[1]))
    """))
    env = {k: v for k, v in os.environ.items() if k != PARENT_ENV}
    env["PORTRAITGEN_SYSTEM_METRICS"] = "0"
    cli = [sys.executable, "-m", "portraitgen", "tracked", "--params", str(params_path), "--launcher", "dvc", "--"]
    assert subprocess.run([*cli, sys.executable, str(stage), "0"], env=env).returncode == 0
    assert subprocess.run([*cli, sys.executable, str(stage), "3"], env=env).returncode == 3

    client = MlflowClient(load_params(params_path).tracking.uri)
    exp = client.get_experiment_by_name("pipe")
    parents = client.search_runs([exp.experiment_id], "tags.`portraitgen.stage` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    assert [p.info.status for p in parents] == ["FINISHED", "FAILED"]
    for p in parents:
        assert p.data.tags["portraitgen.launcher"] == "dvc"
        assert p.data.metrics == {"bench/x": 1.0}


def test_disabled_tracking_starts_no_parent(tmp_path):
    p = fast_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    assert start_parent_run(tmp_path / "params.yaml", launcher="snakemake") is None


def test_a_named_run_names_its_parent_and_tags_every_run(tmp_path, monkeypatch):
    """`snakemake --config run=NAME` (workflow/rules/common.smk sets PORTRAITGEN_RUN for its jobs)."""
    params_path = _params(tmp_path)
    params = load_params(params_path)
    monkeypatch.setenv("PORTRAITGEN_RUN", "lr-high")
    monkeypatch.setenv("PORTRAITGEN_SYSTEM_METRICS", "0")
    parent = start_parent_run(params_path, launcher="snakemake", run_name="lr-high")
    monkeypatch.setenv(PARENT_ENV, parent)
    tracker = Tracker(params.tracking, stage="train", active=True)
    tracker.end()
    end_parent_run(params_path, parent, "FINISHED")
    client = MlflowClient(params.tracking.uri)
    run = client.get_run(parent)
    assert run.info.run_name == "lr-high (snakemake)" and run.data.tags["portraitgen.run"] == "lr-high"
    child, = client.search_runs([run.info.experiment_id], "tags.`portraitgen.run` = 'lr-high' and "
                                                          "tags.`portraitgen.stage` = 'train'")
    assert child.data.tags["mlflow.parentRunId"] == parent

"""MLflow holds the experiment: git commit and DVC experiment on every run, parent keys without a doubled
stage, the curated manifest as a dataset input, the trained model logged and loaded back (real store)."""
from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from portraitgen.config import load_params
from portraitgen.pipeline_run import end_parent_run, start_parent_run
from portraitgen.run_context import git_commit
from portraitgen.tracking import PARENT_ENV, Tracker
from tests.helpers import fast_params, make_manifest


@pytest.fixture()
def params_path(tmp_path, monkeypatch):
    # The stages run inside a git checkout with a known commit (the tags must name it).
    repo = tmp_path / "checkout"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PORTRAITGEN_SYSTEM_METRICS", "0")
    monkeypatch.delenv(PARENT_ENV, raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    p = fast_params()
    p["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ux"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def _stage(params, stage: str, metrics: dict[str, float]) -> str:
    tracker = Tracker(params.tracking, stage=stage, active=True)
    tracker.log_metrics(metrics, step=0)
    tracker.end()
    return tracker.run_id


def test_stage_runs_of_a_dvc_experiment_share_a_parent_named_after_it(params_path, monkeypatch):
    params = load_params(params_path)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-lr01")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    first, second = _stage(params, "curate", {"kept": 3}), _stage(params, "train", {"reward": 0.5})
    monkeypatch.setenv("DVC_EXP_NAME", "exp-other")
    other = _stage(params, "curate", {"kept": 4})

    client = MlflowClient(params.tracking.uri)
    runs = {r: client.get_run(r) for r in (first, second, other)}
    parent = runs[first].data.tags["mlflow.parentRunId"]
    assert runs[second].data.tags["mlflow.parentRunId"] == parent
    assert runs[other].data.tags["mlflow.parentRunId"] != parent
    p = client.get_run(parent)
    assert p.info.run_name == "exp-lr01 (dvc exp run)" and p.data.tags["portraitgen.stage"] == "pipeline"
    assert p.data.tags["portraitgen.dvc_exp"] == "exp-lr01" and p.data.tags["portraitgen.dvc_baseline"] == "abc123"
    for run in runs.values():  # every stage run says which code ran
        assert run.data.tags["mlflow.source.git.commit"] == git_commit() != ""
        assert run.data.tags["portraitgen.dvc_exp"] in ("exp-lr01", "exp-other")


def test_a_tracked_parent_takes_the_experiment_name_and_collects_keys_once(params_path, monkeypatch):
    params = load_params(params_path)
    parent = start_parent_run(params_path, launcher="dvc", command="dvc exp run -S train.lr=0.01")
    monkeypatch.setenv(PARENT_ENV, parent)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-lr01")
    _stage(params, "bench", {"bench/trained_vs_base/ai_portrait/diff": 0.04, "bench/base/ai_portrait": 0.5})
    _stage(params, "curate", {"kept": 3})
    end_parent_run(params_path, parent)
    run = MlflowClient(params.tracking.uri).get_run(parent)
    assert run.info.run_name == "exp-lr01 (dvc exp run)"
    assert run.data.metrics == {"bench/trained_vs_base/ai_portrait/diff": 0.04, "bench/base/ai_portrait": 0.5,
                                "curate/kept": 3.0}


def test_trained_model_summary_and_datasets_are_logged_and_the_model_loads_back(params_path, tmp_path, monkeypatch):
    from portraitgen.export import load_trained
    from portraitgen.logged_model import load_logged_model
    from portraitgen.training import GRPOTrainer, Hardware

    torch.set_num_threads(1)
    manifest = make_manifest(tmp_path / "curate", n=2)
    data = yaml.safe_load(params_path.read_text())
    data["train"].update(iterations=1, checkpoint_every=1)
    data["invert"] = {"manifest": str(manifest)}
    data["train"]["sft"] = {"share": 0.0}
    params_path.write_text(yaml.safe_dump(data))
    params = load_params(params_path)
    summary = GRPOTrainer(params, tmp_path / "train", Hardware()).run()
    client = MlflowClient(params.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("ux").experiment_id],
                             "tags.`portraitgen.stage` = 'train'")[0]
    assert run.data.metrics["summary/reward_first"] == pytest.approx(summary["reward_first"])
    assert run.data.metrics["summary/iterations"] == 1
    assert run.data.tags["mlflow.source.git.commit"] == git_commit()
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {
        "model/portraitgen.json", "model/pytorch_lora_weights.safetensors"}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", params.tracking.uri)
    logged = load_logged_model(f"runs:/{run.info.run_id}/model", dst=tmp_path / "download")
    local = load_trained(str(tmp_path / "train"))
    names = [n for n, _ in local.transformer.named_parameters() if "lora" in n]
    assert names
    a, b = dict(logged.transformer.named_parameters()), dict(local.transformer.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in names)


def test_curated_manifest_is_a_dataset_input(params_path, tmp_path):
    params = load_params(params_path)
    manifest = make_manifest(tmp_path / "curate", n=3)
    tracker = Tracker(params.tracking, stage="curate", active=True)
    tracker.log_dataset(manifest, name="curated-portraits", context="curated")
    tracker.end()
    run = MlflowClient(params.tracking.uri).get_run(tracker.run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "curated-portraits" and str(manifest.resolve()) in inp.dataset.source
    assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["curated"]
    assert '"num_rows": 4' in inp.dataset.profile and len(pd.read_parquet(manifest)) == 4


def test_training_datasets_are_the_real_data_a_run_reads(tmp_path):
    from portraitgen.config import params_from_dict
    from portraitgen.logged_model import training_datasets

    manifest = make_manifest(tmp_path / "curate", n=2)
    index = tmp_path / "index.parquet"
    index.write_bytes(b"")
    plain = params_from_dict({**fast_params(), "invert": {"manifest": str(manifest)}})
    assert training_datasets(plain) == []  # plain GRPO reads no real images
    data = fast_params(**{"train.exemplars.per_group": 1, "train.exemplars.index": str(index),
                          "prompts.source": "exemplars",
                          "train.exemplars.rewards": str(tmp_path / "r.parquet")})
    data["invert"] = {"manifest": str(manifest)}
    assert training_datasets(params_from_dict(data)) == [(manifest, "curated-portraits"), (index, "exemplar-index")]

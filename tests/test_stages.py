"""The stage table (portraitgen/stages.py): dvc.yaml is generated from it, and the files a stage reads
come from params (a path into another stage's folder is a dependency on that stage)."""
from __future__ import annotations

from pathlib import Path

import yaml

from portraitgen.cli import main
from portraitgen.config import load_params, params_from_dict
from portraitgen.stages import STAGES, producer, stage, stage_inputs

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_generated_from_the_table(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert main(["dvc-yaml", "--check"]) == 0, "dvc.yaml is stale: run `portraitgen dvc-yaml --write`"
    stale = tmp_path / "dvc.yaml"
    stale.write_text((REPO / "dvc.yaml").read_text().replace("results/train/final", "results/train/model"))
    assert main(["dvc-yaml", "--check", "--file", str(stale)]) == 1
    assert main(["dvc-yaml", "--write", "--file", str(stale)]) == 0
    assert stale.read_text() == (REPO / "dvc.yaml").read_text()
    stages = yaml.safe_load(stale.read_text())["stages"]
    assert list(stages) == [s.name for s in STAGES]


def test_checksum_sidecars_are_outputs_beside_their_files():
    """Every file whose readers verify a `.sha256` sidecar (portraitgen/integrity.py) declares the sidecar
    as an output of the same stage, so `dvc checkout` / `dvc exp apply` never pairs a file with the
    checksum of another version of it."""
    checked = {"curate": "manifest.parquet", "invert": "index.parquet",
               "precompute": ["prompt_embeddings.safetensors", "exemplar_rewards.parquet"],
               "bench_embeddings": "bench_prompt_embeddings.safetensors"}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, files in checked.items():
        folder = stage(name).out_dir()
        for file in [files] if isinstance(files, str) else files:
            assert f"{folder}/{file}" in stages[name]["outs"], (name, file)
            assert f"{folder}/{file}.sha256" in stages[name]["outs"], (name, file)
    sidecars = [o.path for s in STAGES for o in s.outputs if o.path.endswith(".sha256")]
    assert len(sidecars) == 5  # and no other stage declares one it never writes


def test_a_named_run_moves_every_path_into_a_stage_folder_under_its_root():
    import pytest

    from portraitgen.stages import NAMED_ROOT, Workflow, named_run_params, named_run_root

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["curate"]["source"] = "photos/mine"  # user files stay
    data["reward"]["options"] = {"ai_portrait": {"backend": "detector", "path": "results/precompute/detector"},
                                 "omni": {"path": "results/detector"}}  # no stage makes results/detector
    run = named_run_params(data, named_run_root("a"))
    assert run["model"]["path"] == "results/runs/a/pretrain/model"
    assert run["invert"]["manifest"] == "results/runs/a/curate/manifest.parquet"
    assert run["bench"]["models"] == {**data["bench"]["models"], "trained": "results/runs/a/train"}
    assert run["reward"]["options"]["ai_portrait"]["path"] == "results/runs/a/precompute/detector"
    assert run["reward"]["options"]["omni"]["path"] == "results/detector"
    assert run["curate"]["source"] == "photos/mine" and run["train"]["lr"] == data["train"]["lr"]
    assert data["model"]["path"] == "results/pretrain/model"  # the input is left as it was
    # The run's stages read one another's outputs under its root, and nothing of results/<stage>.
    wf = Workflow(yaml.safe_load((REPO / "params.yaml").read_text()), run="a")
    assert wf.main_root == "results/runs/a" and NAMED_ROOT.match(wf.main_root)
    assert stage_inputs(stage("train"), wf.params("results/runs/a")) == [
        "results/runs/a/invert/index.parquet", "results/runs/a/precompute/exemplar_rewards.parquet",
        "results/runs/a/precompute/prompt_embeddings.safetensors", "results/runs/a/pretrain/metrics.json"]
    assert Workflow({}).main_root == "results"
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="run name"):
            named_run_root(bad)


def test_paths_into_a_stage_folder_depend_on_that_stage():
    assert producer("results/train")[1] == "results/train/final"  # a training output folder: its model
    assert producer("results/train/final/")[1] == "results/train/final"
    assert producer("results/precompute/detector")[1] == "results/precompute/metrics.json"  # undeclared cache
    assert producer("results/precompute/bench_prompt_embeddings.safetensors")[0].name == "bench_embeddings"
    assert producer("results/ablation/plain-s1/invert/index.parquet")[1] == "results/ablation/plain-s1/invert/index.parquet"
    assert producer("/data/photos") is None and producer("results/detector") is None


def test_a_detector_trained_by_precompute_orders_its_readers_after_it():
    """ai_portrait with backend detector (not only ai_portrait_detector) reads precompute's detector."""
    reward = {"components": {"ai_portrait": 1.0},
              "options": {"ai_portrait": {"backend": "detector", "path": "results/precompute/detector"}}}
    params = params_from_dict({"reward": reward, "bench": {"reward": reward}, "train": {"prompt_embeddings": ""}})
    for name in ("train", "bench"):
        assert "results/precompute/metrics.json" in stage_inputs(stage(name), params), name
    assert "results/precompute/metrics.json" not in stage_inputs(stage("precompute"), params)  # it trains it


def test_a_model_made_by_a_stage_is_a_dependency_of_every_stage_that_loads_it():
    params = params_from_dict({"model": {"path": "results/train/final"}})
    loading = [s.name for s in STAGES if "results/train/final" in stage_inputs(s, params)]
    assert loading == ["invert", "precompute", "bench_embeddings", "bench"]  # train makes it; curate never loads it
    user = params_from_dict({"model": {"path": "/models/sd3"}})
    assert all("/models/sd3" not in stage_inputs(s, user) for s in STAGES)  # a user's model folder is not hashed


def test_default_params_read_the_other_stages_outputs():
    params = load_params(REPO / "params.yaml")
    assert stage_inputs(stage("train"), params) == ["results/invert/index.parquet",
                                                    "results/precompute/exemplar_rewards.parquet",
                                                    "results/precompute/prompt_embeddings.safetensors",
                                                    "results/pretrain/metrics.json"]  # the default model.path
    assert stage_inputs(stage("curate"), params) == []
    assert stage_inputs(stage("pretrain"), params) == []


def test_ablation_run_names_are_the_roots_the_rules_accept():
    import re

    from portraitgen.ablation import run_name
    from portraitgen.stages import ROOT_PATTERNS, RUN_ROOT, Workflow

    for variant, seed in (("plain", 42), ("exemplar_euler", 1), ("v1.2", 1234)):
        root = f"results/ablation/{run_name(variant, seed)}"
        assert RUN_ROOT.match(root).group("run") == run_name(variant, seed)
        assert re.fullmatch(ROOT_PATTERNS["run"], root)
        assert re.fullmatch(Workflow.run_constraint(), run_name(variant, seed))
    assert not RUN_ROOT.match("results/ablation/bench")  # the ablation's bench is not a run

"""The whole pipeline, for real: `snakemake --cores 2` with the real `portraitgen` on a small copy of the
project (tiny model, a handful of the shipped demo portraits, 32 px, a few steps), then what a user
checks afterwards: every stage's outputs, one MLflow parent run with a child per stage holding its
metrics and artifacts, a second run that does nothing, and which jobs a changed param reruns.

The run happens once per session (module fixture, ~1-2 minutes on 2 cores); the tests read its results.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import fast_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
pytestmark = pytest.mark.skipif(not SNAKEMAKE.exists() or not (BIN / "portraitgen").exists(),
                                reason="needs snakemake and the portraitgen command in this environment")

STAGES = ("curate", "invert", "precompute", "train", "bench")  # bench_embeddings logs no MLflow run
SUITE = [  # a 4-prompt PortraitBench suite: the built-in one takes minutes at this scale
    {"id": f"e2e-{i}", "prompt": p, "categories": cats, "subsets": []}
    for i, (p, cats) in enumerate([
        ("a close-up headshot photo of an old man, studio lighting", ["shot:headshot", "light:studio"]),
        ("a half-body portrait photo of a young woman in daylight", ["shot:half_body", "light:daylight"]),
        ("a headshot photo of a smiling woman with freckles, golden hour", ["shot:headshot", "stress:freckles"]),
        ("a full-body photo of a man with a beard, backlit", ["shot:full_body", "light:backlit"]),
    ])
]


def _params(project: Path) -> dict:
    p = fast_params()
    p["model"]["resolution"] = 32
    p["curate"].update(source="photos", bench_fraction=0.3)
    p["prompts"]["source"] = "exemplars"
    p["invert"].update(diagnostic_samples=2)
    p["sample"].update(num_steps=4, eval_num_steps=4, global_batch_size=8, group_size=4)
    p["train"].update(iterations=2, global_batch_size=4, checkpoint_every=1, log_images_every=1,
                      prompt_embeddings="results/precompute/prompt_embeddings.safetensors",
                      exemplars={"per_group": 1, "index": "results/invert/index.parquet",
                                 "rewards": "results/precompute/exemplar_rewards.parquet"})
    repo_bench = yaml.safe_load((REPO / "params.yaml").read_text())["bench"]
    p["bench"] = {**repo_bench, "suite": "suite.jsonl", "subset": "full", "seeds": [0, 1], "num_steps": 4,
                  "bootstrap": 200}
    p["tracking"] = {"enabled": True, "uri": f"sqlite:///{project / 'mlflow.db'}", "experiment": "e2e"}
    return p


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PORTRAITGEN_PARENT_RUN_ID"}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")  # two jobs at a time on two cores
    return env


def smk(project: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(SNAKEMAKE), "--cores", "2", *args], cwd=project, env=_env(),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in (project / "results" / "logs").glob("*.log"))
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}{logs}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from portraitgen.demo_portraits import materialise

    root = tmp_path_factory.mktemp("e2e") / "project"
    root.mkdir()
    for name in ("workflow", "portraitgen"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("Snakefile", "dvc.yaml", "ablation.yaml"):
        shutil.copy2(REPO / name, root / name)
    os.symlink(os.readlink(REPO / "profiles"), root / "profiles")
    demo = materialise(root / "demo")
    photos = root / "photos"
    photos.mkdir()
    faces = sorted(p for p in demo.rglob("*") if p.suffix in (".png", ".jpg") and "lfw" in p.name.lower())[:8]
    for src in [demo / "astronaut.png", demo / "grace_hopper.jpg", *faces]:
        if src.exists():
            shutil.copy2(src, photos / src.name)
    (root / "suite.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SUITE))
    (root / "params.yaml").write_text(yaml.safe_dump(_params(root), sort_keys=False))
    first = smk(root)
    (root / "first-run.log").write_text(first.stdout + first.stderr)
    return root


def test_every_stage_wrote_its_outputs(project):
    res = project / "results"
    for path in ("curate/manifest.parquet", "invert/index.parquet", "precompute/prompt_embeddings.safetensors",
                 "train/metrics.json", "bench/scores.parquet", "bench/report.html", "bench/metrics.json"):
        assert (res / path).is_file() and (res / path).stat().st_size > 0, path
    assert any((res / "train" / "final").iterdir())
    bench = json.loads((res / "bench" / "metrics.json").read_text())
    assert set(bench) >= {"base", "trained", "comparisons"}
    assert "trained_vs_base" in bench["comparisons"]
    for stage in STAGES:  # logs and benchmarks of every rule
        assert (res / "logs" / f"{stage}.log").is_file() and (res / "benchmarks" / f"{stage}.tsv").is_file()


def test_mlflow_has_one_parent_with_a_child_per_stage(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("portraitgen.stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["portraitgen.launcher"] == "snakemake"
    children = {r.data.tags["portraitgen.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    assert len(runs) == 1 + len(STAGES)  # no stage logged outside the parent
    for stage, run in children.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.params, f"{stage} logged no params"
        assert run.data.metrics, f"{stage} logged no metrics"
        if stage == "bench":  # sampled every 2 s: the short stages may end before the first sample
            assert any(k.startswith("system/") for k in run.data.metrics), f"{stage}: no system metrics"
        # ... and the parent carries them for side-by-side comparison.
        assert any(k.startswith(f"{stage}/") for k in parent.data.metrics), stage

    def artifacts(run_id: str, path: str = "") -> list[str]:
        out = []
        for a in client.list_artifacts(run_id, path):
            out += artifacts(run_id, a.path) if a.is_dir else [a.path]
        return out

    train_metrics = children["train"].data.metrics
    assert {"reward_mean", "kl"} <= {k.split("/")[-1] for k in train_metrics} or "reward/mean" in train_metrics
    assert any(p.endswith(".png") for p in artifacts(children["train"].info.run_id))  # sample grids
    assert any(p.endswith("report.html") for p in artifacts(children["curate"].info.run_id))
    bench_artifacts = artifacts(children["bench"].info.run_id)
    assert any(p.endswith("report.html") for p in bench_artifacts)
    assert any(p.endswith("scores.json") for p in bench_artifacts)  # the MLflow table
    assert any(k.startswith("bench/trained_vs_base/") for k in children["bench"].data.metrics)


def test_second_run_does_nothing_and_opens_no_run(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    before = len(client.search_runs([exp.experiment_id], max_results=100))
    proc = smk(project)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert len(client.search_runs([exp.experiment_id], max_results=100)) == before


def test_a_training_param_reruns_train_and_bench_only(project):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["train"]["lr"] = params["train"]["lr"] * 2
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        dry = smk(project, "-n")
        assert set(re.findall(r"^(?:local)?rule (\w+):$", dry.stdout, re.M)) == {"train", "bench", "all"}
    finally:
        params_path.write_text(original)

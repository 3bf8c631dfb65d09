"""The pipeline on a real single-node SLURM cluster, through workflow/profiles/slurm (docs/cluster.md).

The harness (tests/slurm_cluster.py) installs SLURM from the system packages when it is missing and
it can (root, apt-get), starts slurmctld + slurmd from a configuration in a temporary folder with the
partitions the profile names and two fake GPUs (gres files /dev/null, /dev/zero), and stops the cluster
afterwards. Where it cannot start, every test here is skipped with the reason.

- the pipeline up to training (its quick form) with `snakemake --workflow-profile workflow/profiles/slurm`;
- a rule that fails inside its SLURM job is reported, and snakemake exits non-zero;
- the multi-node training recipe (profiles/slurm/train-multinode.sbatch) on one node with 2 GPUs.

Pipeline tests run on a copy of the project's workflow files (root Snakefile, profiles/, workflow/,
the package, params.yaml) in a temporary folder, with fast params (32 px, 4 steps, one GRPO iteration,
a nine-photo curate source, MLflow in a sqlite file of that folder). Jobs find `portraitgen` on PATH
(the virtualenv's bin comes first; sbatch exports the environment). GPU jobs see their fake GPUs
(CUDA_VISIBLE_DEVICES=0,...) and run on the CPU, since torch has no CUDA device here.

Every snakemake run is wrapped in `timeout -k`: a confused status loop of the executor can ignore
SIGTERM (notes/slurm-local.md).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import fast_params, in_ci, skip_unless_ci, write_params
from slurm_cluster import SlurmCluster, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
PROFILE = "workflow/profiles/slurm"
RUN_LIMIT_S = 600  # one snakemake run, killed (timeout -k) beyond this

NO_PLUGIN = SNAKEMAKE is None or importlib.util.find_spec("snakemake_executor_plugin_slurm") is None
NO_PLUGIN_REASON = "needs snakemake and snakemake-executor-plugin-slurm (extra 'workflow')"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(RUN_LIMIT_S + 120),
    # In CI a missing plugin is a failure (the cluster fixture says so), never a quiet skip.
    pytest.mark.skipif(NO_PLUGIN and not in_ci(), reason=NO_PLUGIN_REASON),
]


def profile_partitions() -> list[str]:
    """The partitions workflow/profiles/slurm sends jobs to (the default one first)."""
    profile = yaml.safe_load((REPO / PROFILE / "config.yaml").read_text())
    names = [profile.get("default-resources", {}).get("slurm_partition", "debug")]
    for resources in (profile.get("set-resources") or {}).values():
        if resources.get("slurm_partition") and resources["slurm_partition"] not in names:
            names.append(resources["slurm_partition"])
    return names


def profile_memory_mb() -> int:
    """The largest mem_mb a job of workflow/profiles/slurm asks for."""
    profile = yaml.safe_load((REPO / PROFILE / "config.yaml").read_text())
    asked = [r.get("mem_mb", 0) for r in (profile.get("set-resources") or {}).values()]
    return max([32000, profile.get("default-resources", {}).get("mem_mb", 0), *asked])


@pytest.fixture(scope="module")
def cluster():
    if NO_PLUGIN:
        skip_unless_ci(NO_PLUGIN_REASON)
    try:
        # The node declares the most memory a profile job asks (SlurmdParameters=config_overrides lets it
        # declare more than it has; the fast params use little of it).
        c = SlurmCluster.start(partitions=profile_partitions(), cpus=4, gpus=2, memory_mb=profile_memory_mb())
    except SlurmUnavailable as exc:
        skip_unless_ci(f"no single-node SLURM here: {exc}")
    yield c
    c.stop()


def copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("Snakefile", "params.yaml"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    if (REPO / "profiles").is_symlink():
        os.symlink(os.readlink(REPO / "profiles"), dest / "profiles")
    for name in ("workflow", "portraitgen"):  # the rules list the package's files as inputs
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def write_photos(folder: Path) -> Path:
    """Nine real photos of the demo set: 2 named portraits, 6 LFW faces, and the cameraman (no face)."""
    from portraitgen.demo_portraits import materialise

    demo = materialise(folder.parent / "demo")
    (folder / "lfw").mkdir(parents=True)
    for name in ("astronaut.png", "grace_hopper.jpg", "camera.png", "captions.jsonl"):
        shutil.copy2(demo / name, folder / name)
    for face in sorted((demo / "lfw").glob("face_*.png"))[:6]:
        shutil.copy2(face, folder / "lfw" / face.name)
    return folder


def write_fast_params(project: Path, **overrides) -> None:
    """The repository's pipeline (curated exemplars in the groups, precomputed embeddings and exemplar
    rewards), shrunk to seconds per stage."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    params = fast_params(**{
        "prompts.source": base["prompts"]["source"],
        "train.prompt_embeddings": base["train"]["prompt_embeddings"],
        "train.exemplars": base["train"]["exemplars"],
        "train.iterations": 1,
        "sample.num_steps": 4,
        "sample.eval_num_steps": 4,
        "curate.source": "photos",
        "curate.captions": "photos/captions.jsonl",
        "invert.shard_size": 4,
        "invert.diagnostic_samples": 2,
        "tracking.enabled": True,
        "tracking.uri": f"sqlite:///{project / 'mlflow.db'}",
        **overrides,
    })
    # PortraitBench, where the pipeline has it: one seed, few steps and resamples.
    for key, value in {"seeds": [0], "num_steps": 4, "bootstrap": 100}.items():
        if key in params.get("bench", {}) and f"bench.{key}" not in overrides:
            params["bench"][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_snakemake(cluster: SlurmCluster, project: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    cmd = ["timeout", "-k", "10", str(RUN_LIMIT_S), SNAKEMAKE, "--workflow-profile", PROFILE,
           "--jobs", "2",
           "--max-threads", "2",  # the rules' threads (curate: 8) on this 2-core machine
           # Poll early: the jobs take seconds, the profile's first check waits 20 s. The cluster's
           # MinJobAge is far above 3 x 2 s, so the executor keeps squeue (no slurmdbd, no sacct).
           "--slurm-init-seconds-before-status-checks", "2",
           "--slurm-keep-successful-logs", *args]
    return subprocess.run(cmd, cwd=project, env=cluster.env(env), capture_output=True, text=True,
                          timeout=RUN_LIMIT_S + 60)


def slurm_jobs(cluster: SlurmCluster, output: str) -> dict[str, dict[str, str]]:
    """rule -> `scontrol show job` fields of its SLURM job, for every job the executor submitted."""
    jobs = {}
    for job_id in re.findall(r"submitted with SLURM jobid (\d+)", output):
        line = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        jobs[fields["Comment"].removeprefix("rule_")] = fields
    return jobs


def _report(proc: subprocess.CompletedProcess, project: Path) -> str:
    logs = "\n".join(f"--- {p.relative_to(project)}\n{p.read_text(errors='replace')[-2000:]}"
                     for p in sorted((project / "results" / "logs").rglob("*.log")))
    return f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}\n{logs}"


def test_pipeline_runs_on_slurm_with_the_slurm_profile(cluster, tmp_path, record_property):
    project = copy_project(tmp_path / "project")
    write_photos(project / "photos")
    write_fast_params(project)

    start = time.monotonic()
    # The quick form: every stage up to training (curate, invert, precompute, train) as SLURM jobs. The
    # bench's two jobs add ~2 minutes here and are run for real by tests/test_pipeline_e2e.py.
    proc = run_snakemake(cluster, project, "results/train/metrics.json")
    wall = time.monotonic() - start
    record_property("slurm_pipeline_wall_s", round(wall, 1))
    print(f"\nthe pipeline on SLURM: {wall:.1f} s wall")
    assert proc.returncode == 0, _report(proc, project)

    results = project / "results"
    for path in ("curate/manifest.parquet", "invert/index.parquet", "invert/report.html",
                 "precompute/prompt_embeddings.safetensors", "precompute/exemplar_rewards.parquet",
                 "train/metrics.json", "train/final"):
        assert (results / path).exists(), path
    summary = json.loads((results / "train" / "metrics.json").read_text())
    assert summary["iterations"] == 1 and summary["processes"] == 1

    # Every stage ran as its own SLURM job, on the partition and with the GPUs the profile asks for.
    out = proc.stdout + proc.stderr
    jobs = slurm_jobs(cluster, out)
    profile = yaml.safe_load((REPO / PROFILE / "config.yaml").read_text())
    ran = set(re.findall(r"^rule (\w+):$", out, re.MULTILINE))  # `localrule all:` stays local
    assert ran == set(jobs) and {"curate", "invert", "precompute", "train"} <= ran, (sorted(ran), sorted(jobs))
    for rule, job in jobs.items():
        print(f"  {rule:12s} SLURM job {job['JobId']:>3s} on {job['Partition']:4s} "
              f"{job.get('TresPerJob', 'no GPU'):12s} ran {job['RunTime']}")
        wanted = (profile.get("set-resources") or {}).get(rule, {})
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (rule, job)
        assert job["Partition"] == wanted.get("slurm_partition", profile["default-resources"]["slurm_partition"])
        # TresPerJob is "gres:gpu:1" (SLURM 22.05) or "gres/gpu:1" (later); absent without GPUs.
        gpus = re.search(r"gpu:(\d+)$", job.get("TresPerJob", ""))
        assert (int(gpus.group(1)) if gpus else 0) == wanted.get("gpu", 0), (rule, job.get("TresPerJob"))
    assert jobs["train"]["TresPerJob"].endswith("gpu:1")
    # The job's SLURM log is kept (--slurm-keep-successful-logs) under the profile's slurm-logdir.
    assert list((results / "logs" / "slurm" / "rule_train").rglob("*.log"))


def test_a_failing_rule_is_reported_and_snakemake_exits_non_zero(cluster, tmp_path):
    project = copy_project(tmp_path / "project")
    write_photos(project / "photos")
    # A captions sidecar without the columns curate needs: params and inputs pass every check before
    # the jobs, and the curate job itself exits with status 2.
    (project / "photos" / "bad.csv").write_text("foo,bar\n1,2\n")
    write_fast_params(project, **{"curate.captions": "photos/bad.csv", "tracking.enabled": False})

    proc = run_snakemake(cluster, project, "results/curate/manifest.parquet")
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124, 137), _report(proc, project)  # failed, not hung
    assert "Error in rule curate" in out, _report(proc, project)
    assert "needs a path column" in (project / "results" / "logs" / "curate.log").read_text()
    assert not (project / "results" / "curate" / "manifest.parquet").exists()
    job = slurm_jobs(cluster, out)["curate"]
    assert job["JobState"] == "FAILED" and job["ExitCode"].startswith("1:"), job


def test_the_multinode_recipe_on_one_node_starts_one_process_per_gpu(cluster, tmp_path):
    """profiles/slurm/train-multinode.sbatch with one node and its 2 (fake) GPUs: srun starts one
    `portraitgen launch-train`, which reads the GPUs from the allocation and trains on 2 processes (CPU
    processes here: torch sees no CUDA device)."""
    from portraitgen.policies import tiny_model_path

    tiny_model_path("sd3")  # build it once here, before two processes race for it
    project = tmp_path / "project"
    (project / "results" / "logs" / "slurm").mkdir(parents=True)
    write_params(project / "params.yaml", **{"train.iterations": 1})
    profile = yaml.safe_load((REPO / PROFILE / "config.yaml").read_text())
    env = cluster.env(dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")])))
    proc = subprocess.run(
        ["timeout", "-k", "10", "400", "sbatch", "--wait", "--nodes=1", "--gpus-per-node=2", "--cpus-per-task=2",
         f"--partition={profile['set-resources']['train']['slurm_partition']}",
         str(REPO / PROFILE / "train-multinode.sbatch")],
        cwd=project, env=env, capture_output=True, text=True, timeout=460)
    logs = list((project / "results" / "logs" / "slurm").glob("train-multinode-*.log"))
    log = logs[0].read_text() if logs else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log[-4000:]}"
    assert "2 processes per node x 1 node; 2 GPUs per node (SLURM_GPUS_ON_NODE=2)" in log
    assert " -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 " in log
    summary = json.loads((project / "results" / "train" / "metrics.json").read_text())
    assert summary["processes"] == 2 and summary["iterations"] == 1

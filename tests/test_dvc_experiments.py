"""DVC the way its users use it, with real `dvc` and git in a temporary copy of the project.

- each stage's headline numbers (summary.json, portraitgen/summary.py) are the DVC metrics, tracked by
  git: after `dvc repro` + a commit, `dvc exp run -S ...` twice, `dvc exp show --only-changed` names both
  experiments with their numbers in 80 columns, and `dvc metrics diff` compares with HEAD;
- a fresh clone reads the committed numbers (`dvc metrics show`) and, from a folder remote
  (`dvc remote add -d local DIR`, `dvc push`), gets the artifacts with `dvc pull` and has nothing to rerun.

The `portraitgen` on PATH is a stub that writes every output the stage table declares, a metrics.json whose
training and bench figures follow train.lr, and the stage's summary through the real summary writer: the
test checks the DVC wiring, not the stages (tests/test_pipeline_e2e.py runs them).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from portraitgen.summary import headline, write_summary

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc") if (BIN / "dvc").exists() else shutil.which("dvc")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]

STUB = """#!{python}
import json, sys
from pathlib import Path
import yaml
from portraitgen.stages import STAGES
from portraitgen.summary import write_summary
args = sys.argv[1:]
if args[0] in ("mlflow-parent", "progress"):
    sys.exit(0)
out = Path(args[args.index("--out") + 1])
verb = "train" if args[0] == "launch-train" else args[0]
name = "bench_embeddings" if "--bench-only" in args else verb
stage = next(s for s in STAGES if s.name == name)
lr = yaml.safe_load(open(args[args.index("--params") + 1]))["train"]["lr"]
with open({calls!r}, "a") as f:
    f.write(name + "\\n")
for o in stage.outputs:
    path = out / o.path
    if o.directory or "." not in o.path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "part-0").write_text(name + " " + str(lr))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
metrics = {{"curate": {{"kept": 9, "rejected": 2, "seconds": 1.5}},
           "invert": {{"exemplars": 8, "psnr_mean": 21.37, "traj_logprob_z_mean": 0.4}},
           "precompute": {{"prompts": 8, "exemplars": 8}},
           "train": {{"reward_first": 0.5, "reward_last": 0.5 + lr, "reward_gain": lr, "iterations": 2}},
           "pretrain": {{"face_rate_samples": 0.75, "artifact_rate_samples": 0.5, "losses": [1.0]}},
           "bench": {{"suite": "v1", "comparisons": {{"trained_vs_base": {{"ai_portrait_classic": 2 * lr,
                                                                     "omni_classic": -lr, "raw_luma": 0.1}}}}}},
           }}.get(name)
if metrics is not None:
    (out / "metrics.json").write_text(json.dumps(metrics))
    write_summary(name, out, ("ai_portrait_classic", "omni_classic"))
"""

pytestmark = pytest.mark.skipif(DVC is None, reason="needs dvc (extra 'workflow')")


def run(cmd, cwd, env, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_summary_keeps_a_handful_of_rounded_headline_numbers(tmp_path):
    assert headline("train", {"reward_gain": 0.123456789, "reward_last": float("nan"), "iterations": 3,
                              "seconds_per_iteration": 2.0}) == {"gain": 0.1235}
    bench = {"comparisons": {"trained_vs_base": {"ai_portrait_classic": 0.0412345, "raw_luma": 1.0},
                             "sft_vs_base": {"raw_luma": 1.0}}}
    assert headline("bench", bench, ("ai_portrait_classic", "omni_classic")) == {"trained": 0.04123}
    (tmp_path / "metrics.json").write_text(json.dumps({"kept": 4, "rejected": 1, "total": 5}))
    assert json.loads(write_summary("curate", tmp_path).read_text()) == {"kept": 4, "rejected": 1}
    assert write_summary("bench_embeddings", tmp_path) is None


def test_curate_command_writes_its_summary(tmp_path):
    import yaml

    import skimage.data
    from portraitgen.cli import main
    from tests.helpers import fast_params

    (tmp_path / "photos").mkdir()
    shutil.copy(Path(skimage.data.__file__).parent / "astronaut.png", tmp_path / "photos" / "a.png")
    data = fast_params()
    data["curate"] = {"source": str(tmp_path / "photos")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    assert main(["curate", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out"),
                 "--workers", "1"]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"kept": 1, "rejected": 0}


@pytest.fixture()
def project(tmp_path):
    dest = tmp_path / "project"
    dest.mkdir()
    for name in ("portraitgen", "workflow"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "Snakefile"):
        shutil.copy2(REPO / name, dest / name)
    # The baseline's lr must differ from both experiments' (0.01, 0.002), whatever params.yaml's default
    # is: an experiment equal to the baseline would be restored from DVC's run cache, not rerun.
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"]["lr"] = 0.03
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(REPO / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    (dest / "results").mkdir()
    shutil.copy2(REPO / "results" / "README.md", dest / "results" / "README.md")
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    exe = stub_bin / "portraitgen"
    exe.write_text(STUB.format(python=sys.executable, calls=str(tmp_path / "calls.txt")))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=os.pathsep.join([str(stub_bin), str(BIN), os.environ.get("PATH", "")]),
               PYTHONPATH=str(dest), COLUMNS="80", DVC_NO_ANALYTICS="1")
    run(["git", "init", "-q", "-b", "main"], dest, env)
    run([*GIT, "add", "-A"], dest, env)
    run([*GIT, "commit", "-qm", "project"], dest, env)
    return dest, env, tmp_path / "calls.txt"


def test_experiments_compare_in_80_columns_and_a_clone_pulls_from_a_folder_remote(project, tmp_path):
    dest, env, calls = project
    run([DVC, "repro"], dest, env)
    # What the lead commits after the demo run: the lock file and the stages' summaries (docs/workflow.md).
    run([*GIT, "add", "dvc.lock", "results"], dest, env)
    staged = set(run(["git", "diff", "--cached", "--name-only"], dest, env).stdout.split())
    assert {"dvc.lock", "results/train/summary.json", "results/bench/summary.json"} <= staged
    assert not any(p.endswith((".parquet", "metrics.json")) for p in staged)  # the rest stays with DVC
    run([*GIT, "commit", "-qm", "baseline run"], dest, env)

    for lr, name in (("0.01", "lr-high"), ("0.002", "lr-low")):
        run([DVC, "exp", "run", "-S", f"train.lr={lr}", "--name", name], dest, env)
    shown = run([DVC, "exp", "show", "--only-changed", "--no-pager"], dest, env).stdout
    print(shown)
    lines = [ln for ln in shown.splitlines() if ln.strip()]
    assert max(len(ln) for ln in lines) <= 80, shown
    assert "!" not in shown and "lr-high" in shown and "lr-low" in shown
    table = run([DVC, "exp", "show", "--only-changed", "--json"], dest, env).stdout
    assert "0.51" in table and "0.502" in table  # train's reward of each experiment
    # Both experiments reran train and bench, never curate.
    assert calls.read_text().split().count("curate") == 1 and calls.read_text().split().count("train") == 3

    # The workspace holds the last experiment: its metrics differ from HEAD's, and HEAD's load.
    diff = run([DVC, "metrics", "diff", "--json"], dest, env)
    assert "failed" not in diff.stderr
    changes = json.loads(diff.stdout)
    assert changes["results/train/summary.json"]["reward"]["new"] == 0.502
    assert changes["results/bench/summary.json"]["trained"]["new"] == 0.004

    # A folder remote: push, then a fresh clone pulls the artifacts and has nothing to recompute.
    store = tmp_path / "dvc-store"
    run([DVC, "exp", "apply", "lr-high"], dest, env)
    run([DVC, "remote", "add", "-d", "local", str(store)], dest, env)
    run([*GIT, "add", "-A"], dest, env)
    run([*GIT, "commit", "-qm", "lr-high"], dest, env)
    run([DVC, "push"], dest, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(dest), str(clone)], tmp_path, env)
    metrics = run([DVC, "metrics", "show", "--json"], clone, env).stdout
    assert json.loads(metrics)[""]["data"]["results/train/summary.json"]["data"] == {"reward": 0.51, "gain": 0.01}
    n_calls = len(calls.read_text().split())
    run([DVC, "pull"], clone, env)
    assert (clone / "results" / "train" / "final" / "part-0").read_text() == "train 0.01"
    status = run([DVC, "status"], clone, env).stdout
    assert "up to date" in status, status
    run([DVC, "repro"], clone, env)
    assert len(calls.read_text().split()) == n_calls  # nothing recomputed

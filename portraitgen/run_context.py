"""Where a stage run comes from, for its MLflow tags: the git commit, and the DVC experiment it belongs to.

``dvc exp run`` gives every stage command ``DVC_EXP_NAME`` (the experiment's name, e.g. ``exp-3f2a1``) and
``DVC_EXP_BASELINE_REV`` (the commit it started from). A stage run of an experiment is tagged with both
and filed under one MLflow parent run per experiment: the parent that ``portraitgen tracked -- dvc exp
run`` opened (which then takes the experiment's name), or, under a plain ``dvc exp run``, a parent found
or created by that name. So ``dvc exp show`` and the MLflow UI name the same experiments.
"""
from __future__ import annotations

import functools
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)
GIT_COMMIT_TAG = "mlflow.source.git.commit"
DVC_EXP_TAG = "portraitgen.dvc_exp"
DVC_BASELINE_TAG = "portraitgen.dvc_baseline"
STAGE_TAG = "portraitgen.stage"
# A named run (`snakemake --config run=NAME`, results/runs/NAME): the workflow sets PORTRAITGEN_RUN for its jobs.
NAMED_RUN_TAG = "portraitgen.run"
NAMED_RUN_ENV = "PORTRAITGEN_RUN"


def git_commit(cwd: str | None = None) -> str:
    """HEAD's commit of the repository around ``cwd`` (default: the working directory), or "" outside git."""
    return _git_commit(str(Path(cwd or os.getcwd()).resolve()))


@functools.lru_cache(maxsize=8)
def _git_commit(cwd: str) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_dirty(cwd: str | None = None) -> bool:
    """Uncommitted changes to tracked files (the commit alone does not say what ran)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd or os.getcwd(),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def dvc_experiment() -> tuple[str, str]:
    """(name, baseline commit) of the DVC experiment this process runs in; ("", "") outside one."""
    return os.environ.get("DVC_EXP_NAME", ""), os.environ.get("DVC_EXP_BASELINE_REV", "")


def run_tags(cwd: str | Path | None = None) -> dict[str, str]:
    """The tags every stage run and parent run carries."""
    tags: dict[str, str] = {}
    commit = git_commit(str(cwd) if cwd else None)
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        tags["portraitgen.git_dirty"] = str(git_dirty(str(cwd) if cwd else None)).lower()
    name, baseline = dvc_experiment()
    if name:
        tags[DVC_EXP_TAG] = name
    if baseline:
        tags[DVC_BASELINE_TAG] = baseline
    if os.environ.get(NAMED_RUN_ENV):
        tags[NAMED_RUN_TAG] = os.environ[NAMED_RUN_ENV]
    return tags


def experiment_parent(client, experiment_id: str, parent_id: str | None) -> str | None:
    """The parent run of a stage run inside a DVC experiment (None outside one: ``parent_id`` stands).

    With ``parent_id`` (a ``tracked`` wrapper's parent) that parent is named after the experiment. Without,
    the experiment's parent is looked up by its tag and created (already FINISHED: no process owns it)
    when this is the experiment's first stage.
    """
    name, baseline = dvc_experiment()
    if not name:
        return parent_id
    tags = {DVC_EXP_TAG: name, **({DVC_BASELINE_TAG: baseline} if baseline else {})}
    if parent_id:
        for key, value in {**tags, "mlflow.runName": f"{name} (dvc exp run)"}.items():
            client.set_tag(parent_id, key, value)
        return parent_id
    found = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.`{DVC_EXP_TAG}` = '{name}' and tags.`{STAGE_TAG}` = 'pipeline'")
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{name} (dvc exp run)",
                            tags={**tags, **run_tags(), STAGE_TAG: "pipeline", "portraitgen.launcher": "dvc exp run"})
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("MLflow parent run %s for DVC experiment %s", run.info.run_id, name)
    return run.info.run_id

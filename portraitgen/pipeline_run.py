"""One MLflow *parent* run per pipeline invocation; every stage's run becomes its child (docs/design.md §1).

    portraitgen mlflow-parent start --params params.yaml --launcher snakemake   # prints the run id
    portraitgen mlflow-parent end --params params.yaml --run-id ID --status FINISHED
    portraitgen tracked -- dvc repro                                            # wraps any command

The stages find the parent through ``PORTRAITGEN_PARENT_RUN_ID`` (see :mod:`portraitgen.tracking`),
never ``MLFLOW_RUN_ID``, which would make each stage *resume* that run. Snakemake starts and ends the
parent from its ``onstart``/``onsuccess``/``onerror`` hooks (workflow/Snakefile), which run only when
there is work to do, so dry runs and no-op reruns leave no empty runs behind. DVC has no hooks:
``portraitgen tracked -- dvc repro`` (or ``dvc exp run``) does the same around the command; plain
``dvc repro`` gives each stage a top-level run.

On end, the parent collects the children's final metrics as ``<stage>/<metric>``, so pipeline runs
compare side by side in the MLflow UI without opening each child.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .config import Params, flatten, load_params, params_to_dict
from .run_context import NAMED_RUN_TAG, run_tags
from .tracking import PARENT_ENV, bounded_http_retries, resolve_uri, set_mlflow_uri

log = logging.getLogger(__name__)
STAGE_TAG = "portraitgen.stage"


def _client(params: Params):
    from mlflow.tracking import MlflowClient

    bounded_http_retries()
    uri = resolve_uri(params.tracking)  # MLFLOW_TRACKING_URI wins; one short probe (portraitgen/tracking.py)
    set_mlflow_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def start_parent_run(params_path: str | Path, *, launcher: str, command: str = "", run_name: str = "") -> str | None:
    """Create the parent run; return its id (None when tracking is disabled in the params). ``run_name``: a
    named run (``snakemake --config run=NAME``), which names and tags the parent."""
    params = load_params(params_path)
    if not params.tracking.enabled:
        return None
    client = _client(params)
    tags = {STAGE_TAG: "pipeline", "portraitgen.launcher": launcher, "mlflow.source.name": launcher}
    if command:
        tags["portraitgen.command"] = command[:5000]
    tags.update(run_tags(Path(params_path).resolve().parent))  # git commit; the DVC experiment, when inside one
    if run_name:
        tags[NAMED_RUN_TAG] = run_name
    title = f"{run_name} ({launcher})" if run_name else f"pipeline ({launcher})"
    run = client.create_run(_experiment_id(client, params.tracking.experiment), run_name=title, tags=tags)
    run_id = run.info.run_id
    # The experiment's full params on the parent: runs are compared in the UI by these.
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in flatten(params_to_dict(params)).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    client.log_artifact(run_id, str(params_path))
    log.info("MLflow parent run %s (%s) at %s", run_id, launcher, client.tracking_uri)
    return run_id


def child_runs(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=1000)


def end_parent_run(params_path: str | Path, run_id: str, status: str = "FINISHED") -> int:
    """Copy the children's final metrics onto the parent and close it; returns the number of children."""
    from mlflow.entities import Metric

    params = load_params(params_path)
    client = _client(params)
    parent = client.get_run(run_id)
    children = child_runs(client, parent.info.experiment_id, run_id)
    metrics = []
    timestamp = parent.info.start_time or 0
    for child in children:
        stage = child.data.tags.get(STAGE_TAG, child.info.run_name or "stage")
        for key, value in child.data.metrics.items():
            # A stage that already prefixes its keys (bench/<pair>/...) is not prefixed twice.
            name = key if key.startswith(f"{stage}/") else f"{stage}/{key}"
            metrics.append(Metric(name, value, timestamp, 0))
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.set_tag(run_id, "portraitgen.stages", ",".join(sorted(
        c.data.tags.get(STAGE_TAG, "?") for c in children)))
    client.set_terminated(run_id, status=status)
    log.info("MLflow parent run %s: %s, %d child runs", run_id, status, len(children))
    return len(children)


def run_tracked(params_path: str | Path, command: Sequence[str], *, launcher: str | None = None) -> int:
    """Run ``command`` (e.g. ``dvc repro``) under a fresh parent run; returns its exit status."""
    if not command:
        raise SystemExit("portraitgen tracked: give the command to run after --, e.g. `portraitgen tracked -- dvc repro`")
    env = dict(os.environ)
    owned = None
    if not env.get(PARENT_ENV):  # an outer invocation already owns a parent: nest under it instead
        owned = start_parent_run(params_path, launcher=launcher or Path(command[0]).name,
                                 command=shlex.join(command))
        if owned:
            env[PARENT_ENV] = owned
    proc = subprocess.Popen(list(command), env=env)
    terminated = []

    def forward(signum, frame):  # a cancelled job: stop the command, then mark the parent KILLED
        terminated.append(signum)
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        rc = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if owned:
        killed = rc == 130 or bool(terminated)
        end_parent_run(params_path, owned, "FINISHED" if rc == 0 else ("KILLED" if killed else "FAILED"))
    return rc


def main_start(params_path: str, launcher: str, command: str, run_name: str = "") -> int:
    run_id = start_parent_run(params_path, launcher=launcher, command=command, run_name=run_name)
    print(run_id or "")  # read by the Snakefile's onstart hook
    sys.stdout.flush()
    return 0

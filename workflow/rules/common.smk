# Helpers shared by the rules. No pipeline logic lives here: every rule calls the `portraitgen` CLI, and
# what a rule reads and writes comes from the package (portraitgen/stages.py).

import os
import shlex
import subprocess
import sys

from snakemake.exceptions import WorkflowError
from portraitgen.params_check import check_params
from portraitgen.run_context import NAMED_RUN_ENV
from portraitgen.stages import Workflow

# Keys of the Snakemake config that are workflow options (`--config invert_parts=4`), not params.
WORKFLOW_OPTIONS = ("curate_parts", "invert_parts", "precompute_parts", "bench_parts", "ablation", "run")

# params.yaml is the Snakemake config (configfile: in workflow/Snakefile) and the file every stage
# reads. Check it before the DAG is built, so a bad value stops the run before any job starts and before
# any output is touched (portraitgen/params_check.py, also `portraitgen check`): the JSON schema
# generated from portraitgen/config.py (unknown keys, types, enums: every error at once), the package's
# ranges and rules across keys, then what the params point at (model folder, curate source, files named
# in params, reward components and their options). One line per problem: key, expected, got.
def _check_params_with_the_package():
    problems = check_params({k: v for k, v in config.items() if k not in WORKFLOW_OPTIONS})
    if problems:
        raise WorkflowError(f"params.yaml has {len(problems)} problem(s):\n  " + "\n  ".join(problems))


_check_params_with_the_package()


# --- MLflow: one parent run per invocation (portraitgen/pipeline_run.py) ------------------------------
# Started by `onstart` (workflow/Snakefile), which Snakemake calls only when jobs will run; each
# stage's run is tagged as its child through PORTRAITGEN_PARENT_RUN_ID, inherited by local and
# cluster jobs alike. A parent id already in the environment (an outer `portraitgen tracked`, or set
# by hand) is kept, and then left for its owner to close.
PARENT_ENV = "PORTRAITGEN_PARENT_RUN_ID"
_OWNED_PARENT = []


def start_pipeline_run():
    if os.environ.get(PARENT_ENV):
        return
    # A named run's parent is named and tagged after it (portraitgen.run), with the run's own params.
    named = ["--run-name", WF.run] if WF.run else []
    try:
        proc = subprocess.run(
            ["portraitgen", "mlflow-parent", "start", "--params", WF.params_file(WF.main_root),
             "--launcher", "snakemake", *named, "--command-line", shlex.join(["snakemake", *sys.argv[1:]])],
            capture_output=True,
            text=True,
        )
    except OSError as exc:  # e.g. `portraitgen` only inside the rules' conda env
        proc = subprocess.CompletedProcess([], 1, "", str(exc))
    run_id = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""
    if proc.returncode != 0:
        # Tracking must never stop the pipeline: the stages still log their own runs.
        print(f"MLflow parent run not started (stages log top-level runs):\n{proc.stderr}")
    if run_id:
        os.environ[PARENT_ENV] = run_id
        _OWNED_PARENT.append(run_id)


def end_pipeline_run(status):
    for run_id in _OWNED_PARENT:
        try:
            subprocess.run(
                ["portraitgen", "mlflow-parent", "end", "--params", "params.yaml", "--run-id", run_id,
                 "--status", status],
                check=False,
            )
        except OSError as exc:
            print(f"MLflow parent run {run_id} not closed: {exc}")


# --- The last good outputs (portraitgen/kept_outputs.py) -------------------------------------------
# Snakemake deletes a job's outputs before it runs and when it fails. `onstart` links every declared
# output that exists (with its provenance record) into .snakemake/kept-outputs; `onerror` puts back those
# that are missing then, so a failed train job leaves the last good model, and the next run still redoes
# the failed job; `onsuccess` drops the copies.
def _file_persistence():
    # The records to restore are files under .snakemake/metadata only with Snakemake's default backend.
    backend = str(getattr(workflow.workflow_settings, "persistence_backend", "file")).lower()
    return backend.endswith("file")


def keep_outputs():
    from portraitgen import kept_outputs

    if not _file_persistence():
        print("kept-outputs: off under --persistence-backend db (its provenance records are not files): a "
              "failed job's previous outputs are not restored")
        return
    kept = kept_outputs.save(WF.declared_outputs())
    if kept.copied:
        print(f"kept-outputs: {len(kept.copied)} output(s) copied, not linked (another file system?): "
              + ", ".join(kept.copied[:5]))


def restore_outputs():
    from portraitgen import kept_outputs

    if not _file_persistence():
        return
    for out in kept_outputs.restore(WF.declared_outputs()):
        print(f"kept-outputs: restored {out}: the last good output, until a run replaces it")


def drop_kept_outputs():
    from portraitgen import kept_outputs

    if _file_persistence():
        kept_outputs.drop(WF.declared_outputs())


# --- The stage table (portraitgen/stages.py) ------------------------------------------------------
# Every rule takes its inputs, outputs, params, resources and command from the package's stage table,
# the one dvc.yaml is generated from (`portraitgen dvc-yaml`): nothing about a stage is written twice.
# The functions below only turn the table's plain values into Snakemake objects.
# `snakemake --config curate_parts=N` (invert_parts, precompute_parts, bench_parts) scatters a stage over
# N part jobs, then gathers them; `--config ablation=FILE` names the ablation file (rules/ablation.smk).
# `--config run=NAME` is a named run: the main rules write under results/runs/NAME instead of results/,
# with params.yaml's paths into stage folders moved there (results/runs/NAME/params.yaml, written here,
# only when it changes); two runs' outputs then live side by side (docs/workflow.md "Named runs").
try:
    WF = Workflow(
        {k: v for k, v in config.items() if k not in WORKFLOW_OPTIONS},
        ablation_file=str(config.get("ablation", "ablation.yaml")),
        parts={name: int(config.get(f"{name}_parts", 1)) for name in ("curate", "invert", "precompute", "bench")},
        run=config.get("run"),
    )
except ValueError as exc:
    raise WorkflowError(f"--config run: {exc}")
WF.write_run_params()
if WF.run:  # every stage's MLflow run is tagged with it (portraitgen/run_context.py), local and cluster jobs
    os.environ[NAMED_RUN_ENV] = WF.run


# `root`: the results root of a rule, `results` for the main pipeline's; None for an ablation rule, whose
# jobs take it from their `{root}` wildcard (WF.rule_variants).
def stage_inputs(name, root=None, merge=True):
    """The rule's inputs: the package's files (`src`), the files the stage reads from params (`deps`:
    other stages' outputs and user files), a run's params file, and for a merge job its part files."""

    def inputs(wildcards):
        found = WF.inputs(name, wildcards, root=root, merge=merge)
        if "run_params" in found:  # a named run's params file: its values are the triggers, not its mtime
            found["run_params"] = [ancient(f) for f in found["run_params"]]
        return found

    return inputs


def stage_outputs(name, root=None):
    """The declared outputs; those the stage table marks for `snakemake --report` are flagged report()."""

    def declared(key, path, is_dir):
        f = directory(path) if is_dir else path
        category, patterns = WF.report_of(name, key)
        if not category:
            return f
        return report(f, category=category, patterns=patterns) if patterns else report(f, category=category)

    return {key: declared(key, path, is_dir) for key, (path, is_dir) in WF.outputs(name, root).items()}


def stage_params(name, root=None):
    """The params keys the stage reads (its rerun triggers), the params file of the job's root and the
    flags the root adds (the ablation bench's models)."""

    def value(key):
        return lambda wildcards: WF.param_values(name, wildcards, root)[key]

    return {
        "params_file": lambda wildcards: WF.params_file(root or wildcards.root),
        "extra_args": lambda wildcards: WF.extra_args(name, wildcards, root),
        **{key: value(key) for key in WF.param_names(name)},
    }


def part_output(name, root=None):
    """A part job's output: its part file (invert's part jobs write shards, and only a marker file)."""
    path = WF.part_pattern(name, root)
    return touch(path) if WF.part_is_marker(name) else path


# The ablation's target (rules/ablation.smk). Its runs share the main pipeline's curation under results/,
# which a named run (`--config run=NAME`) moves to results/runs/NAME: the two do not combine.
def ablation_targets(wildcards):
    if WF.run:
        raise WorkflowError(
            f"the ablation runs without `--config run={WF.run}`: its runs have their own roots "
            "(results/ablation/<run>) and share the curation of results/curate"
        )
    return ["results/ablation/bench/report.html", "results/ablation/report/report.md"]

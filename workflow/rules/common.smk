# Helpers shared by the rules. No pipeline logic lives here: every rule calls the `portraitgen` CLI.

import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# Keys of the Snakemake config that are workflow options (`--config invert_parts=4`), not params.
WORKFLOW_OPTIONS = ("curate_parts", "invert_parts", "precompute_parts", "bench_parts", "ablation")

# params.yaml is the Snakemake config (configfile: in workflow/Snakefile) and the file every stage
# reads. Check it before the DAG is built, so a bad value stops the run before any job starts:
# 1. the JSON schema, generated from portraitgen/config.py (`portraitgen schema`): unknown keys,
#    types, enums -- each error names the key;
validate(
    {k: v for k, v in config.items() if k not in WORKFLOW_OPTIONS},
    schema="../schemas/params.schema.yaml",
    set_default=False,
)


# 2. the package's own validation (ranges and rules across keys, e.g. the group size dividing the
#    batch), when snakemake runs beside the package; otherwise each stage repeats it when it starts.
def _check_params_with_the_package():
    try:
        from portraitgen.config import ConfigError, params_from_dict
    except ImportError:
        return
    try:
        params_from_dict({k: v for k, v in config.items() if k not in WORKFLOW_OPTIONS})
    except ConfigError as exc:
        raise WorkflowError(f"params.yaml: {exc}") from None


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
    try:
        proc = subprocess.run(
            ["portraitgen", "mlflow-parent", "start", "--params", "params.yaml", "--launcher", "snakemake",
             "--command-line", shlex.join(["snakemake", *sys.argv[1:]])],
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


def params_section(name):
    """The params.yaml section `name`, passed to a rule's `params:` so that changing it reruns the job.

    Keys are sorted: Snakemake compares params by their repr, which follows key order, so without
    this, reordering params.yaml (or a tool rewriting it) would rerun every stage. DVC compares values.
    """
    return _sorted_keys(config[name])


def _sorted_keys(value):
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def package_sources():
    """Every file of the portraitgen package (code and shipped data), the Snakemake twin of DVC's
    `deps: [portraitgen]`: editing the package reruns the stages that run it."""
    return sorted(
        str(p)
        for p in Path("portraitgen").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


# --- curate (rules/curate.smk) ---------------------------------------------------------------------
# `snakemake --config curate_parts=N` scatters curate over N part jobs (default: one job).
CURATE_PARTS = int(config.get("curate_parts", 1))
# Mirrors portraitgen.curate.IMAGE_EXTENSIONS (the Snakefile does not import the package).
CURATE_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def curate_sources():
    """The files `portraitgen curate` reads besides the package (rerun triggers: rules/curate.smk)."""
    cur = config["curate"]
    files = []
    source = str(cur.get("source", "builtin:demo"))
    if not source.startswith("builtin:"):
        path = Path(source)
        if path.is_dir():
            for root, dirs, names in os.walk(path, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                files += [
                    os.path.join(root, n)
                    for n in names
                    if not n.startswith(".") and n.lower().endswith(CURATE_IMAGE_EXTENSIONS)
                ]
        else:
            files.append(source)
    files += [cur[key] for key in ("captions", "include", "exclude") if cur.get(key)]
    return sorted(files)


def curate_part_files():
    if CURATE_PARTS <= 1:
        return []
    return [
        f"results/curate/parts/part-{i:04d}-of-{CURATE_PARTS:04d}.jsonl"
        for i in range(CURATE_PARTS)
    ]


CURATE_MERGE_FLAGS = (
    f" --merge-only --num-parts {CURATE_PARTS}" if CURATE_PARTS > 1 else ""
)


def train_input(kind):
    """A file of another stage that the params make training read ([] when they do not): the exemplar
    index (prompts.source: exemplars), the prompt-embedding cache, the precomputed exemplar rewards."""
    t = config["train"]
    ex = t.get("exemplars", {})
    path = {
        "exemplar_index": ex.get("index", "results/invert/index.parquet")
        if config["prompts"]["source"] == "exemplars"
        else "",
        "prompt_embeddings": t.get("prompt_embeddings", ""),
        "exemplar_rewards": ex.get("rewards", ""),
        "detector": "results/precompute/metrics.json" if uses_precomputed_detector(config["reward"]) else "",
    }[kind]
    return [path] if path else []


def uses_precomputed_detector(reward_section):
    """Whether a reward section scores with the AI-Portrait detector that the precompute stage trains
    (its `path` inside results/precompute): then the stage reading it must wait for precompute."""
    if "ai_portrait_detector" not in (reward_section.get("components") or {}):
        return False
    options = (reward_section.get("options") or {}).get("ai_portrait_detector") or {}
    return str(options.get("path", "")).startswith("results/precompute")


# --- bench (rules/bench.smk) ------------------------------------------------------------------------
# `snakemake --config bench_parts=N` scatters the bench over N part jobs (default: one job).
BENCH_PARTS = int(config.get("bench_parts", 1))


def bench_inputs():
    """Files the bench reads besides the package: trained models of this pipeline, the reference, the
    suite file (unless built in) and, when set, the suite's prompt embeddings (`bench.prompt_embeddings`,
    made by the `bench_embeddings` rule in rules/precompute.smk)."""
    files = bench_prompt_embeddings() + bench_suite_file()
    for path in config["bench"].get("models", {}).values():
        path = str(path).rstrip("/")
        if path == "results/train" or path.startswith("results/train/"):
            files.append("results/train/final")
    reference = str(config["bench"].get("reference", ""))
    if reference.startswith("results/"):
        files.append(reference)
    if uses_precomputed_detector(config["bench"].get("reward") or {}):
        files.append("results/precompute/metrics.json")
    return sorted(set(files))


def bench_prompt_embeddings():
    """`bench.prompt_embeddings` ([] when "": the bench runs the text encoders itself)."""
    path = str((config.get("bench") or {}).get("prompt_embeddings") or "")
    return [path] if path else []


def bench_suite_file():
    """The suite file `bench.suite` names ([] for a built-in suite, which is package data)."""
    suite = str((config.get("bench") or {}).get("suite", "builtin:v1"))
    return [] if suite.startswith("builtin:") else [suite]


def bench_part_files():
    if BENCH_PARTS <= 1:
        return []
    return [f"results/bench/parts/part-{i:04d}-of-{BENCH_PARTS:04d}.parquet" for i in range(BENCH_PARTS)]


BENCH_MERGE_FLAGS = f" --merge-only --num-parts {BENCH_PARTS}" if BENCH_PARTS > 1 else ""


# --- ablation (rules/ablation.smk) ------------------------------------------------------------------
ABLATION_FILE = str(config.get("ablation", "ablation.yaml"))


def _ablation():
    """(run names, baseline run) of the ablation file; none when the file does not exist."""
    path = Path(ABLATION_FILE)
    if not path.is_file():
        return [], ""
    data = yaml.safe_load(path.read_text()) or {}
    variants = list(data.get("variants") or {})
    seeds = data.get("seeds") or [42]
    runs = [f"{v}-s{s}" for v in variants for s in seeds]
    baseline = f"{data.get('baseline', variants[0] if variants else '')}-s{seeds[0]}"
    return runs, baseline


ABLATION_RUNS, ABLATION_BASELINE = _ablation()

"""The pipeline's stages, declared once: the table that dvc.yaml is generated from and that the
Snakemake rules read.

Each :class:`Stage` names its ``portraitgen`` command, its output folder and outputs, the params keys
it reads (its rerun triggers in both tools), the files it reads (derived from params: a path into
another stage's folder becomes a dependency on that stage), its resources and hardware flags, and
whether it scatters into part jobs. From it:

- ``portraitgen dvc-yaml --write`` writes dvc.yaml (``--check`` in CI and the tests: it must be current);
- workflow/rules/*.smk take their inputs, outputs, params, resources and commands from the functions
  at the bottom of this module (:class:`Workflow`), so no rule repeats a default, a file extension or
  a run name.

Roots. Every stage writes ``<root>/<folder>``: the root is ``results`` for the main pipeline,
``results/runs/<name>`` for a named run (``snakemake --config run=NAME``: params.yaml with every path
into a stage's folder moved under that root, :func:`named_run_params`) and ``results/ablation/<run>`` for
an ablation run (portraitgen/ablation.py), whose params come from the ablation file; the ablation's bench
has the root ``results/ablation``. The Snakemake rules are the same for every root (a ``root`` wildcard,
or the invocation's root for the main rules).

Dependencies from params. A stage that loads the model depends on the stage whose output
``model.path`` points into (e.g. a pretraining stage's ``results/pretrain/model``); a reward component
that uses a detector trained by precompute (``path: results/precompute/detector``) makes its reader
wait for precompute; the files train and bench read (exemplar index, prompt embeddings, exemplar
rewards, trained models, the real reference) likewise. A path outside every stage's folder is a user
file (a photo folder, a prompt list, a suite file): a plain input.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ablation import RUN_NAME as ABLATION_RUN_NAME
from .config import Params, params_from_dict, params_to_dict, uses_detector
from .fingerprint import training_params_keys
from .integrity import sidecar
from .package_stamp import package_stamp
from .stage import part_file, part_pattern

MAIN_ROOT = "results"
ABLATION_ROOT = "results/ablation"
# An ablation run's name: a variant name (portraitgen.ablation.RUN_NAME) and its seed (ablation.run_name).
_RUN = ABLATION_RUN_NAME.pattern.removeprefix("^").removesuffix("$") + r"-s\d+"
RUN_ROOT = re.compile(rf"^results/ablation/(?P<run>{_RUN})$")
NAMED_RUNS = "results/runs"  # a named run's root: results/runs/<name>
_NAMED = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
NAMED_ROOT = re.compile(rf"^results/runs/(?P<name>{_NAMED})$")
# Snakemake's constraint of the `root` wildcard, per kind of root a stage runs under.
ROOT_PATTERNS = {"main": r"results", "run": rf"results/ablation/{_RUN}", "ablation": r"results/ablation",
                 "named": rf"results/runs/{_NAMED}"}
PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Output:
    """One output of a stage, relative to its folder."""

    path: str
    name: str  # the Snakemake output name
    kind: str = "out"  # out | metric (dvc.yaml `metrics:`)
    cache: bool = True  # DVC caches it
    # Kept across reruns (resume state, content-addressed caches): DVC `persist: true`; Snakemake leaves
    # it undeclared, because it deletes every declared output before running a job.
    persist: bool = False
    # Local state (resume checkpoints, per-image analysis caches) that stays on the machine that made it:
    # left out of dvc.yaml too, so DVC neither deletes it before a run nor needs it after `dvc pull` (a
    # clone that pulled the results has nothing missing, and nothing to rerun).
    local: bool = False
    directory: bool = False
    note: str = ""  # a comment in dvc.yaml
    # `snakemake --report`: the category it is shown under ("" = not in the report); for a directory, the
    # glob_wildcards patterns of the files to show.
    report: str = ""
    report_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # the portraitgen sub-command and its fixed flags, e.g. "precompute --bench-only"
    folder: str  # outputs under <root>/<folder> (the --out folder)
    outputs: tuple[Output, ...]
    params: tuple[str, ...]  # params keys (sections or dotted keys) the stage reads: its rerun triggers
    doc: str  # one line: what the stage makes (dvc.yaml comment)
    # Files the stage reads besides the package, from its params (paths of other stages' outputs or user
    # files; see module doc). The main product output of another stage is what depends on it.
    reads: Callable[[Params], list[str]] = lambda p: []
    loads_model: bool = True  # model.path is read: a model made by another stage is a dependency
    primary: str = "metrics"  # the output that stands for the stage when another reads into its folder
    shares_folder: bool = False  # writes into another stage's folder (never the producer of paths there)
    threads: int = 2
    resources: Mapping[str, Any] = field(default_factory=dict)
    hardware: str = ""  # flags from threads/resources the Snakemake rule adds (hardware, never params)
    parts: str = ""  # scatter/gather: the part file's extension ("" = no part jobs)
    roots: tuple[str, ...] = ("main",)  # main | run | ablation (see module doc)
    dvc_notes: Mapping[str, str] = field(default_factory=dict)  # dvc.yaml comments on params / deps

    @property
    def metrics(self) -> list[Output]:
        return [o for o in self.outputs if o.kind == "metric"]

    def output(self, name: str) -> Output:
        return next(o for o in self.outputs if o.name == name)

    def out_dir(self, root: str = MAIN_ROOT) -> str:
        return f"{root}/{self.folder}"


def _checksummed(o: Output) -> tuple[Output, Output]:
    """A file a later stage verifies, and its ``.sha256`` sidecar (portraitgen/integrity.py): both are
    outputs, so that `dvc checkout` / `dvc exp apply` of another version restores the checksum with the
    file (a newer sidecar left beside an older file would make its readers report it as corrupt), and
    Snakemake removes a stale sidecar with the file before a rerun."""
    return o, Output(sidecar(o.path).as_posix(), f"{o.name}_sha256")


# --------------------------------------------------------------------------------------------------
# What each stage reads, from params
# --------------------------------------------------------------------------------------------------
def _is_builtin(value: str) -> bool:
    return value.startswith("builtin:")


def _curate_reads(p: Params) -> list[str]:
    c = p.curate
    files = [] if _is_builtin(str(c.source)) else [str(c.source)]
    return files + [v for v in (c.captions, c.include, c.exclude) if v]


def _prompt_file(p: Params) -> list[str]:
    source = str(p.prompts.source)
    return [] if source == "exemplars" or _is_builtin(source) else [source]


def _detector_paths(components: Mapping[str, Any], options: Mapping[str, Any]) -> list[str]:
    """The detector folders that reward components score with (their `path` option)."""
    out = []
    for name in components or {}:
        opts = dict((options or {}).get(name) or {})
        if uses_detector(name, opts) and opts.get("path"):
            out.append(str(opts["path"]))
    return out


def _train_reads(p: Params) -> list[str]:
    ex = p.train.exemplars
    files = _prompt_file(p)
    if p.prompts.source == "exemplars" or ex.per_group > 0 or p.train.sft.share > 0:
        files.append(ex.index)
    if ex.per_group > 0 and ex.rewards:
        files.append(ex.rewards)
    if p.train.prompt_embeddings:
        files.append(p.train.prompt_embeddings)
    return files + _detector_paths(p.reward.components, p.reward.options)


def _bench_reads(p: Params) -> list[str]:
    b = p.bench
    files = [] if _is_builtin(b.suite) else [b.suite]
    if b.prompt_embeddings:
        files.append(b.prompt_embeddings)
    files += [str(path) for path in b.models.values() if str(path) != "base"]
    if not _is_builtin(b.reference):
        files.append(b.reference)
    return files + _detector_paths(b.reward.components, b.reward.options)


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
_GPU = {"mem_mb": 8000, "gpu": 0}  # gpu: GPUs per job; set <stage>:gpu=1 on a GPU machine or cluster

STAGES: tuple[Stage, ...] = (
    # The toy base model (the default model.path, results/pretrain/model) and the planted-artifact
    # detector. Its data ship in the package's dependencies (scikit-image, matplotlib): no file deps.
    Stage(
        name="pretrain", command="pretrain", folder="pretrain",
        doc="the toy base model on real faces with a planted artifact, and the artifact detector "
            "(portraitgen/pretrain)",
        outputs=(
            Output("model", "model", persist=True, directory=True,
                   note="the diffusers folder (model.path); reused by the stage while its content key is "
                        "unchanged, so it is kept across reruns"),
            Output("artifact_detector", "detector", persist=True, directory=True,
                   note="the planted-artifact CNN (evaluation only); reused like the model"),
            Output("samples.png", "samples", report="Pretraining"),
            Output("metrics.json", "metrics", note="everything the stage measured"),
            Output("summary.json", "summary", kind="metric", cache=False,
                   note="its headline numbers, tracked by git: the DVC metrics (portraitgen/summary.py)"),
        ),
        params=("pretrain", "model.family", "model.resolution"), loads_model=False,
        # Two threads: Snakemake then runs it alone on a 2-core machine, where its loop is 1.7x faster
        # than on one (0.14 vs 0.25 s per step of 16 views); beside another job two threads would contend.
        threads=2, resources={"mem_mb": 4000, "runtime": 60, "gpu": 0},
        dvc_notes={"model.resolution": "the image size it is pretrained at"},
    ),
    Stage(
        name="curate", command="curate", folder="curate",
        doc="real portraits -> face-centred crops, manifest, rejections, report (portraitgen/curate.py)",
        outputs=(
            Output("images", "images", directory=True),
            *_checksummed(Output("manifest.parquet", "manifest")),
            Output("rejected.parquet", "rejected"),
            Output("report.html", "report", report="Curation"),
            Output("cache", "cache", persist=True, local=True,
                   note="per-image analyses keyed by content hash: a rerun after adding photos analyses only "
                        "the new ones (local, not in dvc.yaml)"),
            Output("metrics.json", "metrics", note="everything the stage measured"),
            Output("summary.json", "summary", kind="metric", cache=False,
                   note="its headline numbers, tracked by git: the DVC metrics (portraitgen/summary.py)"),
        ),
        params=("curate", "model.resolution"), loads_model=False, reads=_curate_reads, primary="manifest",
        threads=8, resources={"mem_mb": 8000, "runtime": 240}, hardware=" --workers {threads}", parts="jsonl",
        dvc_notes={"model.resolution": "the crop size; nothing else in `model` changes what is curated"},
    ),
    Stage(
        name="invert", command="invert", folder="invert",
        doc="curated portraits -> trajectory shards on the training schedule, index, report (portraitgen/invert.py)",
        outputs=(
            *_checksummed(Output("index.parquet", "index")),
            Output("report.html", "report", report="Inversion"),
            Output("residuals.png", "plot", report="Inversion"),
            Output("shards", "shards", persist=True,
                   note="content-addressed trajectory shards: a rerun inverts only new or changed images"),
            Output("metrics.json", "metrics", note="everything the stage measured"),
            Output("summary.json", "summary", kind="metric", cache=False,
                   note="its headline numbers, tracked by git: the DVC metrics (portraitgen/summary.py)"),
        ),
        params=("invert", "model", "sample", "seed"), reads=lambda p: [p.invert.manifest], primary="index",
        resources={**_GPU, "runtime": 240, "invert_batch": 4}, hardware=" --batch-size {resources.invert_batch}",
        parts="done", roots=("main", "run"),
    ),
    Stage(
        name="precompute", command="precompute", folder="precompute",
        doc="prompt-embedding cache, the AI-Portrait detector (when a reward uses it), exemplar rewards "
            "(portraitgen/precompute.py)",
        outputs=(
            *_checksummed(Output("prompt_embeddings.safetensors", "embeddings")),
            *_checksummed(Output("exemplar_rewards.parquet", "rewards")),
            Output("metrics.json", "metrics", note="everything the stage measured"),
            Output("summary.json", "summary", kind="metric", cache=False,
                   note="its headline numbers, tracked by git: the DVC metrics (portraitgen/summary.py)"),
        ),
        params=("prompts", "reward", "model", "sample.eval_num_steps", "sample.guidance_scale", "sample.cfg",
                "bench.reward"),
        reads=lambda p: [p.invert.manifest, *_prompt_file(p)],
        resources={**_GPU, "runtime": 120}, parts="parquet", roots=("main", "run"),
        dvc_notes={"sample.eval_num_steps": "the detector's generated images (when a detector is trained here)",
                   "bench.reward": "a bench detector reward is trained here (bench prompts: stage bench_embeddings)"},
    ),
    # PortraitBench's prompt embeddings: a stage apart from precompute, so that editing bench.suite or
    # bench.subset reruns this stage and bench, never train. It writes into results/precompute to share
    # its per-prompt store (cache/embeddings, undeclared).
    Stage(
        name="bench_embeddings", command="precompute --bench-only", folder="precompute", shares_folder=True,
        doc="PortraitBench's prompt embeddings (bench.prompt_embeddings); never reruns train",
        outputs=(*_checksummed(Output("bench_prompt_embeddings.safetensors", "embeddings")),),
        params=("model.family", "model.path", "bench.suite", "bench.subset"),
        reads=lambda p: [] if _is_builtin(p.bench.suite) else [p.bench.suite], primary="embeddings",
        resources={**_GPU, "runtime": 60},
    ),
    Stage(
        name="train", command="launch-train", folder="train",
        doc="GRPO post-training on every GPU of the job (portraitgen/launch.py -> portraitgen/training.py)",
        outputs=(
            Output("final", "model", directory=True),
            Output("metrics.jsonl", "history", note="one row per iteration"),
            Output("checkpoints", "checkpoints", persist=True, local=True,
                   note="resume state of an interrupted run (large, useful only here: local, not in dvc.yaml)"),
            Output("metrics.json", "metrics", note="everything the stage measured"),
            Output("summary.json", "summary", kind="metric", cache=False,
                   note="its headline numbers, tracked by git: the DVC metrics (portraitgen/summary.py)"),
        ),
        params=tuple(training_params_keys()), reads=_train_reads, primary="model",
        threads=4, resources={"mem_mb": 16000, "runtime": 240, "gpu": 0}, hardware="train", roots=("main", "run"),
    ),
    Stage(
        name="bench", command="bench", folder="bench",
        doc="PortraitBench: the models of bench.models side by side (portraitgen/bench)",
        outputs=(
            Output("scores.parquet", "scores"),
            Output("per_category.parquet", "per_category"),
            Output("set_metrics.parquet", "set_metrics"),
            Output("comparisons.parquet", "comparisons"),
            Output("metrics_info.json", "metrics_info"),
            Output("report.html", "report"),
            # Its plots and side-by-side grids (report.html links them relatively: open it from the folder).
            Output("report_assets", "assets", directory=True, report="PortraitBench",
                   report_patterns=("plots/{name}.png", "grids/{name}.png")),
            Output("plots", "plots", directory=True),
            Output("images", "images", persist=True,
                   note="written by the part jobs when scattered; persist keeps them for the merge"),
            Output("metrics.json", "metrics", note="everything the stage measured"),
            Output("summary.json", "summary", kind="metric", cache=False,
                   note="its headline numbers, tracked by git: the DVC metrics (portraitgen/summary.py)"),
        ),
        params=("bench", "model"), reads=_bench_reads,
        resources={**_GPU, "runtime": 120, "bench_batch": 8}, hardware=" --batch-size {resources.bench_batch}",
        parts="parquet", roots=("main", "ablation"),
    ),
)

# dvc.yaml's plots (`dvc plots show` / `dvc plots diff`, also across `dvc exp`): differences with their
# bootstrap intervals, signed so that > 0 is better, and per-category differences of the main metric.
PLOTS: list[dict[str, Any]] = [
    {"results/bench/plots/comparisons.csv": {"template": "bar_horizontal", "x": "improvement", "y": "label"}},
    {"bench_per_category": {"template": "bar_horizontal", "x": "trained_vs_base/ai_portrait_classic",
                            "y": {"results/bench/plots/per_category.csv": "category"}}},
]


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage named {name!r}; stages: {', '.join(s.name for s in STAGES)}")


# --------------------------------------------------------------------------------------------------
# Dependencies: a path into another stage's folder -> that stage's output
# --------------------------------------------------------------------------------------------------
def _norm(path: str) -> str:
    return os.path.normpath(str(path)).replace(os.sep, "/")


def _split_root(path: str) -> tuple[str, str] | None:
    """(root, path inside the root) when ``path`` lies under a results root, else None."""
    for pattern in (ROOT_PATTERNS["named"], ROOT_PATTERNS["run"], ROOT_PATTERNS["ablation"], ROOT_PATTERNS["main"]):
        if m := re.match(rf"^({pattern})/(.+)$", path):
            return m.group(1), m.group(2)
    return None


def producer(path: str) -> tuple[Stage, str] | None:
    """(the stage that makes ``path``, the declared output that stands for it), or None for a user file.

    A declared output (or a path inside one) stands for itself; a path elsewhere in a stage's folder
    (an undeclared cache, e.g. the detector precompute trains) for the stage's primary output.
    """
    path = _norm(path)
    split = _split_root(path)
    if split is None:
        return None
    root, inner = split
    for s in STAGES:  # a declared output, or a path inside one
        for o in s.outputs:
            declared = f"{s.folder}/{o.path}"
            if not o.persist and (inner == declared or inner.startswith(declared + "/")):
                return s, f"{root}/{declared}"
    for s in STAGES:  # elsewhere in a stage's folder: an undeclared cache stands for the whole stage
        if not s.shares_folder and (inner == s.folder or inner.startswith(s.folder + "/")):
            return s, f"{root}/{s.folder}/{s.output(s.primary).path}"
    return None


def stage_inputs(s: Stage, params: Params) -> list[str]:
    """The files ``s`` reads besides the package: other stages' outputs and user files, sorted."""
    out = set()
    for path in s.reads(params):
        path = str(path)
        if not path or _is_builtin(path):
            continue
        made = producer(path)
        if made is None:
            # A path under results/ that no stage makes (e.g. a hand-made detector) is left to the stage.
            if not _norm(path).startswith(MAIN_ROOT + "/"):
                out.add(_norm(path))
        elif made[0].name != s.name:
            out.add(made[1])
    if s.loads_model:  # only a model another stage makes: a model folder of the user is not hashed by DVC
        made = producer(str(params.model.path)) if not _is_builtin(str(params.model.path)) else None
        if made is not None and made[0].name != s.name:
            out.add(made[1])
    return sorted(out)


# --------------------------------------------------------------------------------------------------
# Named runs: the pipeline under results/runs/<name>
# --------------------------------------------------------------------------------------------------
def named_run_root(name: str) -> str:
    """The root of the named run ``name`` (``results/runs/<name>``); a clear error for an unusable name."""
    if not isinstance(name, str) or not re.fullmatch(_NAMED, name):
        raise ValueError(f"run name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or "
                         f"digit (it becomes the folder {NAMED_RUNS}/<name>)")
    return f"{NAMED_RUNS}/{name}"


def named_run_params(data: Mapping[str, Any], root: str) -> dict[str, Any]:
    """``data`` (params as loaded) with every path into a stage's folder under ``results`` moved under
    ``root``: the model pretrain makes, the manifest, the exemplar index, prompt embeddings, exemplar
    rewards, detectors, the models the bench compares. User files (photos, prompt lists, a hand-made
    detector under results/ that no stage makes) stay where they are."""
    def rebase(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: rebase(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rebase(v) for v in value]
        if isinstance(value, str) and not _is_builtin(value):
            split = _split_root(_norm(value))
            if split is not None and split[0] == MAIN_ROOT and producer(value) is not None:
                return f"{root}/{split[1]}"
        return value

    return rebase(dict(data))


def named_run_params_text(data: Mapping[str, Any], name: str) -> str:
    """The params file of the named run ``name`` (``results/runs/<name>/params.yaml``)."""
    import yaml

    root = named_run_root(name)
    return (f"# Named run {name}: params.yaml with every stage's outputs under {root} (written by the workflow\n"
            f"# from params.yaml on every invocation with --config run={name}; edit params.yaml, not this file).\n"
            + yaml.safe_dump(named_run_params(data, root), sort_keys=False))


def write_named_run_params(data: Mapping[str, Any], name: str) -> str:
    """Write the named run's params file when its content differs from what is there, and leave it alone
    otherwise (its mtime then never makes a job look out of date; the params values are the triggers)."""
    from .io import atomic_write_text

    path = Path(named_run_root(name)) / PARAMS_FILE
    text = named_run_params_text(data, name)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return str(path)


# --------------------------------------------------------------------------------------------------
# Params values (rerun triggers)
# --------------------------------------------------------------------------------------------------
def _sorted_keys(value: Any) -> Any:
    # Snakemake compares params by their repr, which follows key order: without sorting, reordering
    # params.yaml would rerun every stage (DVC compares values).
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sorted_keys(v) for v in value]
    return value


def param_value(data: Mapping[str, Any], key: str) -> Any:
    """The value of a dotted params key in a nested params mapping (``None`` when absent)."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return _sorted_keys(node)


def param_name(key: str) -> str:
    """A params key as a Snakemake params name (``model.resolution`` -> ``model_resolution``)."""
    return key.replace(".", "_")


# --------------------------------------------------------------------------------------------------
# dvc.yaml
# --------------------------------------------------------------------------------------------------
DVC_HEADER = """\
# GENERATED from portraitgen/stages.py by `portraitgen dvc-yaml --write` (edit the table, not this
# file; `portraitgen dvc-yaml --check` fails when it is stale). The same stages as the Snakemake
# workflow (workflow/rules/*.smk read the same table), with the same commands and outputs: `dvc repro`
# and `snakemake --cores N` build the same artifacts under results/<stage>/.
# Params are the keys each stage reads, so editing one reruns exactly the stages that read it;
# `tracking` is in none (where MLflow records a run does not change what is computed). Deps are the
# files a stage reads, derived from params.yaml (regenerate after pointing a path elsewhere).
# Hardware settings are not part of the commands, so changing them never marks a stage as changed; set
# them through the environment (portraitgen/hardware.py), e.g.
#   PORTRAITGEN_MIXED_PRECISION=bf16 PORTRAITGEN_MICRO_BATCH=4 PORTRAITGEN_COMPILE=1 dvc repro
# A `.sha256` output is the checksum its readers verify the file beside it with (portraitgen/integrity.py),
# declared so that `dvc checkout` and `dvc exp apply` restore it together with the file.
"""


def dvc_command(s: Stage, params_file: str = PARAMS_FILE, root: str = MAIN_ROOT) -> str:
    verb, *flags = s.command.split()
    return " ".join(["portraitgen", verb, "--params", params_file, "--out", s.out_dir(root), *flags])


def dvc_stage(s: Stage, params: Params) -> dict[str, Any]:
    def entry(o: Output) -> Any:
        options = {k: v for k, v in (("persist", o.persist), ("cache", o.cache)) if v != (k == "cache")}
        path = f"{s.out_dir()}/{o.path}"
        return {path: options} if options else path

    body: dict[str, Any] = {"cmd": dvc_command(s), "deps": ["portraitgen", *stage_inputs(s, params)],
                            "params": list(s.params)}
    outs = [entry(o) for o in s.outputs if o.kind == "out" and not o.local]
    if outs:
        body["outs"] = outs
    if s.metrics:
        body["metrics"] = [entry(o) for o in s.metrics]
    return body


def dvc_yaml_text(params: Params) -> str:
    import yaml

    lines = [DVC_HEADER.rstrip("\n"), "stages:"]
    for s in STAGES:
        lines.append(f"  # {s.name}: {s.doc}")
        for o in s.outputs:
            if o.note:
                lines.append(f"  #   {o.path}: {o.note}")
        for key, note in s.dvc_notes.items():
            lines.append(f"  #   {key}: {note}")
        text = yaml.safe_dump({s.name: dvc_stage(s, params)}, sort_keys=False, width=120)
        lines += ["  " + ln for ln in text.rstrip("\n").splitlines()]
    lines.append("")
    lines.append("plots:")
    text = yaml.safe_dump(PLOTS, sort_keys=False, width=120)
    lines += ["  " + ln for ln in text.rstrip("\n").splitlines()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Snakemake (workflow/rules/*.smk): inputs, outputs, params and commands of the rules
# --------------------------------------------------------------------------------------------------
def package_files(folder: str = "portraitgen") -> list[str]:
    """Every file of the package (code and shipped data): the Snakemake twin of DVC's ``deps:
    [portraitgen]``, so that editing the package reruns the stages that run it."""
    return sorted(str(p) for p in Path(folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _expand_folder(path: str) -> list[str]:
    """A user folder as its files, so that Snakemake sees added or replaced files, not only the folder's
    mtime. A folder holding images (photos, a real reference set) contributes its images only: the
    stages read nothing else there."""
    from .curate import scan_folder

    p = Path(path)
    if not p.is_dir():
        return [path]
    # curate's own walk: each real folder once (no link loops), regular files only (a broken link or a
    # FIFO in the source is curate's to record, never a missing input that aborts the workflow).
    scan = scan_folder(p)
    return sorted(os.path.join(path, rel) for rel in (scan.images or scan.others))


class Workflow:
    """The Snakemake view of the table for one invocation: ``config`` (params.yaml as Snakemake loaded
    it, workflow options removed), the ablation file, the number of part jobs per stage, and the named
    run (``--config run=NAME``), whose root the main rules write under instead of ``results``."""

    def __init__(self, config: Mapping[str, Any], *, ablation_file: str = "ablation.yaml",
                 parts: Mapping[str, int] | None = None, run: str | None = None):
        self.config = dict(config)
        self.ablation_file = ablation_file
        self.parts = dict(parts or {})
        self.run = str(run) if run not in (None, "") else None
        # The root of the main rules: results, or results/runs/<name> for a named run.
        self.main_root = named_run_root(self.run) if self.run else MAIN_ROOT

    # ---- params of a root
    @functools.lru_cache(maxsize=None)
    def params_data(self, root: str) -> dict[str, Any]:
        """The params mapping a root's jobs run with (every key present, defaults filled in)."""
        if root == MAIN_ROOT:
            data = self.config
        elif NAMED_ROOT.match(root):
            data = named_run_params(self.config, root)
        elif root == ABLATION_ROOT:
            ablation = self._ablation()
            data = dict(self.config)
            data["bench"] = {**dict(self.config.get("bench") or {}),
                             "models": {run: f"{ABLATION_ROOT}/{run}/train" for run in ablation.runs},
                             "baseline": ablation.baseline_run}
        elif m := RUN_ROOT.match(root):
            from .ablation import run_params

            data = run_params(PARAMS_FILE, self._ablation(), m.group("run"), root)
        else:
            raise ValueError(f"{root!r} is not a results root")
        return params_to_dict(params_from_dict(dict(data)))

    def params(self, root: str) -> Params:
        return params_from_dict(self.params_data(root))

    def _ablation(self):
        from .ablation import load_ablation

        return load_ablation(self.ablation_file)

    def ablation_runs(self) -> list[str]:
        """The ablation's run names; none when its file does not exist (the ablation target then fails)."""
        if not Path(self.ablation_file).is_file():
            return []
        return self._ablation().runs

    def params_file(self, root: str) -> str:
        return f"{root}/{PARAMS_FILE}" if RUN_ROOT.match(root) or NAMED_ROOT.match(root) else PARAMS_FILE

    def write_run_params(self) -> str | None:
        """A named run's params file (written at parse time, only when it changes); None without a run."""
        return write_named_run_params(self.config, self.run) if self.run else None

    # ---- per rule
    @staticmethod
    def package_files() -> list[str]:
        """The package as a job input: one content stamp, not its ~60 files (portraitgen/package_stamp.py)."""
        return [package_stamp()]

    @staticmethod
    def run_constraint() -> str:
        """The `run` wildcard of an ablation run's own rules (portraitgen.ablation.run_name)."""
        return ROOT_PATTERNS["run"].removeprefix(ABLATION_ROOT + "/")

    @staticmethod
    def stage_names() -> list[str]:
        return [s.name for s in STAGES]

    @staticmethod
    def part_is_marker(name: str) -> bool:
        """The part job writes no part file of its own (invert: its shards), only a marker for the merge."""
        return stage(name).parts == "done"

    def threads(self, name: str) -> int:
        return stage(name).threads

    def rule_variants(self, name: str) -> list[tuple[str, str | None]]:
        """(rule name, root) of the stage's rules. The main pipeline's rule has the stage's name and the
        concrete root of the invocation, `results` or a named run's `results/runs/<name>` (so `snakemake
        train` and a profile's `train:` settings work as ever); the ablation's rule, made by the same code,
        has the name `ablation_<stage>` and a `{root}` wildcard over the ablation's roots (root None)."""
        roots = stage(name).roots
        variants: list[tuple[str, str | None]] = [(name, self.main_root)] if "main" in roots else []
        if any(r != "main" for r in roots):
            variants.append((f"ablation_{name}", None))
        return variants

    def rules(self) -> list[tuple[str, str, str | None]]:
        """(stage, rule name, root) of every stage rule: the rule_variants of every stage."""
        return [(s.name, rule, root) for s in STAGES for rule, root in self.rule_variants(s.name)]

    def constraints(self, name: str, root: str | None, *, part: bool = False) -> dict[str, str]:
        """The wildcard constraints of a rule: `{root}` for an ablation rule, `{part}` for a part rule."""
        found = {} if root else {"root": self.root_constraint(name)}
        return {**found, **({"part": r"\d{4}"} if part else {})}

    def root_constraint(self, name: str) -> str:
        """The `{root}` wildcard of the stage's ablation rule: its roots other than `results`."""
        return "|".join(ROOT_PATTERNS[r] for r in stage(name).roots if r != "main")

    def report_of(self, name: str, key: str) -> tuple[str, list[str]]:
        """(category, patterns) of an output in `snakemake --report` (category "" = not shown)."""
        o = stage(name).output(key)
        return o.report, list(o.report_patterns)

    def outputs(self, name: str, root: str | None = None) -> dict[str, tuple[str, bool]]:
        """Snakemake output name -> (path under ``root``, or a pattern with {root}, is a directory): the
        declared outputs."""
        s, base = stage(name), root or "{root}"
        return {o.name: (f"{base}/{s.folder}/{o.path}", o.directory) for o in s.outputs if not o.persist}

    def declared_outputs(self) -> list[str]:
        """Every declared output of every stage rule, concrete paths: the main rules' under the
        invocation's root, the ablation rules' under each root of the ablation file's runs (none without
        one). What the Snakefile keeps until a run replaces it (portraitgen/kept_outputs.py)."""
        roots = {"main": [self.main_root], "run": [f"{ABLATION_ROOT}/{r}" for r in self.ablation_runs()],
                 "ablation": [ABLATION_ROOT] if self.ablation_runs() else []}
        found = []
        for s in STAGES:
            for kind in s.roots:
                for root in roots[kind]:
                    found += [path for path, _ in self.outputs(s.name, root).values()]
        return found

    def inputs(self, name: str, wildcards: Any, *, root: str | None = None, merge: bool = True
               ) -> dict[str, list[str]]:
        s = stage(name)
        root = root or wildcards.root
        files = []
        for path in stage_inputs(s, self.params(root)):
            files += [path] if producer(path) else _expand_folder(path)
        found = {"src": [package_stamp()], "deps": files}  # the package as one input (package_stamp.py)
        if RUN_ROOT.match(root):
            found["params_file"] = [self.params_file(root)]
        elif NAMED_ROOT.match(root):
            # Written at parse time, only when it changes (write_run_params): the rules mark it ancient, so
            # the params values a stage reads, not the file's mtime, decide what reruns (as for results/).
            found["run_params"] = [self.params_file(root)]
        if merge and self.num_parts(name) > 1:
            found["parts"] = self.part_files(name, root)
        return found

    def param_values(self, name: str, wildcards: Any, root: str | None = None) -> dict[str, Any]:
        data = self.params_data(root or wildcards.root)
        return {param_name(k): param_value(data, k) for k in stage(name).params}

    def param_names(self, name: str) -> list[str]:
        return [param_name(k) for k in stage(name).params]

    def num_parts(self, name: str) -> int:
        return int(self.parts.get(name, 1)) if stage(name).parts else 1

    def part_pattern(self, name: str, root: str | None = None) -> str:
        s = stage(name)
        return part_pattern(f"{root or '{root}'}/{s.folder}", self.num_parts(name), s.parts)

    def part_files(self, name: str, root: str) -> list[str]:
        s, n = stage(name), self.num_parts(name)
        return [str(part_file(f"{root}/{s.folder}", i, n, s.parts)) for i in range(n)]

    def resources(self, name: str) -> dict[str, Any]:
        from .hardware import snakemake_resources

        s = stage(name)
        return {**s.resources, **(snakemake_resources() if s.hardware == "train" else {})}

    def extra_args(self, name: str, wildcards: Any, root: str | None = None) -> str:
        """Flags a root adds to the command: the ablation's bench names its models and baseline."""
        if name == "bench" and (root or wildcards.root) == ABLATION_ROOT:
            bench = self.params_data(ABLATION_ROOT)["bench"]
            models = "".join(f" --model {label}={path}" for label, path in bench["models"].items())
            return f"{models} --baseline {bench['baseline']}"
        return ""

    def shell(self, name: str, root: str | None = None, *, part: bool = False) -> str:
        """The rule's command: the DVC command on the root's params file, its part or merge flags, its
        hardware flags from threads/resources, and the log. ``root`` None: the job's `{root}` wildcard."""
        from .hardware import snakemake_flags

        s = stage(name)
        verb, *flags = s.command.split()
        command = " ".join(["portraitgen", verb, "--params {params.params_file}",
                            f"--out {root or '{wildcards.root}'}/{s.folder}", *flags])
        command += "{params.extra_args}"
        n = self.num_parts(name)
        if part:
            command += f" --part {{wildcards.part}} --num-parts {n}"
        hardware = snakemake_flags() if s.hardware == "train" else s.hardware
        command += hardware
        if not part and n > 1:
            command += f" --merge-only --num-parts {n}"
        # Complete output to the log, progress lines on the console (portraitgen/progress.py).
        label = f"{name} part {{wildcards.part}}" if part else name
        return command + f" 2>&1 | portraitgen progress --log {{log}} --stage '{label}'"

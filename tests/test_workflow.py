"""The Snakemake workflow and dvc.yaml describe the same pipeline.

Every test runs on a copy of the project's real workflow files (workflow/, dvc.yaml, params.yaml,
the package) in a temporary folder, so no test creates .snakemake/, .dvc/tmp or results/ in the
repository. The end-to-end tests replace the `portraitgen` command with a stub on PATH that records
its arguments and writes the stage's outputs: they check the wiring (which files survive a rerun,
what triggers one), not the training itself.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from portraitgen.hardware import HARDWARE_FIELDS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
DVC = str(BIN / "dvc") if (BIN / "dvc").exists() else shutil.which("dvc")

pytestmark = pytest.mark.skipif(not (SNAKEMAKE and DVC), reason="needs snakemake and dvc (extra 'workflow')")

# Hardware flags the Snakemake rules add to a stage's command (from resources and threads: curate's
# workers, the batch sizes, every Hardware option of train), and its log redirect.
TRAIN_HARDWARE = "".join(rf"( {f.metadata['flag']} \S+)?" for f in HARDWARE_FIELDS)
HARDWARE_FLAGS = re.compile(rf"( --workers \S+)?{TRAIN_HARDWARE}( --batch-size \S+)?"
                            r"( 2>&1 \| portraitgen progress --log \S+ --stage '[^']+')?$")
TRAIN_DEFAULT_FLAGS = ["--micro-batch-size", "0", "--mixed-precision", "no", "--rollout-batch-size", "0",
                       "--fp32-frozen-weights", "0", "--compile", "0", "--gradient-checkpointing", "0"]

# Lists the rules as Snakemake parsed them (named outputs, params names, input), as JSON.
INTROSPECT = textwrap.dedent(
    """
    import json
    import re
    from pathlib import Path
    from snakemake.api import SnakemakeApi
    from snakemake.io import is_flagged
    from snakemake.settings.types import OutputSettings, ResourceSettings

    def plain(f):  # "{root,results}" (a wildcard with its rule's constraint) -> "{root}"
        return re.sub(r",[^{}]*}", "}", str(f))

    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            snakefile=Path("Snakefile"),
            workdir=Path.cwd(),
        )._workflow
        print(json.dumps({
            rule.name: {
                "input": [str(f) for f in rule.input],
                "output": {name: plain(f) for name, f in rule.output._allitems()},
                "directories": [plain(f) for f in rule.output if is_flagged(f, "directory")],
                "params": list(rule.params.keys()),
                "log": [plain(f) for f in rule.log],
                "benchmark": plain(rule.benchmark) if rule.benchmark else None,
            }
            for rule in workflow.rules
        }))
    """
)


def _copy_project(dest: Path) -> Path:
    for name in ("workflow", "portraitgen"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("Snakefile", "dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, dest / name)
    os.symlink(os.readlink(REPO / "profiles"), dest / "profiles")
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return _copy_project(tmp_path / "project")


def _env(extra_path: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", **extra)
    path = [str(BIN), env.get("PATH", "")]
    if extra_path is not None:
        path.insert(0, str(extra_path))
    env["PATH"] = os.pathsep.join(path)
    return env


def smk(project: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [SNAKEMAKE, "--cores", "1", *args], cwd=project, env=env or _env(),
        capture_output=True, text=True, timeout=120,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([DVC, *args], cwd=project, env=env or _env(), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dry_run_commands(project: Path, *args: str) -> dict[str, str]:
    """rule name -> the shell command a dry run prints for its job."""
    proc = smk(project, "-n", "--printshellcmds", *args)
    # Snakemake finds the root Snakefile and then profiles/default (a link into workflow/profiles).
    assert "Using workflow specific profile profiles/default" in proc.stderr
    out = proc.stdout
    commands, rule = {}, None
    for line in out.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line.strip()):
            rule = m.group(1)
        elif line.startswith("Shell command:") and rule is not None:
            command = line.removeprefix("Shell command:").strip()
            if command != "None":  # rules without a command, like `all`
                commands[rule] = command
    return commands


def snakemake_rules(project: Path) -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", INTROSPECT], cwd=project, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dvc_stages(project: Path) -> dict[str, dict]:
    return yaml.safe_load((project / "dvc.yaml").read_text())["stages"]


def _out_paths(entries: list) -> dict[str, dict]:
    """dvc.yaml outs/metrics entries (plain paths or {path: options}) -> {path: options}."""
    result = {}
    for entry in entries:
        if isinstance(entry, str):
            result[entry] = {}
        else:
            (path, options), = entry.items()
            result[path] = options or {}
    return result


# --------------------------------------------------------------------------------------------------
# Static checks: lint, dry run, and the agreement of the two descriptions
# --------------------------------------------------------------------------------------------------
def test_lint_passes(project):
    proc = smk(project, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_dry_run_lists_train_with_the_dvc_command(project):
    assert (REPO / "profiles").resolve() == (REPO / "workflow" / "profiles").resolve()  # see dry_run_commands
    commands = dry_run_commands(project)
    # `all` has no command; pretrain runs when model.path is its output.
    assert {"curate", "invert", "precompute", "bench_embeddings", "train", "bench"} <= set(commands)
    assert set(commands) <= set(dvc_stages(project))
    assert commands["curate"] == (
        "portraitgen curate --params params.yaml --out results/curate --workers 1"
        " 2>&1 | portraitgen progress --log results/logs/curate.log --stage 'curate'"
    )
    assert commands["train"] == (
        "portraitgen launch-train --params params.yaml --out results/train "
        + " ".join(TRAIN_DEFAULT_FLAGS) + " 2>&1 | portraitgen progress --log results/logs/train.log --stage 'train'"
    )
    stages = dvc_stages(project)
    for name, stage in stages.items():
        if name not in commands:
            continue
        # The Snakemake command is the DVC command plus hardware flags and the log redirect.
        assert HARDWARE_FLAGS.sub("", commands[name]) == stage["cmd"], name


PACKAGE_STAMP = ".snakemake/portraitgen-package.sha256"  # the package as one job input (package_stamp.py)


def _dry_run_inputs(project: Path, *args: str) -> dict[str, set[str]]:
    """rule name -> the files its job reads besides the package, as a real dry run lists them."""
    out = smk(project, "-n", *args).stdout
    found, rule = {}, None
    for line in out.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line.strip()):
            rule = m.group(1)
        elif line.strip().startswith("input:") and rule is not None:
            files = line.strip().removeprefix("input:").split(", ")
            found[rule] = {f.strip() for f in files if f.strip() and f.strip() != PACKAGE_STAMP}
    return found


def test_snakemake_rules_and_dvc_yaml_come_from_the_stage_table(project):
    """One table (portraitgen/stages.py): dvc.yaml is its generated form, and the rules read it."""
    from portraitgen.stages import STAGES

    gen = subprocess.run([sys.executable, "-m", "portraitgen", "dvc-yaml", "--check"], cwd=project, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    rules = snakemake_rules(project)
    stages = dvc_stages(project)
    # Ablation runs use the stage rules made by the same code, with a {root} wildcard (ablation_<stage>);
    # the run's params file and the ablation's report have rules of their own. The reward server is a job
    # beside the stages.
    ablation = {name for name in rules if name.startswith("ablation")} | {"reward_server"} | {
        name for name in rules if name.endswith("_with_reward_server")}
    assert {"ablation", "ablation_params"} <= ablation
    for name in ("invert", "precompute", "train", "bench"):
        twin = rules[f"ablation_{name}"]
        assert {k: p.replace("{root}", "results") for k, p in twin["output"].items()} == rules[name]["output"]
        assert twin["params"] == rules[name]["params"] and twin["log"] == [f"{{root}}/logs/{name}.log"]
    # The reward server's job and its paired targets (rules/reward_server.smk) serve stages; none is one.
    served = {"reward_server", "train_with_reward_server", "bench_with_reward_server"}
    assert set(rules) - {"all"} - ablation - served == set(stages) == {s.name for s in STAGES}
    inputs = _dry_run_inputs(project)
    assert {"curate", "invert", "precompute", "bench_embeddings", "train", "bench"} <= set(inputs)

    for name, stage in stages.items():
        rule = rules[name]
        outs = _out_paths(stage.get("outs", []))
        metrics = _out_paths(stage.get("metrics", []))
        persistent = {p for p, o in outs.items() if o.get("persist")}
        # Outputs DVC rebuilds are exactly Snakemake's declared outputs (for the main root); persistent
        # ones (resume state, caches) are left undeclared in Snakemake, which would delete them.
        declared = {p.replace("{root}", "results") for p in rule["output"].values()}
        assert declared == (set(outs) - persistent) | set(metrics), name
        # Both tools pass the same params keys (DVC's `model.resolution` is Snakemake's `model_resolution`),
        # plus, in Snakemake, the root's params file and the flags a root adds.
        assert rule["params"] == ["params_file", "extra_args", *(k.replace(".", "_") for k in stage["params"])], name
        assert "portraitgen" in stage["deps"]
        # Besides the package, both read the same files of other stages (a real dry run's job inputs).
        if name in inputs:  # a stage of the default target
            assert inputs[name] == set(stage["deps"]) - {"portraitgen"}, name
        assert rule["log"] == [f"results/logs/{name}.log"]
        assert rule["benchmark"] == f"results/benchmarks/{name}.tsv"
    # No file is the output of two stages (the bench's prompts are not in a file training reads).
    declared = [p for stage in stages.values() for p in [*_out_paths(stage.get("outs", [])),
                                                         *_out_paths(stage.get("metrics", []))]]
    assert len(declared) == len(set(declared))

    assert rules["bench_embeddings"]["output"] == {
        "embeddings": "results/precompute/bench_prompt_embeddings.safetensors",
        "embeddings_sha256": "results/precompute/bench_prompt_embeddings.safetensors.sha256"}
    assert "results/precompute/bench_prompt_embeddings.safetensors" in inputs["bench"]
    assert not {"bench_suite", "bench_subset"} & set(rules["precompute"]["params"])  # but bench_reward stays
    assert "bench_reward" in rules["precompute"]["params"]
    assert rules["train"]["output"] == {"model": "results/train/final", "metrics": "results/train/metrics.json",
                                        "summary": "results/train/summary.json", "history": "results/train/metrics.jsonl"}
    assert rules["train"]["directories"] == ["results/train/final"]
    # Resume state and the per-image cache stay local: in no tool's outputs, so neither deletes them before a
    # run and a clone that pulled the results misses nothing (dvc status: up to date).
    assert "results/train/checkpoints" not in _out_paths(stages["train"]["outs"])
    assert rules["curate"]["directories"] == ["results/curate/images"]
    # The per-image cache survives reruns in both tools (what makes adding images cheap).
    assert "results/curate/cache" not in _out_paths(stages["curate"]["outs"])
    # Each stage's DVC metrics are its few headline numbers, tracked by git (cache: false).
    assert {s: _out_paths(stages[s]["metrics"]) for s in ("curate", "train", "bench")} == {
        s: {f"results/{s}/summary.json": {"cache": False}} for s in ("curate", "train", "bench")}
    assert "results/curate/manifest.parquet" in rules["all"]["input"]


def test_a_detector_reward_orders_bench_and_train_after_precompute(project):
    """`ai_portrait` with `backend: detector` scores with the detector precompute trains: with nothing
    else linking them (no cached embeddings, no exemplars), train and bench still wait for precompute."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    reward = {"components": {"ai_portrait": 1.0},
              "options": {"ai_portrait": {"backend": "detector", "path": "results/precompute/detector"}}}
    params["reward"] = reward
    params["bench"]["reward"] = reward
    params["model"]["path"] = "builtin:tiny"  # no pretrain stage either
    params["prompts"]["source"] = "builtin:demo"
    params["train"]["prompt_embeddings"] = ""
    params["train"]["exemplars"]["per_group"] = 0
    params["bench"]["prompt_embeddings"] = ""
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    inputs = _dry_run_inputs(project)
    assert inputs["train"] == {"results/precompute/metrics.json"}
    assert "results/precompute/metrics.json" in inputs["bench"]
    # DVC, generated from the same table and these params, orders them the same way.
    subprocess.run([sys.executable, "-m", "portraitgen", "dvc-yaml", "--write"], cwd=project, env=_env(), check=True)
    assert "results/precompute/metrics.json" in dvc_stages(project)["train"]["deps"]


def test_a_stage_is_a_target_by_its_name(project):
    """`snakemake train` builds the training and what it needs, nothing downstream."""
    assert _jobs(smk(project, "-n", "train").stdout) - {"pretrain"} == {"curate", "invert", "precompute", "train"}


def test_a_model_made_by_pretrain_is_an_input_of_every_stage_that_loads_it(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["path"] = "results/pretrain/model"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    inputs = _dry_run_inputs(project)
    # The model folder is kept across reruns (undeclared in Snakemake): its metrics.json stands for it.
    loading = {name for name, files in inputs.items() if "results/pretrain/metrics.json" in files}
    assert loading == {"invert", "precompute", "bench_embeddings", "train", "bench"}
    assert "pretrain" in inputs and "curate" in inputs  # curate only crops at model.resolution


def test_params_keys_are_real_sections_and_exclude_tracking(project):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    from portraitgen.fingerprint import training_params_keys

    keys = dvc_stages(project)["train"]["params"]
    # The training keys (portraitgen/fingerprint.py): whole sections, and `sample` without its eval steps.
    assert keys == training_params_keys()
    assert keys[:3] == ["seed", "model", "prompts"] and keys[-2:] == ["train", "reward"]
    assert "sample.noise_level" in keys and "sample.eval_num_steps" not in keys
    assert {k.split(".")[0] for k in keys} <= set(params)
    assert "tracking" in params and "tracking" not in keys


def test_curate_params_are_its_section_and_the_crop_size(project):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = dvc_stages(project)["curate"]["params"]
    assert keys == ["curate", "model.resolution"]
    assert "curate" in params and "resolution" in params["model"]
    # The package reads the same section: params.yaml sets every CurateConfig field.
    import dataclasses

    from portraitgen.config import CurateConfig

    assert set(params["curate"]) == {f.name for f in dataclasses.fields(CurateConfig)}


def test_curate_scatters_into_parts_and_gathers(project):
    proc = smk(project, "-n", "--printshellcmds", "--config", "curate_parts=3")
    shells = [ln.removeprefix("Shell command:").strip() for ln in proc.stdout.splitlines()
              if ln.startswith("Shell command:")]
    parts = sorted(c for c in shells if " --part " in c)
    assert parts == [
        f"portraitgen curate --params params.yaml --out results/curate --part {i:04d} --num-parts 3"
        f" --workers 1 2>&1 | portraitgen progress --log results/logs/curate_part-{i:04d}.log"
        f" --stage 'curate part {i:04d}'" for i in range(3)
    ]
    assert ("portraitgen curate --params params.yaml --out results/curate --workers 1 --merge-only --num-parts 3"
            " 2>&1 | portraitgen progress --log results/logs/curate.log --stage 'curate'") in shells


def test_hardware_flags_come_from_resources_not_params(project):
    commands = dry_run_commands(
        project, "--set-resources", "train:micro_batch=4", "train:mixed_precision=bf16", "train:gpu=1",
        "train:rollout_batch=16", "train:fp32_frozen_weights=1", "train:compile=1", "train:gradient_checkpointing=1",
    )
    # Every Hardware option (portraitgen/hardware.py) is a resource of the train rule.
    assert (" --micro-batch-size 4 --mixed-precision bf16 --rollout-batch-size 16 --fp32-frozen-weights 1"
            " --compile 1 --gradient-checkpointing 1 ") in commands["train"]

    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)

    hardware = {"micro_batch", "micro_batch_size", "mixed_precision", "gpu", "gpus", "num_processes"}
    assert hardware.isdisjoint(keys(yaml.safe_load((REPO / "params.yaml").read_text())))


def test_missing_params_section_is_named(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["reward"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = smk(project, "-n", check=False)
    assert proc.returncode != 0
    assert "reward: missing (a required section or key)" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("model.family", "sdx", "model.family: expected one of sd3, flux, zimage, got 'sdx'"),  # the schema (enum)
        ("train.lrr", 0.1, "train.lrr: unknown key (did you mean 'lr'?)"),  # the schema (unknown key) ...
        ("sample.num_steps", "ten", "sample.num_steps: expected an integer, got 'ten'"),  # ... and types
        ("train.lr", -1.0, "train.lr: expected > 0, got -1.0"),  # the package's range check
        ("model.path", "/no/such/model", "model.path: expected a diffusers model folder"),  # what params name
    ],
)
def test_bad_params_value_stops_before_any_job(project, dotted, value, message):
    params = yaml.safe_load((project / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = smk(project, check=False)  # a real run, not a dry run: it must stop while building the DAG
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out
    assert "params.yaml has 1 problem(s)" in out and "additionalProperties" not in out  # never the schema
    assert not (project / "results").exists()  # no job started


def test_dvc_stage_list_shows_train(project):
    dvc(project, "init", "--no-scm", "-q")
    assert {"curate", "train"} <= set(dvc(project, "stage", "list", "--name-only").stdout.split())
    listed = dvc(project, "stage", "list").stdout  # truncated to the terminal's width
    assert re.search(r"^train\s+Outputs results/train/final, ", listed, re.M), listed


def test_dvc_config_is_quiet_and_does_not_stage():
    # Asked of DVC itself (a commented-out line or a misspelt section would pass a pattern match).
    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([DVC, *args], cwd=REPO, capture_output=True, text=True, timeout=120)

    for key in ("core.analytics", "core.autostage"):
        got = dvc("config", key)
        assert got.returncode == 0 and got.stdout.strip().lower() == "false", (key, got.stdout, got.stderr)
    # Paths inside the folders: DVC matches a "dir/" pattern against a folder only when it exists, and a
    # fresh clone has no .snakemake/ yet.
    paths = [".venv/bin/python", "mlflow.db", ".snakemake/log/x.log", "mlruns/0/meta.yaml"]
    ignored = dvc("check-ignore", *paths)
    assert ignored.returncode == 0 and ignored.stdout.split() == paths, ignored
    assert dvc("check-ignore", "params.yaml").returncode == 1  # and it does not ignore everything


# --------------------------------------------------------------------------------------------------
# End to end with a stub `portraitgen`: what survives a rerun, what triggers one
# --------------------------------------------------------------------------------------------------
STUB = """#!{python}
# Stand-in for `portraitgen train` / `launch-train`: records its arguments, resumes like the trainer (one new
# checkpoint per run, numbered after the ones it finds), writes final/ and metrics.json, and fails
# after checkpointing when PORTRAITGEN_STUB_FAIL is set. For `portraitgen curate`: writes the stage's
# outputs and adds one entry to its cache per run; for invert, precompute (--bench-only: the bench's
# prompt embeddings only) and bench: their declared outputs.
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
if args[0] == "mlflow-parent":  # the Snakefile's onstart/onsuccess hooks: no parent run (tracking off)
    sys.exit(0)
if args[0] == "progress":  # the rules' console filter: the job's output goes to its log
    Path(args[args.index("--log") + 1]).write_bytes(sys.stdin.buffer.read())
    sys.exit(0)
out = Path(args[args.index("--out") + 1])
if args[0] == "curate":  # the curate stage's outputs and its (undeclared / persistent) cache
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    (out / "cache" / f"entry-{{len(list((out / 'cache').iterdir()))}}").write_text("analysis")
    (out / "images" / "0123456789abcdef.png").write_text("crop")
    for name in ("rejected.parquet", "report.html"):
        (out / name).write_text(name)
    # A manifest that follows curate.max_blur, and its checksum sidecar as portraitgen/integrity.py writes it.
    import hashlib, yaml
    blur = yaml.safe_load(open(args[args.index("--params") + 1]))["curate"]["max_blur"]
    (out / "manifest.parquet").write_text(f"manifest of max_blur={{blur}}")
    digest = hashlib.sha256((out / "manifest.parquet").read_bytes()).hexdigest()
    (out / "manifest.parquet.sha256").write_text(f"{{digest}}  manifest.parquet\\n")
    (out / "metrics.json").write_text(json.dumps({{"kept": 1}}))
    (out / "summary.json").write_text(json.dumps({{"kept": 1}}))
    with open(os.environ["PORTRAITGEN_STUB_LOG"], "a") as f:
        f.write(json.dumps({{"args": args, "cache": sorted(p.name for p in (out / "cache").iterdir())}}) + "\\n")
    sys.exit(0)
if args[0] in ("pretrain", "invert", "precompute", "bench"):  # their declared outputs
    names = {{"pretrain": ["model/model_index.json", "artifact_detector/detector.json", "samples.png", "metrics.json",
                          "summary.json"],
             "invert": ["index.parquet", "index.parquet.sha256", "report.html", "residuals.png", "metrics.json",
                        "summary.json"],
             "precompute": (["bench_prompt_embeddings.safetensors", "bench_prompt_embeddings.safetensors.sha256"]
                            if "--bench-only" in args else
                            ["prompt_embeddings.safetensors", "prompt_embeddings.safetensors.sha256",
                             "exemplar_rewards.parquet", "exemplar_rewards.parquet.sha256", "metrics.json",
                             "summary.json"]),
             "bench": ["scores.parquet", "per_category.parquet", "set_metrics.parquet", "comparisons.parquet",
                       "metrics_info.json", "report.html", "report_assets/grid.png", "plots/comparisons.csv",
                       "images/base/p000_s0.png", "metrics.json", "summary.json"]}}
    for name in names[args[0]]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    if args[0] == "bench":  # metrics for `dvc metrics`: a difference that depends on train.lr
        import yaml
        lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
        (out / "metrics.json").write_text(json.dumps({{"comparisons": {{"trained_vs_base": {{"omni": lr}}}}}}))
        (out / "summary.json").write_text(json.dumps({{"trained": {{"omni": lr}}}}))
    if args[0] == "invert":  # the persistent shard cache
        (out / "shards").mkdir(exist_ok=True)
        (out / "shards" / "shard-0123456789abcdef.safetensors").write_text("trajectories")
    with open(os.environ["PORTRAITGEN_STUB_LOG"], "a") as f:
        f.write(json.dumps({{"args": args}}) + "\\n")
    sys.exit(0)
ckpts = out / "checkpoints"
ckpts.mkdir(parents=True, exist_ok=True)
found = sorted(p.name for p in ckpts.iterdir())
(ckpts / f"ckpt-{{len(found)}}").write_text("state")
with open(os.environ["PORTRAITGEN_STUB_LOG"], "a") as f:
    f.write(json.dumps({{"args": args, "resumed_from": found, "final_existed": (out / "final").exists()}}) + "\\n")
if os.environ.get("PORTRAITGEN_STUB_FAIL"):
    sys.exit("stub: failing on purpose")
(out / "final").mkdir(exist_ok=True)
(out / "final" / "model.safetensors").write_text("weights of " + open(args[args.index("--params") + 1]).read())
(out / "metrics.json").write_text(json.dumps({{"reward_mean": 0.5}}))
(out / "summary.json").write_text(json.dumps({{"reward_last": 0.5}}))
(out / "metrics.jsonl").write_text(json.dumps({{"iteration": 0}}) + "\\n")
"""


@pytest.fixture
def stub_env(tmp_path: Path):
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    exe = bin_dir / "portraitgen"
    exe.write_text(STUB.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "stub-calls.jsonl"

    def env(**extra):
        return _env(bin_dir, PORTRAITGEN_STUB_LOG=str(log), **extra)

    def calls(stage="train"):
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        # The train rule runs `portraitgen launch-train`, which starts `portraitgen train` per GPU.
        names = {stage, "launch-train"} if stage == "train" else {stage}
        return [row for row in rows if row["args"][0] in names]

    return env, calls


def _edit_params(project: Path, section: str, key: str, value) -> None:
    """Set params[section][key]. The file is rewritten with its keys sorted, i.e. reordered: that
    alone must not rerun anything."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=True))


def _other_model_folder(project: Path) -> str:
    """A diffusers model folder elsewhere (the params check wants model.path to be one)."""
    folder = project / "models" / "elsewhere"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    return str(folder)


def test_snakemake_keeps_checkpoints_and_reruns_only_on_params(project, stub_env):
    env, calls = stub_env
    smk(project, env=env())
    train = project / "results" / "train"
    assert (train / "metrics.json").exists() and (train / "final" / "model.safetensors").exists()
    assert (project / "results" / "benchmarks" / "train.tsv").exists()
    assert calls()[-1]["args"] == ["launch-train", "--params", "params.yaml", "--out", "results/train",
                                   *TRAIN_DEFAULT_FLAGS]

    # Hardware and tracking settings, and the order of keys, do not rerun a finished job.
    _edit_params(project, "tracking", "uri", "sqlite:///elsewhere.db")
    dry = smk(project, "-n", "--set-resources", "train:micro_batch=4", "train:mixed_precision=bf16",
              "train:rollout_batch=8", "train:compile=1", "train:gradient_checkpointing=1",
              "train:fp32_frozen_weights=1", env=env())
    assert "Nothing to be done" in dry.stdout, dry.stdout

    # A training setting does; the rerun fails after writing a checkpoint. Snakemake deletes the declared
    # outputs before the job and after its failure; the Snakefile's hooks put the last good ones back
    # (portraitgen/kept_outputs.py), with their provenance, so the next run still redoes train.
    old_weights = (train / "final" / "model.safetensors").read_text()
    assert "lr: 0.5" not in old_weights
    _edit_params(project, "train", "lr", 0.5)
    failed = smk(project, env=env(PORTRAITGEN_STUB_FAIL="1"), check=False)
    assert failed.returncode != 0
    assert re.search(r"rule train:.*?reason: Params have changed", failed.stdout + failed.stderr, re.S)
    assert "kept-outputs: restored results/train/final" in failed.stdout
    assert (train / "final" / "model.safetensors").read_text() == old_weights  # the last good model
    assert json.loads((train / "metrics.json").read_text()) == {"reward_mean": 0.5}
    assert sorted(p.name for p in (train / "checkpoints").iterdir()) == ["ckpt-0", "ckpt-1"]
    dry = smk(project, "-n", env=env())
    assert re.search(r"rule train:.*?reason: Params have changed", dry.stdout, re.S), dry.stdout

    smk(project, env=env())
    last = calls()[-1]
    assert last["resumed_from"] == ["ckpt-0", "ckpt-1"]
    assert last["final_existed"] is False
    assert "lr: 0.5" in (train / "final" / "model.safetensors").read_text()
    kept = project / ".snakemake" / "kept-outputs"
    assert [p.name for p in kept.iterdir()] == [".lock"]  # the run succeeded: nothing kept
    assert "Nothing to be done" in smk(project, "-n", env=env()).stdout


def test_dvc_repro_keeps_checkpoints(project, stub_env):
    env, calls = stub_env
    dvc(project, "init", "--no-scm", "-q")
    dvc(project, "repro", env=env())
    assert calls()[-1]["args"] == ["launch-train", "--params", "params.yaml", "--out", "results/train"]
    train = project / "results" / "train"
    assert json.loads((train / "metrics.json").read_text()) == {"reward_mean": 0.5}

    # Editing tracking changes nothing DVC tracks; editing a training setting reruns the stage,
    # which resumes from the persisted checkpoints while final/ is rebuilt from scratch.
    _edit_params(project, "tracking", "experiment", "other")
    assert "up to date" in dvc(project, "status", env=env()).stdout
    _edit_params(project, "sample", "noise_level", 0.9)
    assert re.search(r"params.yaml:\s+modified:\s+sample.noise_level$", dvc(project, "status", env=env()).stdout,
                     re.M)
    dvc(project, "repro", env=env())
    last = calls()[-1]
    assert last["resumed_from"] == ["ckpt-0"]
    assert last["final_existed"] is False
    assert sorted(p.name for p in (train / "checkpoints").iterdir()) == ["ckpt-0", "ckpt-1"]


def test_snakemake_reruns_curate_on_its_params_and_photos_only(project, stub_env):
    env, calls = stub_env
    photos = project / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"jpeg")
    (photos / "notes.txt").write_text("not an image: not an input")
    _edit_params(project, "curate", "source", "photos")
    smk(project, env=env())
    assert calls("curate")[-1]["args"] == [
        "curate", "--params", "params.yaml", "--out", "results/curate", "--workers", "1"
    ]
    assert (project / "results" / "benchmarks" / "curate.tsv").exists()
    # Training settings, the model's path and tracking do not change what is curated.
    _edit_params(project, "train", "lr", 0.5)
    _edit_params(project, "model", "path", _other_model_folder(project))
    _edit_params(project, "tracking", "uri", "sqlite:///elsewhere.db")
    (photos / "more-notes.txt").write_text("still not an image")
    dry = smk(project, "-n", env=env())
    assert "rule train:" in dry.stdout and "rule curate:" not in dry.stdout, dry.stdout
    # A curate setting, the crop size and a new photo each do (each edit is undone after its dry run).
    params = yaml.safe_load((project / "params.yaml").read_text())
    edits = [
        (lambda: _edit_params(project, "curate", "max_blur", 0.5),
         lambda: _edit_params(project, "curate", "max_blur", params["curate"]["max_blur"])),
        (lambda: _edit_params(project, "model", "resolution", 128),
         lambda: _edit_params(project, "model", "resolution", params["model"]["resolution"])),
        (lambda: (photos / "b.png").write_bytes(b"png"), lambda: (photos / "b.png").unlink()),
    ]
    for edit, undo in edits:
        edit()
        assert "rule curate:" in smk(project, "-n", env=env()).stdout
        undo()
    # A rerun keeps the cache: Snakemake deletes declared outputs only.
    (photos / "b.png").write_bytes(b"png")
    smk(project, env=env())
    assert [c["cache"] for c in calls("curate")][-1] == ["entry-0", "entry-1"]


def test_dvc_repro_keeps_the_curate_cache(project, stub_env):
    env, calls = stub_env
    dvc(project, "init", "--no-scm", "-q")
    dvc(project, "repro", env=env())
    assert calls("curate")[-1]["args"] == ["curate", "--params", "params.yaml", "--out", "results/curate"]
    _edit_params(project, "model", "path", _other_model_folder(project))
    status = dvc(project, "status", env=env()).stdout
    assert re.search(r"^train:", status, re.M) and not re.search(r"^curate:", status, re.M), status
    _edit_params(project, "curate", "max_blur", 0.5)
    assert re.search(r"^curate:", dvc(project, "status", env=env()).stdout, re.M)
    dvc(project, "repro", env=env())
    # PortraitBench's prompts are a stage of their own: editing them leaves precompute, and so train, as is.
    _edit_params(project, "bench", "subset", "full")
    status = dvc(project, "status", env=env()).stdout
    assert re.search(r"^bench_embeddings:", status, re.M), status
    assert not re.search(r"^(precompute|train):", status, re.M), status
    assert calls("curate")[-1]["cache"] == ["entry-0", "entry-1"]
    assert (project / "results" / "curate" / "images" / "0123456789abcdef.png").exists()



def _jobs(dry_run_stdout: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):$", dry_run_stdout, re.M))


def test_second_run_does_nothing_and_a_training_param_reruns_train_and_bench_only(project, stub_env):
    env, calls = stub_env
    smk(project, env=env())
    assert (project / "results" / "bench" / "report.html").exists()
    again = smk(project, env=env())
    assert "Nothing to be done" in again.stdout + again.stderr
    _edit_params(project, "train", "lr", 0.5)
    assert _jobs(smk(project, "-n", env=env()).stdout) == {"train", "bench", "all"}
    _edit_params(project, "bench", "seeds", [0, 1, 2])
    smk(project, env=env())
    assert calls("bench")[-1]["args"] == [
        "bench", "--params", "params.yaml", "--out", "results/bench", "--batch-size", "8"]
    assert "Nothing to be done" in smk(project, "-n", env=env()).stdout
    # The bench's own settings rerun only the bench.
    _edit_params(project, "bench", "num_steps", 5)
    assert _jobs(smk(project, "-n", env=env()).stdout) == {"bench", "all"}


def test_a_bench_prompt_param_reruns_the_bench_side_only(project, stub_env):
    env, calls = stub_env
    smk(project, env=env())
    command = ["precompute", "--params", "params.yaml", "--out", "results/precompute"]
    assert sorted(c["args"] for c in calls("precompute")) == [command, command + ["--bench-only"]]  # any order
    # The bench's prompts are not in any file training reads: editing them reruns their job and the bench.
    _edit_params(project, "bench", "subset", "full")
    assert _jobs(smk(project, "-n", env=env()).stdout) == {"bench_embeddings", "bench", "all"}
    smk(project, env=env())
    assert calls("precompute")[-1]["args"][-1] == "--bench-only" and len(calls("precompute")) == 3
    assert len(calls("train")) == 1
    # Without bench.prompt_embeddings the bench encodes the prompts itself: the file is no input then.
    _edit_params(project, "bench", "prompt_embeddings", "")
    (project / "results" / "precompute" / "bench_prompt_embeddings.safetensors").unlink()
    assert _jobs(smk(project, "-n", env=env()).stdout) == {"bench", "all"}


def test_dvc_repro_twice_is_a_no_op_and_experiments_set_params(project, stub_env):
    env, calls = stub_env
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "repro", env=env())
    assert {c["args"][0] for c in calls("bench")} == {"bench"}
    n_calls = len(calls("train")) + len(calls("bench"))
    assert "Stage 'bench' didn't change, skipping" in dvc(project, "repro", env=env()).stdout
    assert len(calls("train")) + len(calls("bench")) == n_calls
    # `dvc exp run -S` edits params.yaml in a workspace experiment and reruns the stages that read it.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=project, check=True)
    dvc(project, "exp", "run", "-S", "train.lr=0.01", "--name", "lr001", env=env())
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["lr"] == 0.01
    assert len(calls("train")) == 2 and len(calls("curate")) == 1
    shown = dvc(project, "exp", "show", "--csv", env=env()).stdout
    assert "lr001" in shown and "0.01" in shown
    # `dvc metrics diff` shows the bench's deltas between the experiment and the committed workspace.
    diff = json.loads(dvc(project, "metrics", "diff", "--json", env=env()).stdout)
    change = diff["results/bench/summary.json"]["trained.omni"]
    base_lr = yaml.safe_load(subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=project, capture_output=True,
                                            text=True, check=True).stdout)["train"]["lr"]
    assert change == {"old": base_lr, "new": 0.01, "diff": pytest.approx(0.01 - base_lr)}


def test_ablation_runs_every_variant_and_seed_through_the_stages(project):
    shutil.copy2(REPO / "ablation.yaml", project / "ablation.yaml")
    (project / "two_seeds.yaml").write_text(
        "baseline: plain\nseeds: [1, 2]\nvariants:\n  plain: {train.exemplars.per_group: 0}\n  exemplar: {}\n")
    dry = smk(project, "-n", "ablation", "--config", "ablation=two_seeds.yaml").stdout
    runs = ["plain-s1", "plain-s2", "exemplar-s1", "exemplar-s2"]
    for run in runs:
        assert f"results/ablation/{run}/train/final" in dry
        assert f"--model {run}=results/ablation/{run}/train" in dry
    assert "--baseline plain-s1" in dry
    # The stage rules' ablation twins run once per run (root results/ablation/<run>), the bench once for
    # all of them; curation is shared.
    counts = dict(re.findall(r"^(ablation\w*|curate|invert|precompute|train|bench)\s+(\d+)$", dry, re.M))
    wanted = {"ablation_params": "4", "ablation_invert": "4", "ablation_precompute": "4", "ablation_train": "4",
              "ablation_bench": "1", "curate": "1", "ablation": "1"}
    assert {k: counts.get(k) for k in wanted} == wanted
    for run in runs:
        assert (f"portraitgen launch-train --params results/ablation/{run}/params.yaml"
                f" --out results/ablation/{run}/train ") in dry


def test_jobs_list_the_package_as_one_stamp(project):
    """A job's inputs name the package once: its content stamp, not every source file."""
    out = smk(project, "-n", "--printshellcmds").stdout
    curate = out[out.index("rule curate:"):].split("\n\n")[0]
    inputs = next(ln for ln in curate.splitlines() if ln.strip().startswith("input:"))
    assert PACKAGE_STAMP in inputs and "portraitgen/" not in inputs.replace(PACKAGE_STAMP, "")
    from portraitgen.package_stamp import package_digest

    assert (project / PACKAGE_STAMP).read_text().strip() == package_digest(project / "portraitgen")


def _planned_outputs(dry_run_stdout: str) -> set[str]:
    return {f.strip() for line in dry_run_stdout.splitlines() if line.strip().startswith("output:")
            for f in line.strip().removeprefix("output:").split(", ")}


def test_named_runs_write_side_by_side_and_the_default_run_is_unchanged(project, stub_env):
    """`--config run=NAME`: every stage under results/runs/NAME, with params.yaml's paths into stage folders
    moved there; without it, results/<stage>/ as ever."""
    default = _planned_outputs(smk(project, "-n").stdout)
    assert "results/train/final" in default and not any(p.startswith("results/runs/") for p in default)
    for name in ("a", "b"):
        planned = _planned_outputs(smk(project, "-n", "--config", f"run={name}").stdout)
        assert {p.replace(f"results/runs/{name}/", "results/", 1) for p in planned} == default, name
        run_params = yaml.safe_load((project / f"results/runs/{name}/params.yaml").read_text())
        assert run_params["train"]["exemplars"]["index"] == f"results/runs/{name}/invert/index.parquet"
        assert run_params["bench"]["models"]["trained"] == f"results/runs/{name}/train"
    # A real run of each (the stub writes the declared outputs): side by side, nothing under results/<stage>.
    env, calls = stub_env
    for name in ("a", "b"):
        smk(project, "--config", f"run={name}", env=env())
        assert (project / f"results/runs/{name}/train/final/model.safetensors").exists()
        assert calls()[-1]["args"][:5] == ["launch-train", "--params", f"results/runs/{name}/params.yaml",
                                           "--out", f"results/runs/{name}/train"]
    assert not (project / "results" / "train").exists()
    assert "Nothing to be done" in smk(project, "-n", "--config", "run=a", env=env()).stdout
    # Editing a training param rewrites the run's params file, yet reruns only what reads the param.
    _edit_params(project, "train", "lr", 0.5)
    assert _jobs(smk(project, "-n", "--config", "run=a", env=env()).stdout) == {"train", "bench", "all"}
    bad = smk(project, "-n", "--config", "run=../x", check=False)
    assert bad.returncode != 0 and "run name '../x'" in bad.stdout + bad.stderr
    both = smk(project, "-n", "ablation", "--config", "run=a", check=False)  # the ablation shares results/curate
    assert both.returncode != 0 and "the ablation runs without `--config run=a`" in both.stdout + both.stderr


def test_dvc_checkout_and_exp_apply_restore_a_checksum_with_its_file(project, stub_env):
    """A `.sha256` sidecar is a DVC output beside its file: going back to another version of the manifest
    brings its checksum too, so its readers (portraitgen/integrity.py) never call a good file corrupt."""
    from portraitgen.integrity import verify_file

    env, _ = stub_env
    manifest = project / "results" / "curate" / "manifest.parquet"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "repro", env=env())  # every stage: `dvc checkout` and `exp apply` restore every output
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=project, check=True)
    base = manifest.read_text()
    dvc(project, "exp", "run", "-S", "curate.max_blur=0.5", "--name", "blur05", env=env())
    assert manifest.read_text() == "manifest of max_blur=0.5" != base
    subprocess.run(["git", "checkout", "-q", "HEAD", "--", "params.yaml", "dvc.lock"], cwd=project, check=True)
    dvc(project, "checkout", env=env())  # the committed version: file and checksum
    assert manifest.read_text() == base
    verify_file(manifest, "test")
    dvc(project, "exp", "apply", "blur05", env=env())  # the experiment's version: file and checksum
    assert manifest.read_text() == "manifest of max_blur=0.5"
    verify_file(manifest, "test")

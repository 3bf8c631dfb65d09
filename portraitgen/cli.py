"""The ``portraitgen`` command: one sub-command per pipeline stage.

    portraitgen curate   --params params.yaml --out results/curate
    portraitgen train    --params params.yaml --out results/train
    portraitgen bench    --params params.yaml --out results/bench
    portraitgen generate --model results/train --prompt "a portrait photo of a woman" --out results/generate
    portraitgen train-detector --real results/curate/manifest.parquet --generated DIR --out results/detector

Several processes: ``accelerate launch --num_processes N -m portraitgen train ...``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("portraitgen")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_params
    from .hardware import hardware_from_args
    from .training import GRPOTrainer

    params = load_params(args.params)
    trainer = GRPOTrainer(params, args.out, hardware_from_args(args))
    summary = trainer.run()
    if trainer.is_main:
        log.info("training done: reward %.4f -> %.4f over %d iterations; weights in %s",
                 summary.get("reward_first", float("nan")), summary.get("reward_last", float("nan")),
                 summary.get("iterations", 0), summary.get("exported"))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .config import load_params
    from .generate import run_generate

    params = load_params(args.params) if args.params else None
    resolution = args.resolution or (params.model.resolution if params else 64)
    steps = args.steps or (params.sample.eval_num_steps if params else 20)
    guidance = args.guidance_scale if args.guidance_scale is not None else (
        params.sample.guidance_scale if params else 4.5)
    family = args.family or (params.model.family if params else None)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
    if not prompts:
        raise SystemExit("portraitgen generate: give at least one --prompt or --prompts-file")
    paths = run_generate(args.model, prompts, Path(args.out), family=family, resolution=resolution,
                         num_steps=steps, guidance_scale=guidance, seed=args.seed, num_images=args.num_images)
    for p in paths:
        print(p)
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from .config import load_params
    from .curate import run_curate

    params = load_params(args.params)
    run_curate(params, args.out, part=args.part, num_parts=args.num_parts, merge_only=args.merge_only,
               workers=args.workers)
    return 0


def cmd_invert(args: argparse.Namespace) -> int:
    from .config import load_params
    from .invert import run_invert

    params = load_params(args.params)
    summary = run_invert(params, args.out, part=args.part, num_parts=args.num_parts, merge_only=args.merge_only,
                         batch_size=args.batch_size)
    log.info("invert: %s", {k: v for k, v in summary.items() if not isinstance(v, list)})
    return 0


def cmd_train_detector(args: argparse.Namespace) -> int:
    import json

    from .rewards.detector import DetectorConfig, train_detector_from_sources

    cfg = DetectorConfig(size=args.size, crop=args.crop, width=args.width, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction, seed=args.seed)
    report = train_detector_from_sources(args.real, args.generated, args.out, cfg, max_images=args.max_images)
    summary = {k: report[k] for k in ("n_real", "n_generated", "n_val", "val_accuracy", "val_auc", "faces_found")}
    print(json.dumps(summary))
    log.info("detector written to %s (report.json has the held-out accuracy/AUC)", args.out)
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from .config import load_params
    from .precompute import PrecomputeError, run_precompute

    try:
        summary = run_precompute(load_params(args.params), args.out, part=args.part, num_parts=args.num_parts,
                                 merge_only=args.merge_only, bench_only=args.bench_only)
    except PrecomputeError as exc:
        print(f"portraitgen precompute: error: {exc}", file=sys.stderr)
        return 2
    log.info("precompute: %s", summary)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.run import parse_model_args, run_bench
    from .bench.suite import BenchError
    from .config import load_params

    try:
        models = parse_model_args(args.model) if args.model else None
        summary = run_bench(load_params(args.params), args.out, models=models, baseline=args.baseline,
                            part=args.part, num_parts=args.num_parts, merge_only=args.merge_only,
                            batch_size=args.batch_size, params_path=args.params)
    except BenchError as exc:
        print(f"portraitgen bench: error: {exc}", file=sys.stderr)
        return 2
    for line in summary.get("verdicts", []):
        print(line)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .schema import check_schema_file, schema_text

    if args.check:
        if check_schema_file(args.check):
            return 0
        print(f"{args.check} is stale or missing: regenerate it with "
              f"`portraitgen schema --write {args.check}`", file=sys.stderr)
        return 1
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(schema_text())
        return 0
    print(schema_text(), end="")
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    from .config import load_params
    from .stages import dvc_yaml_text

    text = dvc_yaml_text(load_params(args.params))
    if args.check:
        path = Path(args.file)
        if path.is_file() and path.read_text() == text:
            return 0
        print(f"{path} is stale or missing: regenerate it from portraitgen/stages.py and {args.params} with "
              f"`portraitgen dvc-yaml --write`", file=sys.stderr)
        return 1
    if args.write:
        from .io import atomic_write_text

        atomic_write_text(Path(args.file), text)
        return 0
    print(text, end="")
    return 0


def cmd_mlflow_parent(args: argparse.Namespace) -> int:
    from .pipeline_run import end_parent_run, main_start

    if args.action == "start":
        return main_start(args.params, args.launcher, args.command_line, args.run_name)
    if not args.run_id:
        raise SystemExit("portraitgen mlflow-parent end: --run-id is required")
    end_parent_run(args.params, args.run_id, args.status)
    return 0


def cmd_tracked(args: argparse.Namespace) -> int:
    from .params_check import check_command
    from .pipeline_run import run_tracked

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    problems = check_command(args.params, command)  # `dvc repro` / `dvc exp run -S ...`: before DVC starts
    if problems:
        print(f"portraitgen tracked: {args.params} has {len(problems)} problem(s); nothing was run:\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 2
    return run_tracked(args.params, command, launcher=args.launcher)


def cmd_check(args: argparse.Namespace) -> int:
    from .params_check import check_file

    problems = check_file(args.params)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{args.params}: no problems found")
    return 2 if problems else 0


def cmd_kept_outputs(args: argparse.Namespace) -> int:
    from . import kept_outputs

    state = Path(args.state)
    if args.action == "save":
        kept = kept_outputs.save(args.outputs, state)
        print(f"kept {len(kept.kept)} output(s) in {state}" + (f" ({len(kept.copied)} copied: no hard links)"
                                                                 if kept.copied else ""))
    elif args.action == "restore":
        restored = kept_outputs.restore(args.outputs or None, state)
        for out in restored:
            print(f"restored {out} (the last good output, with its provenance)")
        if not restored:
            print(f"nothing to restore from {state}")
    elif args.action == "drop":
        kept_outputs.drop(args.outputs or None, state)
    else:
        for out in kept_outputs.listed(state):
            print(out)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    import json

    from .config import load_params
    from .pretrain.stage import PretrainError, run_pretrain

    _torch_threads()
    try:
        metrics = run_pretrain(load_params(args.params), args.out)
    except PretrainError as exc:
        print(f"portraitgen pretrain: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: metrics.get(k) for k in ("face_rate_samples", "face_rate_real", "artifact_rate_samples",
                                                  "artifact_rate_real_held_out", "train_seconds")}))
    return 0


def _torch_threads() -> None:
    """One torch thread per process unless OMP_NUM_THREADS says otherwise: on a shared CPU two threads
    were 5-13x slower than one (processes, not threads, are the unit of parallel work here)."""
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))


def cmd_ablation(args: argparse.Namespace) -> int:
    from .ablation import load_ablation, run_dvc, write_run_params

    ablation = load_ablation(args.variants)
    if args.action == "list":
        print("\n".join(ablation.runs))
        return 0
    if args.action == "params":
        if not (args.run and args.out):
            raise SystemExit("portraitgen ablation params: --run and --out are required")
        write_run_params(args.params, args.variants, args.run, args.out)
        return 0
    if args.action == "report":
        from .ablation_report import report_cli

        return report_cli(args)
    return run_dvc(ablation, execute=args.execute)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default, unless the text already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default  # identity, not ==: a default of 0 is shown, a switch's False is not
        if (not action.option_strings or "default" in text.lower() or d is None or d is False or d == [] or d == ""
                or d is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .policies import FAMILY_NAMES  # the registry (cheap: no model code is imported)
    from .stage import add_part_args  # --part/--num-parts/--merge-only, the same for every scattered stage

    parser = argparse.ArgumentParser(prog="portraitgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="GRPO training (runs under `accelerate launch` for several processes)")
    tr.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    tr.add_argument("--out", default="results/train",
                    help="output folder (checkpoints/, final/, metrics.json); a run resumes from its checkpoints")
    from .hardware import add_hardware_arguments  # light: no torch

    add_hardware_arguments(tr.add_argument_group("hardware (never changes what is computed; portraitgen/hardware.py)"))
    tr.set_defaults(func=cmd_train)

    from .launch import add_launch_arguments, cmd_launch_train  # light: no torch

    lt = sub.add_parser("launch-train", help="`portraitgen train` on every GPU of the allocation "
                                             "(accelerate launch; docs/cluster.md)")
    add_launch_arguments(lt)
    lt.set_defaults(func=cmd_launch_train)

    cu = sub.add_parser("curate", help="real portraits -> face-centred crops, manifest.parquet, rejections, report")
    cu.add_argument("--params", default="params.yaml", help="params file; its sections configure the stage (docs/workflow.md)")
    cu.add_argument("--out", default="results/curate",
                    help="output folder (manifest.parquet, images/, rejected.parquet, metrics.json, report.html)")
    add_part_args(cu, part="analyse only this part (0-based) of --num-parts and write parts/part-I-of-N.jsonl; "
                            "no merge", num_parts="split the files into this many parts",
                   merge="only read the --num-parts part files and write outputs")
    cu.add_argument("--workers", type=int, default=None,
                    help="analysis processes (hardware; default: all CPUs). Env: PORTRAITGEN_WORKERS")
    cu.set_defaults(func=cmd_curate)

    iv = sub.add_parser("invert", help="invert curated portraits into trajectory shards (+ index and report)")
    iv.add_argument("--params", default="params.yaml", help="params file; its sections configure the stage (docs/workflow.md)")
    iv.add_argument("--out", default="results/invert", help="output folder (shards/, index.parquet, report.html)")
    add_part_args(iv, part="run only this part (0-based) of --num-parts; no merge",
                   num_parts="split the shards into this many parts",
                   merge="only verify the shards and write the index")
    iv.add_argument("--batch-size", type=int, default=int(os.environ.get("PORTRAITGEN_INVERT_BATCH", 4)),
                    help="images per forward pass (hardware). Env: PORTRAITGEN_INVERT_BATCH")
    iv.set_defaults(func=cmd_invert)

    pc = sub.add_parser("precompute", help="prompt-embedding cache, AI-Portrait detector and exemplar rewards "
                                           "(computed once)")
    pc.add_argument("--params", default="params.yaml", help="params file; its sections configure the stage (docs/workflow.md)")
    pc.add_argument("--out", default="results/precompute",
                    help="output folder (prompt_embeddings.safetensors, exemplar_rewards.parquet, detector/, cache/; "
                         "with --bench-only bench_prompt_embeddings.safetensors)")
    add_part_args(pc, part="score the exemplar rewards of only this part (0-based) of --num-parts and write "
                            "parts/part-I-of-N.parquet; no embeddings, detector or merge",
                   num_parts="split the exemplars into this many parts",
                   merge="gather the --num-parts part files, then embed prompts, train the detector and "
                              "write the outputs")
    pc.add_argument("--bench-only", action="store_true",
                    help="only embed PortraitBench's prompts (bench.suite, bench.subset) and the empty prompt into "
                         "bench_prompt_embeddings.safetensors (read with bench.prompt_embeddings); nothing else is "
                         "written. Without it, that file is not written")
    pc.set_defaults(func=cmd_precompute)

    be = sub.add_parser("bench", help="PortraitBench: models side by side on the portrait prompt suite")
    be.add_argument("--params", default="params.yaml", help="params file; its sections configure the stage (docs/workflow.md)")
    be.add_argument("--out", default="results/bench",
                    help="output folder (images/, scores.parquet, comparisons.parquet, metrics.json, report.html)")
    be.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                    help="a model to bench (repeatable; replaces bench.models): base=base, grpo=results/train, ...")
    be.add_argument("--baseline", help="the label the others are compared with (default: bench.baseline)")
    add_part_args(be, part="sample and score only this prompt shard (0-based) of --num-parts and write "
                            "parts/part-I-of-N.parquet; no merge", num_parts="split the prompts into this many parts",
                   merge="only read the --num-parts part files, then compute metrics and comparisons and write outputs")
    be.add_argument("--batch-size", type=int, default=int(os.environ.get("PORTRAITGEN_BENCH_BATCH", 8)),
                    help="images per forward pass, rounded down to whole prompts (hardware; the part jobs of one "
                         "bench must use the same value). Env: PORTRAITGEN_BENCH_BATCH")
    be.set_defaults(func=cmd_bench)

    pt = sub.add_parser("pretrain", help="pretrain the toy base model on real faces (with the planted artifact) "
                                         "and train the planted-artifact detector (docs/pretrain.md)")
    pt.add_argument("--params", default="params.yaml", help="params file; its `pretrain` and `model` sections "
                                                            "configure the stage")
    pt.add_argument("--out", default="results/pretrain",
                    help="output folder (model/ = a diffusers folder for model.path, artifact_detector/, "
                         "metrics.json, samples.png, loss.csv); reused while its inputs and settings are unchanged")
    pt.set_defaults(func=cmd_pretrain)

    ge = sub.add_parser("generate", help="make images from a base model, an exported model or a training run")
    ge.add_argument("--model", required=True,
                    help="training output folder, exported final/ folder, diffusers folder, or builtin:tiny")
    ge.add_argument("--family", choices=FAMILY_NAMES, help="needed for plain diffusers folders")
    ge.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ge.add_argument("--prompts-file", help="a text file with one prompt per line")
    ge.add_argument("--out", default="results/generate", help="folder for the PNG files")
    ge.add_argument("--params", help="take resolution/steps/guidance/family defaults from this params file "
                                     "(default: none, the built-in defaults below)")
    ge.add_argument("--resolution", type=int,
                    help="image side in px (default: model.resolution of --params, else 64)")
    ge.add_argument("--steps", type=int,
                    help="sampling steps (default: sample.eval_num_steps of --params, else 20)")
    ge.add_argument("--guidance-scale", type=float,
                    help="classifier-free guidance; 1 = none (default: sample.guidance_scale of --params, else 4.5)")
    ge.add_argument("--seed", type=int, default=0, help="noise seed; image i of prompt p starts from noise seeded by (seed, p, i), so a rerun gives the same images")
    ge.add_argument("--num-images", type=int, default=1, help="images per prompt")
    ge.set_defaults(func=cmd_generate)

    td = sub.add_parser("train-detector", help="train the AI-Portrait real-vs-generated face classifier")
    td.add_argument("--real", required=True, help="folder of real portraits, or a manifest with an image_path column")
    td.add_argument("--generated", required=True, help="folder of images generated by the base model")
    td.add_argument("--out", required=True, help="output folder (detector.safetensors, detector.json, report.json)")
    td.add_argument("--crop", choices=["face", "center", "none"], default="face",
                    help="classifier input: the detected face (centre square if none), a centre square, or the image")
    td.add_argument("--size", type=int, default=64, help="crop side in px")
    td.add_argument("--width", type=int, default=32, help="channels of the first conv block")
    td.add_argument("--epochs", type=int, default=30, help="passes over the training images")
    td.add_argument("--batch-size", type=int, default=32, help="images per optimiser step")
    td.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    td.add_argument("--val-fraction", type=float, default=0.25, help="held out per class for the accuracy/AUC report")
    td.add_argument("--seed", type=int, default=0, help="seeds the split and the initial weights")
    td.add_argument("--max-images", type=int, default=0, help="use at most this many images per class (0: all)")
    td.set_defaults(func=cmd_train_detector)

    sc = sub.add_parser("schema", help="print, write or check the JSON schema of params.yaml (from config.py)")
    sc.add_argument("--write", metavar="FILE", help="write the schema to FILE")
    sc.add_argument("--check", metavar="FILE", help="exit 1 unless FILE holds the current schema")
    sc.set_defaults(func=cmd_schema)

    dy = sub.add_parser("dvc-yaml", help="print, write or check dvc.yaml, generated from the stage table "
                                         "(portraitgen/stages.py) and params.yaml")
    dy.add_argument("--params", default="params.yaml", help="the params whose paths give the stages' deps")
    dy.add_argument("--file", default="dvc.yaml", help="the dvc.yaml to write or check (default: dvc.yaml)")
    mode = dy.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the file")
    mode.add_argument("--check", action="store_true", help="exit 1 unless the file is current")
    dy.set_defaults(func=cmd_dvc_yaml)

    mp = sub.add_parser("mlflow-parent", help="start/end the MLflow parent run of a pipeline invocation")
    mp.add_argument("action", choices=["start", "end"])
    mp.add_argument("--params", default="params.yaml", help="its `tracking` section says where the run goes")
    mp.add_argument("--launcher", default="snakemake", help="start: what runs the pipeline (tag and run name)")
    mp.add_argument("--command-line", default="", help="start: the invoking command, stored as a tag")
    mp.add_argument("--run-name", default="", help="start: the named run (`snakemake --config run=NAME`): the "
                                                   "parent's name and its portraitgen.run tag")
    mp.add_argument("--run-id", help="end: the parent run's id")
    mp.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"],
                    help="end: the parent run's final status")
    mp.set_defaults(func=cmd_mlflow_parent)

    ko = sub.add_parser("kept-outputs", help="the previous good outputs a Snakemake run keeps until their "
                                             "replacements exist (portraitgen/kept_outputs.py)")
    ko.add_argument("action", choices=["list", "save", "restore", "drop"],
                    help="list the kept outputs; save OUTPUTS; restore the missing ones (the Snakefile's "
                         "onerror does it; by hand after a killed snakemake); drop those that exist again")
    ko.add_argument("outputs", nargs="*", help="the outputs (paths as Snakemake declares them) to save, or to "
                                               "restore/drop (default: every kept one)")
    ko.add_argument("--state", default=".snakemake/kept-outputs",
                    help="where kept copies live (default: .snakemake/kept-outputs)")
    ko.set_defaults(func=cmd_kept_outputs)

    ck = sub.add_parser("check", help="every check a pipeline makes before its first job: one line per problem "
                                      "(portraitgen/params_check.py); exit 2 when there is one")
    ck.add_argument("--params", default="params.yaml", help="the params file to check")
    ck.set_defaults(func=cmd_check)

    tk = sub.add_parser("tracked", help="run a command (e.g. `dvc repro`) under one MLflow parent run",
                        description="portraitgen tracked -- dvc repro: every stage run by the command "
                                    "becomes a child of one parent run; exits with the command's status.")
    tk.add_argument("--params", default="params.yaml", help="its `tracking` section says where the parent run goes")
    tk.add_argument("--launcher", help="name of the launcher (default: the command's name)")
    tk.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    tk.set_defaults(func=cmd_tracked)

    ab = sub.add_parser("ablation", help="variants of params.yaml trained and benchmarked side by side",
                        description="list: the runs (variant x seed); params: write one run's params file; "
                                    "dvc: print (with --execute: queue and run) one DVC experiment per run; "
                                    "report: variants pooled over seeds, intervals, curves (portraitgen/ablation_report.py)")
    ab.add_argument("action", choices=["list", "params", "dvc", "report"])
    ab.add_argument("--variants", default="ablation.yaml", help="the ablation file (default: ablation.yaml)")
    ab.add_argument("--params", default="params.yaml", help="the base params file")
    ab.add_argument("--run", help="params: the run's name, <variant>-s<seed>")
    ab.add_argument("--out", help="params: where to write the run's params file")
    ab.add_argument("--execute", action="store_true", help="dvc: queue the experiments and run the queue")
    ab.add_argument("--root", default="results/ablation",
                    help="report: the folder holding the runs (<run>/train) and their bench (bench/)")
    ab.add_argument("--against", action="append", default=[],
                    help="report: also compare every variant with this one (e.g. the supervised control); repeatable")
    ab.add_argument("--detector", default="",
                    help="report: the planted-artifact detector folder; '' = the one portraitgen pretrain wrote beside "
                         "model.path, if any")
    ab.set_defaults(func=cmd_ablation)

    # Handled in main() before the stages' imports; listed here for `portraitgen --help`.
    sub.add_parser("progress", help="console progress of a stage's output, which it copies to a log file "
                                    "(used by the Snakemake rules; portraitgen/progress.py)", add_help=False)
    from .serving import add_cli as add_reward_server_cli

    add_reward_server_cli(sub)  # `portraitgen reward-server` (portraitgen/serving)
    for verb in sub.choices.values():  # every verb's --help shows the flags' defaults
        verb.formatter_class = HelpFormatter
    return parser


# Verbs that take no output lock: ablation's --out is a params file; launch-train starts `portraitgen train`,
# which takes the lock of the same --out itself.
_OUT_IS_NOT_A_FOLDER = ("ablation", "launch-train")


def _output_lock(args: argparse.Namespace):
    """One writer per output folder (portraitgen/locking.py): every verb writing an --out folder holds its
    lock (a scattered part job, the lock of its part) for the whole command."""
    import contextlib

    from .locking import output_lock

    out = getattr(args, "out", None)
    if not out or args.command in _OUT_IS_NOT_A_FOLDER:
        return contextlib.nullcontext()
    return output_lock(out, part=getattr(args, "part", None), num_parts=getattr(args, "num_parts", 1) or 1,
                       role="bench-only" if getattr(args, "bench_only", False) else "")


def _check_tracking(args: argparse.Namespace) -> None:
    """A stage that writes an --out folder from --params finds out first whether its tracking server answers
    (portraitgen/tracking.py: one short probe; on_unreachable decides), never after its work."""
    params = getattr(args, "params", None)
    if params and getattr(args, "out", None) and args.command != "ablation" and Path(params).is_file():
        from .tracking import check_before_start

        check_before_start(params)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["progress"]:  # a filter in every job's pipe: started without the stages' imports
        from .progress import main as progress_main

        return progress_main(argv[1:])
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .ablation import AblationError
    from .checkpointing import CheckpointError
    from .config import ConfigError
    from .curate import CurateError
    from .export import ModelSpecError
    from .embeddings import EmbeddingCacheError
    from .exemplars import ExemplarError
    from .images import ImageReadError
    from .invert import InvertError
    from .shards import ShardError
    from .policies import ModelPathError
    from .prompts import PromptSourceError
    from .rewards import RewardError
    from .training import TrainingSetupError
    from .locking import OutputLockedError
    from .tracking import TrackingUnreachableError

    try:
        with _output_lock(args):
            _check_tracking(args)
            rc = args.func(args)
            if rc == 0:  # the stage's headline numbers for DVC (portraitgen/summary.py)
                from .summary import write_for_command

                write_for_command(args)
            return rc
    except (AblationError, ConfigError, CheckpointError, ModelSpecError, ModelPathError, PromptSourceError, RewardError,
            TrainingSetupError, InvertError, ShardError, CurateError, EmbeddingCacheError, ExemplarError,
            ImageReadError, OutputLockedError, TrackingUnreachableError) as exc:
        print(f"portraitgen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``portraitgen`` command: one sub-command per pipeline stage.

    portraitgen train    --params params.yaml --out results/train
    portraitgen generate --model results/train --prompt "a portrait photo of a woman" --out results/generate

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
    from .training import GRPOTrainer, Hardware

    params = load_params(args.params)
    trainer = GRPOTrainer(params, args.out, Hardware(args.micro_batch_size, args.mixed_precision))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portraitgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="GRPO training (runs under `accelerate launch` for several processes)")
    tr.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    tr.add_argument("--out", default="results/train", help="output folder (checkpoints/, final/, metrics.json); a run resumes from its checkpoints")
    tr.add_argument("--micro-batch-size", type=int, default=int(os.environ.get("PORTRAITGEN_MICRO_BATCH", 0)),
                    help="samples per forward pass per process (hardware; 0 = auto). Env: PORTRAITGEN_MICRO_BATCH")
    tr.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                    default=os.environ.get("PORTRAITGEN_MIXED_PRECISION", "no"),
                    help="transformer autocast (hardware). Env: PORTRAITGEN_MIXED_PRECISION")
    tr.set_defaults(func=cmd_train)

    ge = sub.add_parser("generate", help="make images from a base model, an exported model or a training run")
    ge.add_argument("--model", required=True,
                    help="training output folder, exported final/ folder, diffusers folder, or builtin:tiny")
    ge.add_argument("--family", choices=["sd3", "flux", "zimage"], help="needed for plain diffusers folders")
    ge.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ge.add_argument("--prompts-file", help="a text file with one prompt per line")
    ge.add_argument("--out", default="results/generate", help="folder for the PNG files")
    ge.add_argument("--params", help="take resolution/steps/guidance defaults from this params file")
    ge.add_argument("--resolution", type=int)
    ge.add_argument("--steps", type=int)
    ge.add_argument("--guidance-scale", type=float)
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--num-images", type=int, default=1, help="images per prompt")
    ge.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .checkpointing import CheckpointError
    from .config import ConfigError
    from .export import ModelSpecError
    from .policies import ModelPathError
    from .prompts import PromptSourceError
    from .rewards import RewardError
    from .training import TrainingSetupError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ModelSpecError, ModelPathError, PromptSourceError, RewardError,
            TrainingSetupError) as exc:
        print(f"portraitgen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

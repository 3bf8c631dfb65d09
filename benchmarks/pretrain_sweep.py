"""The toy base model's face hit rate along its pretraining: where more steps or another learning rate stop paying.

    python benchmarks/pretrain_sweep.py --lr 1e-3 --lr 2e-3 --steps 2400 --at 1200,1800,2400
    python benchmarks/pretrain_sweep.py --lr 3e-3 --ema-decay 0.995      # one setting per process: run
                                                                          # two such processes on 2 cores
    python benchmarks/pretrain_sweep.py --quick                           # CI smoke run (figures mean nothing)

Each ``--lr`` is one pretraining loop, the stage's own (``pretrain.stage.build_training`` and
``pretrain.train.train`` on the settings of ``--params``, with ``--steps``, ``--lr``, ``--ema-decay``
replaced). At each step of ``--at`` the EMA weights, the ones the stage exports, are saved as a
diffusers folder and ``--samples`` samples are scored as the stage scores its own (PortraitBench's CPU
prompts, 20 Euler steps, guidance 1.5, OpenCV Haar): the face hit rate at that step. Loop seconds
exclude the scoring. Figures of docs/pretrain.md ("How the face rate got from 0.38 to 0.61") came from
this loop. One torch thread by default (``--threads``): one process per core is the fast way to run
several settings on a small machine; a run's result also depends on the thread count (the order of
floating-point sums), by about as much as the sampling error.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(common.REPO / "params.yaml"))
    ap.add_argument("--lr", type=float, action="append", help="learning rate of a loop (repeat for several)")
    ap.add_argument("--steps", type=int, default=None, help="steps of each loop (default: pretrain.steps)")
    ap.add_argument("--at", default="", help="comma-separated steps to score (default: a quarter, half, the end)")
    ap.add_argument("--ema-decay", type=float, default=None, help="default: pretrain.ema_decay")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny settings (CI)")
    args = ap.parse_args(argv)

    import torch

    from portraitgen.config import load_params, params_from_dict
    from portraitgen.pretrain.evaluate import (SAMPLE_GUIDANCE, SAMPLE_STEPS, face_hit_rate, sample_images,
                                               sample_prompts)
    from portraitgen.pretrain.faces import load_faces, split_faces
    from portraitgen.pretrain.stage import build_training
    from portraitgen.pretrain.train import train

    torch.set_num_threads(args.threads)
    if args.quick:
        params = params_from_dict({"model": {"family": "sd3", "path": "builtin:tiny", "resolution": 16},
                                   "pretrain": {"steps": 4, "batch_size": 4, "num_layers": 1, "width": 32}})
        samples = 4
    else:
        params = load_params(args.params)
        samples = args.samples
    r = params.pretrain
    steps = args.steps or r.steps
    at = sorted({int(s) for s in args.at.split(",") if s.strip()} or {max(1, steps // 4), max(1, steps // 2), steps})
    if at[-1] > steps or at[0] < 1:
        raise SystemExit(f"--at: expected steps between 1 and --steps ({steps}), got {args.at}")
    decay = args.ema_decay if args.ema_decay is not None else r.ema_decay
    rates = args.lr or [r.lr]
    res = params.model.resolution
    faces = load_faces(res)
    train_faces, _ = split_faces(faces, r.holdout, r.seed)
    prompts = sample_prompts(samples)
    rep = common.Report("pretrain_sweep", resolution=res, steps=steps, ema_decay=decay, samples=samples,
                        **common.machine("cpu"))
    for lr in rates:
        run = dataclasses.replace(params, pretrain=dataclasses.replace(r, steps=steps, lr=lr, ema_decay=decay))
        pipe, _, data, settings = build_training(run, train_faces)
        named = {n: p for n, p in pipe.transformer.named_parameters() if p.requires_grad}
        scoring = [0.0]

        def score(step: int, ema) -> None:
            if step not in at:
                return
            t0 = time.perf_counter()
            with ema.applied(named), tempfile.TemporaryDirectory() as folder:
                pipe.transformer.eval()
                pipe.save_pretrained(folder)
                images = sample_images(folder, prompts, res, r.seed)
                pipe.transformer.train()
            scoring[0] += time.perf_counter() - t0
            rep.figure(f"lr={lr:g}/step={step}/face_rate", face_hit_rate(images), "share", lr=lr, step=step,
                       loop_seconds=round(time.perf_counter() - start - scoring[0], 1))

        start = time.perf_counter()
        train(pipe.transformer, data, settings, on_step=score)
    rep.table(f"pretrain sweep: face hit rate of {samples} samples (guidance {SAMPLE_GUIDANCE}, {SAMPLE_STEPS} steps) "
              "along the loop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

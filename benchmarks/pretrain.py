"""The toy base model of ``portraitgen pretrain``: its time, whether it makes faces, and its planted artifact.

    python benchmarks/pretrain.py                        # the params.yaml defaults + a clean control
    python benchmarks/pretrain.py --samples 128 --out /tmp/bench-pretrain
    python benchmarks/pretrain.py --quick                # CI smoke run (tiny settings; figures mean nothing)

Runs the stage (``run_pretrain``, the rule's torch threads, tracking off) twice in ``--out``:

1. ``planted/``: the settings of ``--params`` (default: the artifact on 70 % of the training views);
2. ``clean/``: the same with ``pretrain.artifact.fraction: 0``, the clean control. It reuses the
   detector of run 1 (same key: the fraction does not shape the detector), so both are scored alike.

Figures: the wall time of each pretraining (the target is <= 10 minutes on 2 cores for the default;
timings carry the load average: on a shared machine they mean little without it); the OpenCV Haar face
hit rate of ``--samples`` base samples beside the rate on the real faces at the same size (target
>= 50 %); the planted-artifact detector's rate on base samples, on the clean control's samples (the
detector's floor on generated images) and on real held-out faces, and the planted model's rate above
the floor. Existing runs in ``--out`` are reused (the stage's content key): pass a fresh ``--out`` to
time a pretraining.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(common.REPO / "params.yaml"))
    ap.add_argument("--out", default=str(common.REPO / "results" / "benchmarks" / "pretrain"))
    ap.add_argument("--samples", type=int, default=64, help="base samples scored per model (>= 64 for the target)")
    ap.add_argument("--no-control", action="store_true", help="skip the clean control (no floor, no rate above it)")
    ap.add_argument("--quick", action="store_true", help="tiny settings in a temporary folder (CI)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the pretrain rule's, as Snakemake runs it on an idle machine)")
    args = ap.parse_args(argv)

    import torch

    from portraitgen.config import load_params, params_from_dict
    from portraitgen.pretrain.stage import DETECTOR_DIR, run_pretrain
    from portraitgen.stages import stage

    torch.set_num_threads(args.threads or stage("pretrain").threads)
    if args.quick:
        import tempfile

        params = params_from_dict({
            "model": {"family": "sd3", "path": "builtin:tiny", "resolution": 16}, "tracking": {"enabled": False},
            "pretrain": {"steps": 4, "batch_size": 8, "num_layers": 1, "width": 32, "eval_samples": 4,
                         "detector": {"steps": 10}}})
        out = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    else:
        params = load_params(args.params)
        params = dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, enabled=False),
                                     pretrain=dataclasses.replace(params.pretrain, eval_samples=args.samples))
        out = Path(args.out)
    r = params.pretrain
    rep = common.Report("pretrain", resolution=params.model.resolution, steps=r.steps, layers=r.num_layers,
                        width=r.width, **common.machine("cpu"))
    try:
        runs = {"planted": params}
        if not args.no_control:
            runs["clean"] = dataclasses.replace(params, pretrain=dataclasses.replace(
                r, artifact=dataclasses.replace(r.artifact, fraction=0.0)))
        results = {}
        for name, p in runs.items():
            folder = out / name
            if name == "clean" and (out / "planted" / DETECTOR_DIR).is_dir() and not (folder / DETECTOR_DIR).exists():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copytree(out / "planted" / DETECTOR_DIR, folder / DETECTOR_DIR)
            metrics_file = folder / "metrics.json"
            before = metrics_file.stat().st_mtime_ns if metrics_file.is_file() else None
            t0 = time.perf_counter()
            m = run_pretrain(p, folder)
            wall = time.perf_counter() - t0
            results[name] = m
            fraction = p.pretrain.artifact.fraction
            # reused: this run found everything current (a no-op); the other figures come from the run that made it.
            rep.figure(f"{name}/stage_seconds", wall, "s", note="this run (a no-op when reused)",
                       fraction=fraction, reused=before is not None and metrics_file.stat().st_mtime_ns == before)
            rep.figure(f"{name}/train_seconds", m.get("train_seconds"), "s", note="the pretraining loop itself",
                       fraction=fraction)
            rep.figure(f"{name}/loss_first", m.get("loss_first"), "", fraction=fraction)
            rep.figure(f"{name}/loss_last", m.get("loss_last"), "", fraction=fraction)
            rep.figure(f"{name}/face_rate_samples", m.get("face_rate_samples"), "share",
                       note=f"OpenCV Haar hits on {m.get('samples')} base samples", fraction=fraction)
            rep.figure(f"{name}/artifact_rate_samples", m.get("artifact_rate_samples"), "share", fraction=fraction)
        m = results["planted"]
        rep.figure("real/face_rate", m.get("face_rate_real"), "share",
                   note=f"the real faces at {params.model.resolution} px")
        rep.figure("real/artifact_rate_held_out", m.get("artifact_rate_real_held_out"), "share",
                   note="clean held-out real faces (false positives)")
        rep.figure("real/artifact_rate_planted_views", m.get("artifact_rate_real_planted_views"), "share",
                   note="held-out real faces with the artifact planted (recall)")
        rep.figure("detector/held_out_auc", m.get("detector_held_out_auc"), "")
        if "clean" in results:
            floor = results["clean"].get("artifact_rate_samples")
            rep.figure("planted/artifact_rate_above_clean_control", m["artifact_rate_samples"] - floor, "share",
                       note="planted model's rate minus the clean control's (the detector's floor on samples)")
        rep.table(f"pretrain: {r.steps} steps at {params.model.resolution} px, artifact {r.artifact.kind} "
                  f"on {r.artifact.fraction:.0%} of the views; {args.samples if not args.quick else 4} samples per model")
    finally:
        if args.quick:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

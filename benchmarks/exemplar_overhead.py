"""What real exemplars in the groups cost: iteration time with E exemplars per group vs E = 0.

    python benchmarks/exemplar_overhead.py --config small --exemplars 1     # the CPU target
    python benchmarks/exemplar_overhead.py --quick                          # CI smoke run

Both runs use the same prompts (the captions of one exemplar index, inverted here first from synthetic
portraits), the same group size and seeds; only ``train.exemplars.per_group`` differs. An exemplar
replaces a generated sample: it needs no rollout, no decoding and no reward (it is scored once), but its
``logp_old`` costs forward passes at the steps it is trained on, its trajectory and image are loaded,
and its statistics are logged apart. Reported, from ``iteration_breakdown`` runs of each:

- ``iteration_change``: wall(E) / wall(0) - 1, the plain per-iteration cost (negative: exemplars save time);
- ``non_transformer_change``: (wall - isolated transformer time)(E) - (same)(0), as a fraction of wall(0):
  the bookkeeping exemplars add beyond the transformer work they need (target <= 5 %);
- the phases that differ (data, rollout, exemplar log-probs, reward).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import iteration_breakdown as ib  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=["tiny", "small"])
    ap.add_argument("--exemplars", type=int, default=1, help="E, exemplars per group")
    ap.add_argument("--quick", action="store_true", help="the tiny configuration, one measured iteration (CI)")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = "tiny" if args.quick else args.config
    work = Path(tempfile.mkdtemp(prefix="bench-exemplars-"))
    try:
        cfg = common.config(config, args.quick)
        index = ib.exemplar_index(cfg, common.model_path(cfg, args.quick), work, args.quick)
        results = {}
        for e in (0, args.exemplars):
            run_args = ib.parser().parse_args(["--config", config, "--exemplars", str(e), "--exemplar-prompts",
                                               "--index", str(index), "--no-flops"]
                                              + (["--quick"] if args.quick else [])
                                              + (["--iterations", str(args.iterations)] if args.iterations else []))
            results[e] = ib.run(run_args)
        base, ex = results[0], results[args.exemplars]
        rep = common.Report("exemplar_overhead", config=config + ("-quick" if args.quick else ""),
                            exemplars=args.exemplars, group_size=cfg.group_size, **common.machine("cpu"))
        rep.figure("wall_e0", base["wall_s"], "s")
        rep.figure("wall_e", ex["wall_s"], "s")
        rep.figure("iteration_change", ex["wall_s"] / base["wall_s"] - 1, "fraction")
        rep.figure("isolated_transformer_e0", base["isolated_s"], "s")
        rep.figure("isolated_transformer_e", ex["isolated_s"], "s")
        extra = (ex["wall_s"] - ex["isolated_s"]) - (base["wall_s"] - base["isolated_s"])
        rep.figure("non_transformer_change", extra / base["wall_s"], "fraction",
                   note="(wall - transformer)(E) - (same)(0), over wall(0)")
        rep.figure("overhead_ratio_e0", base["overhead_ratio"], "x")
        rep.figure("overhead_ratio_e", ex["overhead_ratio"], "x")
        for ph in ("data", "rollout", "exemplar_logp", "reward", "log"):
            rep.figure(f"phase_change/{ph}", ex["phases"].get(ph, 0.0) - base["phases"].get(ph, 0.0), "s")
        rep.table(f"exemplar overhead: E={args.exemplars} vs E=0, group size {cfg.group_size}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inversion throughput and diagnostics of the three modes, side by side, on the tiny model.

    python benchmarks/inversion_modes.py [--images 16] [--params params.yaml] [--quick]

Prints one JSON line per mode and a table: images/s (inversion alone, and with diagnostics; the model
load is reported apart as load_s), reconstruction PSNR/SSIM of the ODE regeneration (and the VAE
ceiling), mean squared standardised residual against the policy's SDE mean (1 = the policy's own noise),
and the exemplar's trajectory log-prob as a z-score among generated samples of its caption. Uses
synthetic smooth colour images unless --manifest names a curated set.

The diagnostics cost 2 x num_steps transformer calls per batch (the exemplars' transition statistics
and every new caption's generated samples share one call per step; the ODE regeneration is the other),
while the bridge inversion itself calls no model at all.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (offline environment, tests/helpers on the path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--manifest", help="a curate manifest to invert instead of synthetic images")
    ap.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    ap.add_argument("--quick", action="store_true", help="4 images at 32 px, 4 steps, for CI smoke runs")
    args = ap.parse_args()

    import yaml

    from helpers import make_manifest
    from portraitgen.config import params_from_dict
    from portraitgen.invert import run_invert

    n = 4 if args.quick else args.images
    base = yaml.safe_load(Path(args.params).read_text())
    base["tracking"]["enabled"] = False
    k = 4
    if args.quick:  # the built-in tiny model: a fresh clone has no pretrained model yet
        base["model"].update(family="sd3", path="builtin:tiny")
        base["model"]["resolution"], base["sample"]["num_steps"], k = 32, 4, 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest or str(make_manifest(Path(tmp) / "curate", n=n, size=base["model"]["resolution"]))
        for mode in ("euler", "fixed_point", "bridge"):
            base["invert"] = {"manifest": manifest, "mode": mode, "shard_size": 64, "diagnostic_samples": k}
            params = params_from_dict(base)
            t0 = time.perf_counter()
            s = run_invert(params, Path(tmp) / f"out-{mode}", batch_size=args.batch_size)
            wall = time.perf_counter() - t0
            row = {"bench": "inversion_modes", "mode": mode, "images": s["exemplars"],
                   "inversion_img_per_s": round(s["inversion_images_per_second"], 2),
                   "with_diagnostics_img_per_s": round(s["images_per_second"], 2),
                   "stage_seconds": round(wall, 2), "load_s": round(s.get("load_seconds", float("nan")), 2),
                   "psnr": round(s["psnr_mean"], 2), "ssim": round(s["ssim_mean"], 4),
                   "psnr_vae_ceiling": round(s["psnr_vae_mean"], 2), "residual_ms": round(s["residual_ms_mean"], 4),
                   "logprob_z_vs_generated": round(s["traj_logprob_z_mean"], 2)}
            rows.append(row)
            print(json.dumps({**row, **common.machine("cpu")}), flush=True)
    cols = [c for c in rows[0] if c != "bench"]
    print(f"\n## inversion modes ({common.machine('cpu')})")
    print("\n" + " | ".join(f"{c:>22}" for c in cols))
    for r in rows:
        print(" | ".join(f"{str(r[c]):>22}" for c in cols))


if __name__ == "__main__":
    main()

"""Throughput of the precompute stage: prompt embeddings (text encoders) and exemplar rewards.

    python benchmarks/precompute_throughput.py --images 64                 # the tiny model's encoders
    python benchmarks/precompute_throughput.py --quick                     # CI smoke run

Builds a curated manifest of ``--images`` synthetic portraits with distinct captions, then runs
``portraitgen precompute`` (``run_precompute``) on it twice: cold (every caption encoded, every image
scored) and warm (everything reused). Reports the stage's wall times, prompts/s and images/s, and every
throughput figure the stage itself reports in its summary.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--reward", default="brightness", help="reward component(s), comma-separated")
    ap.add_argument("--quick", action="store_true", help="4 images (CI)")
    args = ap.parse_args(argv)

    from helpers import make_manifest

    from portraitgen.config import params_from_dict
    from portraitgen.precompute import run_precompute

    n = 4 if args.quick else args.images
    work = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    try:
        captions = [f"a portrait photo of person {i}, studio light" for i in range(n)]
        manifest = make_manifest(work / "curate", n=n, size=args.resolution, captions=captions)
        params = params_from_dict({
            "model": {"family": "sd3", "path": "builtin:tiny", "resolution": args.resolution},
            "prompts": {"source": "exemplars"}, "invert": {"manifest": str(manifest)},
            "reward": {"components": {r: 1.0 for r in args.reward.split(",")}},
            "tracking": {"enabled": False}})
        rep = common.Report("precompute_throughput", images=n, resolution=args.resolution, reward=args.reward,
                            **common.machine("cpu"))
        for run in ("cold", "warm"):
            t0 = time.perf_counter()
            summary = run_precompute(params, work / "precompute")
            wall = time.perf_counter() - t0
            rep.figure(f"{run}/stage_seconds", wall, "s")
            rep.figure(f"{run}/stage_images_per_second", n / wall, "img/s", note="captions encoded + images scored")
            for key, value in sorted(summary.items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                        "per_second" in key or key.endswith("seconds")):
                    rep.figure(f"{run}/{key}", float(value), "1/s" if "per_second" in key else "s")
        rep.table(f"precompute: {n} captions and images, tiny SD3 encoders, reward {args.reward}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of each reward backend, in images per second, on this machine.

    .venv/bin/python benchmarks/reward_throughput.py                         # all backends, 512 px, batch 8
    .venv/bin/python benchmarks/reward_throughput.py --resolution 256 --only omni_classic ai_portrait_classic
    .venv/bin/python benchmarks/reward_throughput.py --vlm /models/Qwen2.5-VL-3B-Instruct --detector results/detector

The images are the shipped real portraits and photos (scikit-image, matplotlib) resized to the
resolution, so the face-dependent backends do their full work. Without ``--vlm`` the VLM backends run
the tiny random Qwen2.5-VL (``builtin:tiny``): that measures the pipeline's overhead, not a real VLM.
Without ``--detector`` a detector is trained for a few seconds on toy crops first (its speed does not
depend on what it learned). Each backend is built once, warmed up on one batch, then timed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import images_at  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def toy_detector(out_dir: Path) -> str:
    from portraitgen.rewards.detector import DetectorConfig, train_detector

    rng = np.random.default_rng(0)
    real = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(16)]
    gen = [np.full((64, 64, 3), rng.integers(0, 255), dtype=np.uint8) for _ in range(16)]
    train_detector(real, gen, out_dir, DetectorConfig(epochs=2, crop="face"), crops_ready=True)
    return str(out_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="images per reward call")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per backend")
    ap.add_argument("--vlm", default="builtin:tiny", help="local VLM folder for the vlm backends")
    ap.add_argument("--vlm-image-size", type=int, default=448)
    ap.add_argument("--detector", help="a trained detector folder (default: a toy one trained here)")
    ap.add_argument("--only", nargs="*", help="benchmark only these reward names")
    args = ap.parse_args()

    from portraitgen.rewards import build_reward

    tmp = Path(tempfile.mkdtemp(prefix="reward-bench-"))
    vlm_opts = {"model_path": args.vlm, "image_size": args.vlm_image_size, "batch_size": args.batch}
    backends = {
        "brightness": {},
        "omni_classic": {},
        "ai_portrait_classic": {},
        "ai_portrait_detector": None,  # filled lazily (training the toy detector takes a few seconds)
        "omni_vlm": vlm_opts,
        "ai_portrait_vlm": vlm_opts,
    }
    names = args.only or list(backends)
    images = images_at(args.resolution, args.batch)
    prompts = ["a close up portrait photo of a person"] * args.batch
    meta = [{}] * args.batch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# reward throughput: {args.batch} images of {args.resolution}px per call, {args.repeats} calls, "
          f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"{'reward':<24} {'build s':>8} {'images/s':>10} {'ms/image':>10}")
    for name in names:
        opts = backends[name]
        if name == "ai_portrait_detector":
            opts = {"path": args.detector or toy_detector(tmp / "detector")}
        t0 = time.perf_counter()
        reward = build_reward(name, **opts)
        build = time.perf_counter() - t0
        reward(images, prompts, meta)  # warm-up (lazy imports, first-call kernels)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            scores = np.asarray(reward(images, prompts, meta))
        dt = (time.perf_counter() - t0) / (args.repeats * args.batch)
        assert scores.shape == (args.batch,) and np.isfinite(scores).all()
        print(f"{name:<24} {build:8.2f} {1.0 / dt:10.1f} {1000 * dt:10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the curate stage: images/s on a folder of N photos made from the shipped portraits.

    .venv/bin/python benchmarks/curate_throughput.py --n 400 --workers 2

The folder is built first (not timed): scikit-image's astronaut and camera, matplotlib's Grace Hopper
and the LFW faces, randomly cropped, mirrored, rescaled to a long side between --min-side and
--max-side px, brightened or darkened, and saved as JPEG, PNG or WebP, so every file is a different
image of a realistic size. Then the stage runs on it twice (tracking off): a cold run (every image
decoded, searched for faces, measured, its crop rendered) and a warm rerun (everything from the cache).
Prints the analysis rate of the cold run, the whole stage's wall time, and the warm rerun's time.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def shipped_photos() -> list[Image.Image]:
    import skimage
    from matplotlib import cbook
    from skimage import data

    base = Path(skimage.data.__file__).parent
    photos = [Image.open(base / "astronaut.png").convert("RGB"), Image.open(base / "camera.png").convert("RGB"),
              Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")]
    lfw = data.lfw_subset()[:100]
    lfw = np.clip(np.round(lfw * 255), 0, 255).astype(np.uint8) if lfw.dtype != np.uint8 else lfw
    photos += [Image.fromarray(f).convert("RGB") for f in lfw]
    return photos


def make_folder(folder: Path, n: int, min_side: int, max_side: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    photos = shipped_photos()
    total = 0
    for i in range(n):
        # Mostly the large photos (realistic sizes), one in four an LFW face.
        im = photos[int(rng.integers(0, 3))] if rng.random() < 0.75 else photos[3 + int(rng.integers(0, 100))]
        w, h = im.size
        s = rng.uniform(0.8, 1.0)
        cw, ch = max(8, int(w * s)), max(8, int(h * s))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        long_side = int(rng.integers(min_side, max_side + 1))
        k = long_side / max(im.size)
        im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.Resampling.BICUBIC)
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.8, 1.2)))
        fmt = ("JPEG", "PNG", "WEBP")[i % 3]
        buf = io.BytesIO()
        im.save(buf, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
        path = folder / f"{i:05d}.{fmt.lower().replace('jpeg', 'jpg')}"
        path.write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--min-side", type=int, default=384, help="smallest long side, px")
    ap.add_argument("--max-side", type=int, default=1024, help="largest long side, px")
    ap.add_argument("--resolution", type=int, default=512, help="model.resolution: the crop size, px")
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args(argv)

    from portraitgen.config import params_from_dict
    from portraitgen.curate import run_curate

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="curate-bench-"))
    try:
        src = work / "photos"
        shutil.rmtree(work / "out", ignore_errors=True)
        if not src.is_dir() or len(list(src.iterdir())) != args.n:
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir(parents=True)
            size = make_folder(src, args.n, args.min_side, args.max_side)
            print(f"made {args.n} images ({size / 2**20:.1f} MiB) in {src}", file=sys.stderr)
        params = params_from_dict({"model": {"resolution": args.resolution}, "tracking": {"enabled": False},
                                   "curate": {"source": str(src)}})
        t0 = time.perf_counter()
        cold = run_curate(params, work / "out", workers=args.workers)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = run_curate(params, work / "out", workers=args.workers)
        warm_s = time.perf_counter() - t0
        assert warm["processed"] == 0 and warm["cached"] == args.n
        result = {"n": args.n, "workers": args.workers, "cpus": os.cpu_count(), "resolution": args.resolution,
                  "long_side_px": [args.min_side, args.max_side], "kept": cold["kept"],
                  "rejected": {k: v for k, v in cold["rejected_by_reason"].items() if v},
                  "analysis_images_per_second": cold["images_per_second"],
                  "stage_seconds_cold": round(cold_s, 2), "stage_images_per_second_cold": round(args.n / cold_s, 2),
                  "stage_seconds_warm_rerun": round(warm_s, 2)}
        print(json.dumps(result, indent=1), file=sys.stderr)
        print(f"curate: {result['analysis_images_per_second']:.2f} images/s analysed "
              f"({args.n} images, {args.workers} workers, long side {args.min_side}-{args.max_side} px, "
              f"crops {args.resolution} px); whole stage {result['stage_images_per_second_cold']:.2f} images/s cold, "
              f"{warm_s:.1f} s warm rerun")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

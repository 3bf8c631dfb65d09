"""The README's demo picture: PortraitBench images of the base and the trained model, same prompts and noise.

    .venv/bin/python tools/demo_grid.py                      # results/bench -> docs/img/demo_base_vs_trained.png
    .venv/bin/python tools/demo_grid.py --bench results/bench --models base trained --n 12 --seed 0

One row per model (the bench's image folders), the first ``--n`` prompts of the bench (by prompt id) at noise
seed ``--seed``, each image enlarged by whole pixels (nearest neighbour: the 24 px pixels as they are).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="results/bench", help="a finished bench folder (default: results/bench)")
    ap.add_argument("--models", nargs="+", default=["base", "trained"], help="bench model labels, one row each")
    ap.add_argument("--n", type=int, default=12, help="prompts (columns)")
    ap.add_argument("--seed", type=int, default=0, help="the bench noise seed shown")
    ap.add_argument("--scale", type=int, default=4, help="whole-pixel enlargement")
    ap.add_argument("--out", default="docs/img/demo_base_vs_trained.png")
    args = ap.parse_args(argv)

    folders = [Path(args.bench) / "images" / m for m in args.models]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        print(f"demo_grid: no images for {', '.join(missing)} (run the bench first: snakemake --cores 2)",
              file=sys.stderr)
        return 2
    names = sorted(p.name for p in folders[0].glob(f"*_s{args.seed}.png"))[: args.n]
    if not names:
        print(f"demo_grid: {folders[0]} has no image of seed {args.seed}", file=sys.stderr)
        return 2
    first = Image.open(folders[0] / names[0])
    side, pad, label = first.width * args.scale, 2, 70
    sheet = Image.new("RGB", (label + len(names) * (side + pad), len(folders) * (side + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, (model, folder) in enumerate(zip(args.models, folders)):
        y = row * (side + pad)
        draw.text((4, y + side // 2 - 6), model, fill="black", font=font)
        for col, name in enumerate(names):
            with Image.open(folder / name) as im:
                tile = im.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(tile, (label + col * (side + pad), y))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"{args.out}: {len(args.models)} models x {len(names)} prompts (seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""tools/: the scripts that regenerate the README's pictures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_demo_grid_puts_each_model_in_a_row_of_enlarged_pixels(tmp_path):
    bench = tmp_path / "bench"
    for value, model in ((40, "base"), (200, "trained")):
        (bench / "images" / model).mkdir(parents=True)
        for pid in ("p1", "p2", "p3"):
            for seed in (0, 1):
                Image.fromarray(np.full((24, 24, 3), value + seed, np.uint8)).save(bench / "images" / model / f"{pid}_s{seed}.png")
    out = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "demo_grid.py"), "--bench", str(bench), "--n", "2",
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (2 * (96 + 2), 70 + 2 * (96 + 2), 3)  # 2 rows x 2 prompts of 24 px x 4
    assert (sheet[10:90, 75:160] == 40).all() and (sheet[108:190, 75:160] == 200).all()  # seed 0, per row

    missing = subprocess.run([sys.executable, str(REPO / "tools" / "demo_grid.py"), "--bench", str(tmp_path / "none")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "run the bench first" in missing.stderr

"""Curate's file walk never hangs, loops or silently drops a file (issue 15, item 7): symlinked folders
are walked once per real folder, unreadable folders, FIFOs, broken links and unsupported formats are
recorded with a reason, Snakemake's view of the source survives a bad link, workers die with their
parent, and curated images are copies."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from portraitgen.config import params_from_dict
from portraitgen.curate import analyse_file, run_curate, scan_folder

from helpers import fast_params


def _face() -> bytes:
    from skimage import data

    a = data.lfw_subset()[0]
    a = np.clip(np.round(a * 255), 0, 255).astype(np.uint8) if a.dtype != np.uint8 else a
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "face.png").write_bytes(_face())
    (src / "sub" / "other.png").write_bytes(_face()[:-1] + b"\x00")  # a different (truncated) file
    os.symlink("..", src / "sub" / "loop")  # a loop back to the source
    os.symlink("sub", src / "again")  # a second way into sub/
    os.symlink("nowhere.png", src / "broken.png")
    os.mkfifo(src / "pipe.jpg")
    Image.new("RGB", (8, 8)).save(src / "anim.gif")
    (src / "notes.txt").write_text("not an image")
    locked = src / "locked"
    locked.mkdir()
    (locked / "hidden.png").write_bytes(_face())
    locked.chmod(0)
    yield src
    locked.chmod(0o755)


def test_scan_walks_each_real_folder_once_and_records_what_it_skips(messy):
    t0 = time.monotonic()
    scan = scan_folder(messy)
    assert time.monotonic() - t0 < 5  # the FIFO is never opened
    readable = os.geteuid() == 0  # root reads any folder
    # Each real folder once, by its own path (it was walked 40 levels deep through the loop before).
    assert scan.images == ["face.png"] + (["locked/hidden.png"] if readable else []) + ["sub/other.png"]
    skipped = {rel: (reason, detail) for rel, reason, detail in scan.skipped}
    assert skipped["broken.png"] == ("not_a_file", "broken symbolic link")
    assert skipped["pipe.jpg"] == ("not_a_file", "a FIFO, not a regular file: not opened")
    assert skipped["anim.gif"][0] == "unsupported_format" and ".gif images are not read" in skipped["anim.gif"][1]
    if not readable:
        assert skipped["locked"] == ("unreadable_folder", "cannot list folder: Permission denied")
    assert "notes.txt" not in skipped and scan.others == ["notes.txt"]


def test_a_fifo_named_like_an_image_is_never_opened(messy, tmp_path):
    rec = analyse_file(str(messy / "pipe.jpg"), str(tmp_path / "cache"), {})
    assert rec["error"] == "a FIFO, not a regular file: not opened"


def test_snakemakes_view_of_the_source_survives_bad_links(messy):
    from portraitgen.stages import _expand_folder

    files = _expand_folder(str(messy))
    assert str(messy / "face.png") in files and str(messy / "sub/other.png") in files
    assert not any("loop" in f or "again" in f or "broken" in f or "pipe" in f for f in files)
    assert all(Path(f).is_file() for f in files)


def test_curate_records_skipped_files_and_writes_copies_not_links(messy, tmp_path):
    out = tmp_path / "out"
    params = params_from_dict(fast_params(**{"curate.source": str(messy), "curate.dedup_max_distance": -1}))
    metrics = run_curate(params, out, workers=1)
    rejected = pd.read_parquet(out / "rejected.parquet")
    reasons = dict(zip([os.path.relpath(p, messy) for p in rejected["source_path"]], rejected["reason"]))
    assert reasons["broken.png"] == "not_a_file" and reasons["pipe.jpg"] == "not_a_file"
    assert reasons["anim.gif"] == "unsupported_format"
    assert metrics["rejected_by_reason"]["not_a_file"] == 2 and metrics["total"] == metrics["kept"] + metrics["rejected"]
    image = next((out / "images").iterdir())
    assert image.stat().st_nlink == 1  # a copy: editing it leaves the analysis cache alone
    cached = [p for p in (out / "cache").rglob("*.png")]
    assert cached and all(not os.path.samefile(image, c) for c in cached)


WORKERS = """
import sys, time
from pathlib import Path
from portraitgen.curate import analyse_all, CropWhen
import portraitgen.curate as curate

def slow(task):
    time.sleep(600)

curate._analyse_task = slow
if __name__ == "__main__":
    analyse_all([str(i) for i in range(4)], Path(sys.argv[1]), {}, 2, CropWhen())
"""


@pytest.mark.slow
def test_workers_end_when_curate_is_killed(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(WORKERS)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache")])

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_descendants(proc.pid)) < 2:
        time.sleep(0.5)
    children = _descendants(proc.pid)
    assert len(children) >= 2, "the pool never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(c) for c in children):
        time.sleep(0.5)
    assert not [c for c in children if _alive(c)], "workers outlived the killed curate process"


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    parent = {int(a): int(b) for a, b in (line.split() for line in out.splitlines())}
    found, frontier = [], {pid}
    while frontier:
        kids = {c for c, p in parent.items() if p in frontier}
        found += sorted(kids)
        frontier = kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"

"""Console progress of a stage (portraitgen/progress.py) and the package stamp of Snakemake's job inputs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from portraitgen.package_stamp import package_digest, package_stamp
from portraitgen.progress import Progress

BIN = Path(sys.executable).parent

STAGE = textwrap.dedent("""
    import logging, sys, time
    from tqdm import tqdm
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("demo").info("starting")
    for _ in tqdm(range(40), desc="invert part 0/1", mininterval=0):
        time.sleep(0.001)
    logging.getLogger("demo").warning("3 exemplars have a low PSNR")
    sys.exit(int(sys.argv[1]))
""")


def _pipeline(tmp_path: Path, status: int) -> subprocess.CompletedProcess:
    (tmp_path / "stage.py").write_text(STAGE)
    log = tmp_path / "logs" / "invert.log"
    log.parent.mkdir(exist_ok=True)
    cmd = (f"set -euo pipefail; {sys.executable} stage.py {status} 2>&1 | "
           f"{BIN / 'portraitgen'} progress --log {log} --stage invert")
    return subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_console_gets_a_line_per_ten_percent_and_the_log_everything(tmp_path):
    proc = _pipeline(tmp_path, 0)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    bars = [ln for ln in lines if "invert part 0/1:" in ln]
    assert [ln.split(":")[1].split("%")[0].strip() for ln in bars] == [str(p) for p in range(0, 101, 10)]
    assert bars[4].startswith("[invert] invert part 0/1:  40% (16/40), elapsed ") and ", ETA " in bars[4]
    assert "ETA" not in bars[-1]
    assert "[invert] WARNING demo: 3 exemplars have a low PSNR" in lines
    assert not any("starting" in ln for ln in lines)  # INFO lines stay in the log only
    log = (tmp_path / "logs" / "invert.log").read_bytes().decode()
    assert "INFO demo: starting" in log and log.count("\r") >= 40 and "40/40" in log  # every bar update


def test_the_stage_status_is_the_jobs_status(tmp_path):
    proc = _pipeline(tmp_path, 3)
    assert proc.returncode == 3  # pipefail: the filter never hides a failure
    assert "low PSNR" in (tmp_path / "logs" / "invert.log").read_text()


def test_chunks_split_anywhere_and_a_reopened_bar_is_shown_again():
    p = Progress("bench", every=25)
    text = ("bench part 0/2:   0%|    | 0/4 [00:00<?, ?it/s]\rbench part 0/2:  50%|##  | 2/4 [00:02<00:02, 1.00it/s]"
            "\rbench part 0/2: 100%|####| 4/4 [00:04<00:00, 1.00it/s]\n"
            "bench part 0/2:   0%|    | 0/4 [00:00<?, ?it/s]\n")
    out = [line for i in range(0, len(text), 7) for line in p.feed(text[i:i + 7])] + list(p.close())
    assert [ln.split(": ")[1].split("%")[0].strip() for ln in out] == ["0", "50", "100", "0"]


def test_package_stamp_changes_only_with_the_package_content(tmp_path):
    pkg = tmp_path / "portraitgen"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.json").write_text("{}")
    old = time.time() - 3600
    for f in pkg.rglob("*.*"):
        os.utime(f, (old, old))
    stamp = Path(package_stamp(pkg, tmp_path / "stamp"))
    assert stamp.read_text().strip() == package_digest(pkg)
    assert abs(stamp.stat().st_mtime - old) < 1  # a new stamp is as old as the newest package file
    os.utime(pkg / "a.py")  # touched, same content: the stamp stays as it was
    package_stamp(pkg, stamp)
    assert abs(stamp.stat().st_mtime - old) < 1
    (pkg / "a.py").write_text("x = 2\n")
    package_stamp(pkg, stamp)
    assert stamp.stat().st_mtime > old + 1800 and stamp.read_text().strip() == package_digest(pkg)

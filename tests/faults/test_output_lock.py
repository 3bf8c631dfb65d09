"""One writer per output folder (issue 15, item 3): a second writer fails at once naming the holder;
the lock of a killed process is taken over; scattered parts lock only their own part."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from portraitgen.cli import main
from portraitgen.locking import OutputLockedError, lock_path, output_lock

from helpers import write_params

HOLD = """
import sys, time
from portraitgen.locking import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(out):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, holder):
    out = tmp_path / "train"
    proc = holder(out)
    t0 = time.monotonic()
    with pytest.raises(OutputLockedError, match=rf"pid {proc.pid} on host {socket.gethostname()}"):
        with output_lock(out):
            pass
    assert time.monotonic() - t0 < 2.0
    # Another folder, and another part of a scattered stage, are not held.
    with output_lock(tmp_path / "other"), output_lock(out, part=1, num_parts=2):
        pass


def test_a_killed_holders_lock_is_taken_over(tmp_path, holder, caplog):
    out = tmp_path / "train"
    proc = holder(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_path(out).is_file()  # SIGKILL left its record behind
    with caplog.at_level(logging.WARNING), output_lock(out) as path:
        assert f'"pid": {os.getpid()}' in path.read_text()
    assert f"taking over the lock left by pid {proc.pid}" in caplog.text and "no longer running" in caplog.text
    assert not lock_path(out).exists()  # a finished writer leaves nothing behind


def test_two_train_commands_on_one_out(tmp_path, holder, capsys):
    out = tmp_path / "train"
    proc = holder(out)
    params = write_params(tmp_path / "params.yaml")
    assert main(["train", "--params", str(params), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is being written by another portraitgen process: pid {proc.pid}" in err
    assert not out.exists()  # refused before anything was written


def test_jobs_writing_their_own_files_of_one_folder_do_not_block_each_other(tmp_path, holder):
    out = tmp_path / "precompute"
    holder(out)
    with output_lock(out, role="bench-only"):  # `precompute --bench-only` beside the precompute job
        pass

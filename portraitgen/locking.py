"""One writer per output folder: a lock next to every stage's ``--out``.

Two ``portraitgen train`` on one ``--out`` would both append to its logs and race on its checkpoints.
So every stage takes :func:`output_lock` before it touches its folder, and a second writer fails at
once, naming the holder (pid, host, command, start time) and the lock file.

How: an exclusive ``flock`` on ``<parent>/.<out name>.lock`` (a sibling, not a file inside the folder,
so a stage may replace its folder whole). The kernel releases a ``flock`` when its process dies, however
it dies (SIGKILL included), so a lock left by a dead process is simply taken over; its old holder
record is logged. The holder record (JSON) in the file is for people and error messages only; the
``flock`` is what counts. Scattered part jobs of one stage write their own part files into the same
folder at the same time, so each part has its own lock (``.<out name>.part-P-of-N.lock``); so has a
job that writes its own files of a shared folder (``precompute --bench-only``: ``role``).

In a multi-process run (``accelerate launch``) only the main process (RANK 0) takes the lock: the
others write nothing of their own. File systems without working ``flock`` across hosts (some NFS
setups) protect only against writers on the same host.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


class OutputLockedError(RuntimeError):
    """Another process is writing the same output folder."""


def lock_path(out_dir: str | Path, part: int | None = None, num_parts: int = 1, role: str = "") -> Path:
    out = Path(out_dir).absolute()
    suffix = f".part-{part}-of-{num_parts}" if part is not None and num_parts > 1 else ""
    suffix += f".{role}" if role else ""
    return out.parent / f".{out.name}{suffix}.lock"


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe(record: dict) -> str:
    if not record:
        return "a process that left no holder record"
    return (f"pid {record.get('pid')} on host {record.get('host')} (running `{record.get('command', '?')}` "
            f"since {record.get('since', '?')})")


def _read_record(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        return json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError) as exc:
        return isinstance(exc, PermissionError)  # alive, owned by someone else
    return True


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def output_lock(out_dir: str | Path, *, part: int | None = None, num_parts: int = 1,
                role: str = "") -> Iterator[Path | None]:
    """Hold the lock of ``out_dir`` (of one part of it) for the block; yields the lock file (None on
    processes other than the main one). Raises :class:`OutputLockedError` at once if it is held."""
    if not _is_main_process():
        yield None
        return
    path = lock_path(out_dir, part, num_parts, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_record(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise OutputLockedError(
                f"{Path(out_dir)} is being written by another portraitgen process: {_describe(holder)}. "
                f"Wait for it to finish or stop it; two writers would corrupt its outputs (lock file {path})"
            ) from None
        # The holder before us may have removed the file between our open and our lock: then we hold a
        # lock on a file nobody else can see. Start again on the file now at the path.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = _read_record(fd)
        if previous:
            alive = previous.get("host") == socket.gethostname() and _pid_alive(previous.get("pid"))
            log.warning("%s: taking over the lock left by %s%s", path, _describe(previous),
                        "" if alive else ", which is no longer running")
        record = json.dumps(_holder_record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        yield path
    finally:
        # Remove the file while still holding the lock (the samestat check above makes this safe), so a
        # finished stage leaves nothing behind; a killed one leaves a record that the next run takes over.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)

"""Append-only JSON-lines logs (metrics.jsonl, samples.jsonl) that survive a torn write.

A line is appended with one ``write`` of the whole record and its newline, so a process killed (or a
disk that fills up) in the middle leaves at most one partial line, and only at the end of the file.
:func:`repair` drops that line with a warning naming the file; training calls it on resume, before it
truncates the logs to its checkpoint. A damaged line anywhere else is not a torn write: it is an error
naming the file and the line, never silently skipped.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

from .io import atomic_write_text

log = logging.getLogger(__name__)


class JsonlError(ValueError):
    """A JSON-lines log is damaged somewhere other than a torn last line."""


def _parse(path: Path, text: str) -> tuple[list[dict], bool]:
    """``(records, torn)``: the complete records and whether a partial last line was left out."""
    lines = text.split("\n")
    # A complete file ends with "\n", so its last element is "". Anything else is a line that was being
    # written when the writer stopped.
    tail = lines.pop()
    torn = tail.strip() != ""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not torn:
                # The last line has its newline but not its content (a torn write that a later append
                # finished with a newline of its own would not get here): treat it as torn too.
                torn = True
                continue
            raise JsonlError(f"{path}: line {number} is not valid JSON ({exc.msg}); the log is damaged "
                             f"before its last line (not a torn write): move it away to start it afresh") from None
    return records, torn


def _load(path: Path) -> tuple[list[dict], bool]:
    """``(records, torn)`` of ``path`` (``([], False)`` when it does not exist), warning about a torn line."""
    if not path.is_file():
        return [], False
    records, torn = _parse(path, path.read_text(encoding="utf-8", errors="replace"))
    if torn:
        log.warning("%s: dropped a partial last line (a write was interrupted: killed, or the disk was full)", path)
    return records, torn


def read(path: str | Path) -> list[dict]:
    """The records of ``path`` ([] when it does not exist), leaving out a torn last line (with a warning)."""
    return _load(Path(path))[0]


def rewrite(path: str | Path, records: Iterable[dict]) -> None:
    """Replace ``path`` with ``records``, atomically (a hidden sibling renamed over it)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def repair(path: str | Path, keep: Callable[[dict], bool] | None = None) -> list[dict]:
    """Drop a torn last line of ``path`` (warning, naming the file) and, with ``keep``, every record it
    rejects; the file is rewritten atomically only if something changed. Returns the records kept."""
    path = Path(path)
    records, torn = _load(path)
    kept = [r for r in records if keep(r)] if keep is not None else records
    if torn or len(kept) != len(records):
        rewrite(path, kept)
    return kept


def append(path: str | Path, records: Iterable[dict]) -> None:
    """Append ``records`` as lines, in one write (a failure leaves at most one partial last line)."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked (a signal, a nearly full disk)
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)

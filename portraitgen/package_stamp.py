"""One file that stands for the package in Snakemake's job inputs, instead of its ~60 source files.

``package_stamp()`` writes the SHA-256 of every package file (names and contents) to
``.snakemake/portraitgen-package.sha256`` when it differs from what is there, and leaves the file alone
otherwise. A rule listing it reruns when the code changes (its mtime moves) and not when a checkout
only touches files (its content is the same). A new stamp gets the newest package file's mtime, not
the current time, so outputs pulled with ``dvc pull`` after a fresh clone are not older than it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .io import atomic_write

STAMP = ".snakemake/portraitgen-package.sha256"


def package_files(folder: str | Path = "portraitgen") -> list[Path]:
    """Every file of the package (code and shipped data), sorted."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def package_digest(folder: str | Path = "portraitgen") -> str:
    h = hashlib.sha256()
    root = Path(folder)
    for path in package_files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def package_stamp(folder: str | Path = "portraitgen", stamp: str | Path = STAMP) -> str:
    """The stamp file's path, (re)written only when the package's content changed."""
    stamp = Path(stamp)
    digest = package_digest(folder)
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return str(stamp)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    newest = max((p.stat().st_mtime for p in package_files(folder)), default=None)
    first = not stamp.exists()

    def write(tmp: Path) -> None:
        tmp.write_text(digest + "\n")
        if newest is not None and first:
            os.utime(tmp, (newest, newest))

    atomic_write(stamp, write)
    return str(stamp)

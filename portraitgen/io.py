"""Atomic file and folder writes: a reader (or a job killed half-way) sees the old content or the new,
never a torn file.

Every output of every stage goes through these helpers: the bytes are written to a hidden sibling
(``.<name>.<pid>.tmp``, the same file system, so the final rename is atomic) and renamed over the
destination only once they are complete. The process id in the temporary name keeps two jobs writing
the same file (parts of one stage, concurrent builders of a cache) from clobbering each other's halves.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """The hidden name next to ``path`` that its new content is written to first."""
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}")


def atomic_write(path: str | Path, write: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` to produce the file, then rename it to ``path``.

    ``write`` receives the temporary path (for writers that take a file name: ``to_parquet``,
    safetensors, pyarrow). ``fsync``: flush the bytes to the disk before the rename, for files whose
    loss after a power cut would not be noticed (content-addressed shards). The temporary file is
    removed when ``write`` fails.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and put it at ``dest`` when the block ends without error.

    An existing ``dest`` is replaced: it is renamed aside first and deleted after the new folder is in
    place, so a reader sees the old folder, (for an instant) none, or the new one, never a mix. On an
    error the temporary folder is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dest, "tmpdir")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = temporary_sibling(dest, "old")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, dest: Path, complete: str) -> bool:
    """Rename a finished folder ``tmp`` to ``dest`` unless another process already published one.

    For caches that concurrent processes may build at once (tiny models): the first complete folder wins
    and the others are dropped. ``complete``: a file whose presence in ``dest`` means it is complete.
    Returns whether ``tmp`` was the one published; ``tmp`` is gone either way.
    """
    try:
        tmp.rename(dest)
        return True
    except OSError:
        if not (dest / complete).is_file():
            raise
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

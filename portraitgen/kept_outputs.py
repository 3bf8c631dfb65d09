"""Keep a Snakemake run's previous good outputs until their replacements exist.

Snakemake deletes a job's declared outputs before the job starts, and the outputs of a job that fails;
on its own, a pipeline whose train job crashes leaves no trained model at all, not even the last good
one. The Snakefile's hooks call this module (``portraitgen kept-outputs``):

- ``save`` (``onstart``, before the first job): every declared output that exists is linked (hard links:
  no copy, no extra space; a plain copy where links fail) into ``.snakemake/kept-outputs/``, with the
  provenance record Snakemake keeps for it (params, code, input checksums: ``.snakemake/metadata``);
- ``restore`` (``onerror``): every kept output that is missing now (its job failed, or was interrupted)
  is moved back, and its provenance record restored. Snakemake records a job's params when the job
  *starts*, so without the old record the next run would find the restored, older outputs up to date
  and never redo the failed job; with it, the next run reruns exactly what the params change asks for;
- ``drop`` (``onsuccess``): the kept copies of the outputs that exist go (each was rebuilt, or current).

Why hard links are safe: Snakemake unlinks an output before its job writes it, and every stage writes
through :mod:`portraitgen.io` (a temporary sibling renamed over the destination), so a new output is
always a new file and never writes through a link into the kept copy.

Each invocation restores and drops only its own outputs (the ones it passes), under an ``flock`` on the
index, so two Snakemake runs at once in one folder (named runs, ``--config run=NAME``: disjoint outputs)
never restore or drop each other's copies.

An output whose kept copy is older than a run that was killed without hooks (``kill -9`` of Snakemake)
stays kept until a run succeeds: ``save`` replaces the copy of an output that exists, and leaves the copy
of one that is missing.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .io import atomic_write_text

STATE = Path(".snakemake/kept-outputs")
METADATA = Path(".snakemake/metadata")
INDEX = "index.json"


def record_path(metadata: Path, output: str) -> Path:
    """Where Snakemake's file persistence keeps an output's record (snakemake/persistence/file.py,
    ``_record_path``): the path's urlsafe base64, cut into ``@``-prefixed folder names when it is longer
    than a file name may be."""
    max_len = (os.pathconf(metadata, "PC_NAME_MAX") if os.name == "posix" and metadata.is_dir() else 255) or 255
    b64 = urlsafe_b64encode(output.encode()).decode()
    chunks = [b64[i:i + max_len - 1] for i in range(0, len(b64), max_len - 1)]
    return metadata.joinpath(*["@" + c for c in chunks[:-1]], chunks[-1])


@dataclass
class Kept:
    """What ``save`` did: the outputs kept, and those it copied because links failed."""

    kept: list[str]
    copied: list[str]


def _link_tree(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` (a file or a folder) to ``dst``; copy where linking fails. True if linked."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    linked = True

    def link_or_copy(a: str, b: str) -> None:
        nonlocal linked
        try:
            os.link(a, b)
        except OSError:  # another file system, or one without hard links
            linked = False
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(str(src), str(dst))
    return linked


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """Hold the index's lock: the read-modify-write of index.json by concurrent Snakemake runs."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_index(state: Path, index: dict[str, dict]) -> None:
    atomic_write_text(state / INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")


def _load_index(state: Path) -> dict[str, dict]:
    try:
        return json.loads((state / INDEX).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ValueError(f"{state / INDEX}: not the index of kept outputs ({exc}); remove {state} to start "
                         f"afresh") from exc


def listed(state: Path = STATE) -> list[str]:
    """The outputs kept now."""
    return sorted(_load_index(state))


def _exists(path: str | Path) -> bool:
    return Path(path).exists() or Path(path).is_symlink()


def save(outputs: list[str], state: Path = STATE, metadata: Path = METADATA) -> Kept:
    """Keep every existing output in ``outputs`` (relative paths, as Snakemake declares them)."""
    result = Kept([], [])
    with _locked(state):
        index = _load_index(state)
        for out in dict.fromkeys(outputs):
            if not _exists(out):
                continue  # missing now: an older kept copy (if any) stays until a run succeeds
            dst = state / "files" / out
            _remove(dst)
            if not _link_tree(Path(out), dst):
                result.copied.append(out)
            record = record_path(metadata, out)
            kept_record = state / "records" / f"{out}.json"
            _remove(kept_record)
            if record.is_file():
                kept_record.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(record, kept_record)  # a copy: Snakemake rewrites records in place
            index[out] = {"record": record.is_file()}
            result.kept.append(out)
        if result.kept:
            _write_index(state, index)
    return result


def restore(outputs: list[str] | None = None, state: Path = STATE, metadata: Path = METADATA) -> list[str]:
    """Put back every kept output (of ``outputs``; None: all) that is missing, with its provenance
    record; returns them."""
    restored = []
    with _locked(state):
        index = _load_index(state)
        mine = index if outputs is None else {o: index[o] for o in outputs if o in index}
        for out, entry in sorted(mine.items()):
            kept = state / "files" / out
            if _exists(out) or not _exists(kept):
                continue  # rebuilt by a job that succeeded, or nothing to put back
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            os.replace(kept, out)
            if entry.get("record"):
                record = record_path(metadata, out)
                record.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(state / "records" / f"{out}.json", record)
            del index[out]
            restored.append(out)
        if restored:
            _write_index(state, index)
    return restored


def drop(outputs: list[str] | None = None, state: Path = STATE) -> None:
    """Forget the kept copies of the outputs (of ``outputs``; None: all) that exist: the run succeeded,
    each was rebuilt or current. The copy of an output still missing (its job was not part of this run)
    stays."""
    if not state.exists():
        return
    with _locked(state):
        index = _load_index(state)
        for out in [o for o in (index if outputs is None else outputs) if o in index and _exists(o)]:
            _remove(state / "files" / out)
            _remove(state / "records" / f"{out}.json")
            del index[out]
        if index:
            _write_index(state, index)
        else:  # nothing kept: only the lock file stays (another run may be waiting on it)
            for path in ("files", "records", INDEX):
                _remove(state / path)

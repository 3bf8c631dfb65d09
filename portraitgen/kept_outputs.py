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

An output whose kept copy is older than a run that was killed without hooks (``kill -9`` of Snakemake)
stays kept until a run succeeds: ``save`` replaces the copy of an output that exists, and leaves the copy
of one that is missing.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_write_text

log = logging.getLogger(__name__)

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


def save(outputs: list[str], state: Path = STATE, metadata: Path = METADATA) -> Kept:
    """Keep every existing output in ``outputs`` (relative paths, as Snakemake declares them)."""
    index = _load_index(state)
    result = Kept([], [])
    for out in dict.fromkeys(outputs):
        src = Path(out)
        if not (src.exists() or src.is_symlink()):
            continue  # missing now: an older kept copy (if any) stays until a run succeeds
        dst = state / "files" / out
        _remove(dst)
        if not _link_tree(src, dst):
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
        atomic_write_text(state / INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return result


def restore(state: Path = STATE, metadata: Path = METADATA) -> list[str]:
    """Put back every kept output that is missing, with its provenance record; returns them."""
    index = _load_index(state)
    restored = []
    for out, entry in sorted(index.items()):
        dst, kept = Path(out), state / "files" / out
        if dst.exists() or dst.is_symlink() or not (kept.exists() or kept.is_symlink()):
            continue  # rebuilt by a job that succeeded, or nothing to put back
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(kept, dst)
        if entry.get("record"):
            record = record_path(metadata, out)
            record.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(state / "records" / f"{out}.json", record)
        del index[out]
        restored.append(out)
    if restored:
        atomic_write_text(state / INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return restored


def drop(state: Path = STATE) -> None:
    """Forget the kept copies of outputs that exist (the run succeeded: each was rebuilt or current);
    the copy of an output still missing (its job was not part of this run) stays."""
    index = _load_index(state)
    for out in [o for o in index if Path(o).exists() or Path(o).is_symlink()]:
        _remove(state / "files" / out)
        _remove(state / "records" / f"{out}.json")
        del index[out]
    if not index:
        if state.exists():
            shutil.rmtree(state)
    else:
        atomic_write_text(state / INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")

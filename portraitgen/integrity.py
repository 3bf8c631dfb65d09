"""Checksums on every artifact a later stage trusts, verified on read.

The scheme the invert shards started with, for every file one stage writes and another reads: the
file is written completely (atomically), then its SHA-256 goes to a sidecar ``<name>.sha256`` (also
written atomically, after the file). A reader verifies the file against its sidecar *before* parsing
it, so a flipped bit anywhere (tensor data or header), a truncated file or a file whose sidecar never
got written is reported as what it is, naming the file and the way to recover, instead of being
trusted, or misread into a misleading message ("made by another model").

Folders (a checkpoint, exported weights, a detector) carry one ``SHA256SUMS`` file listing every file
in them (``sha256sum -c SHA256SUMS`` checks it by hand), written last.

Which artifacts, who writes them and how to recover (docs/robustness.md):
prompt embeddings and exemplar rewards (precompute), the curate manifest (curate), the detector
(precompute / train-detector), checkpoints and exported weights (train), invert shards (invert).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .io import atomic_write_text

SUMS_NAME = "SHA256SUMS"


class IntegrityError(RuntimeError):
    """An artifact does not match its recorded checksum, or has none (it was never completely written)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text, fsync=True)


def rerun(rule: str, command: str) -> str:
    """The recovery line of an artifact made by workflow rule ``rule`` (CLI ``command``)."""
    return f"re-run the stage that makes it: `snakemake --forcerun {rule}` (or `{command}`)"


def write_checksum(path: str | Path) -> str:
    """Record the SHA-256 of the complete file ``path`` in its sidecar; returns it."""
    path = Path(path)
    digest = sha256_file(path)
    _write_text_atomic(sidecar(path), f"{digest}  {path.name}\n")
    return digest


def recorded_checksum(path: str | Path) -> str | None:
    side = sidecar(path)
    if not side.is_file():
        return None
    text = side.read_text(encoding="utf-8", errors="replace").split()
    return text[0] if text else ""


def verify_file(path: str | Path, recovery: str, *, what: str = "") -> str:
    """Check ``path`` against its sidecar; returns the checksum or raises :class:`IntegrityError` naming
    the file, what is wrong and ``recovery`` (see :func:`rerun`)."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise IntegrityError(f"{label} is missing; {recovery}")
    recorded = recorded_checksum(path)
    if recorded is None:
        raise IntegrityError(f"{label} has no checksum ({sidecar(path).name} is missing): it was not completely "
                             f"written, or was made by another tool; {recovery}")
    actual = sha256_file(path)
    if actual != recorded:
        raise IntegrityError(f"{label} is corrupt: its sha256 {actual[:12]}... does not match the recorded "
                             f"{recorded[:12]}...; {recovery}")
    return actual


def verify_if_recorded(path: str | Path, recovery: str, *, what: str = "") -> bool:
    """:func:`verify_file` for inputs that may also be made by hand (a manifest, an exemplar index): a file
    with a sidecar is verified; one without is read as it is. Returns whether it was verified."""
    if recorded_checksum(path) is None:
        return False
    verify_file(path, recovery, what=what)
    return True


def write_folder_checksums(folder: str | Path) -> Path:
    """Record every file under ``folder`` (but the list itself) in ``folder/SHA256SUMS``, written last."""
    folder = Path(folder)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n"
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SUMS_NAME]
    _write_text_atomic(folder / SUMS_NAME, "".join(lines))
    return folder / SUMS_NAME


def verify_folder(folder: str | Path, recovery: str, *, what: str = "") -> None:
    """Check every file listed in ``folder/SHA256SUMS`` (and that the list exists)."""
    folder = Path(folder)
    label = f"{what} {folder}" if what else str(folder)
    sums = folder / SUMS_NAME
    if not sums.is_file():
        raise IntegrityError(f"{label} has no {SUMS_NAME}: it was not completely written, or was made by another "
                             f"tool; {recovery}")
    for number, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise IntegrityError(f"{sums}: line {number} is damaged; {recovery}")
        recorded, name = parts[0], parts[1].strip()
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{label}: {name} is missing; {recovery}")
        actual = sha256_file(path)
        if actual != recorded:
            raise IntegrityError(f"{label}: {name} is corrupt: its sha256 {actual[:12]}... does not match the "
                                 f"recorded {recorded[:12]}...; {recovery}")

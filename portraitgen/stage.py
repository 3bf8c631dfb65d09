"""What every stage (curate, invert, precompute, bench) shares: opening its output folder, the
scatter/gather options ``--part/--num-parts/--merge-only`` and their part files, and its MLflow run.

Scatter/gather, the same for every stage::

    portraitgen <stage> ... --part P --num-parts N   # one cluster job: part P of N, writes its part file
    portraitgen <stage> ... --merge-only --num-parts N  # the gather job: reads the N part files, writes outputs
    portraitgen <stage> ... [--num-parts N]            # one process does every part, then the merge

A part file is ``<out>/parts/part-PPPP-of-NNNN.<ext>``; the merge names a missing or stale one together
with the command that makes it.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from .config import TrackingConfig


def open_output(out_dir: str | Path) -> Path:
    """The stage's ``--out`` folder, created if needed: the one place a stage takes hold of its outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------------------- parts
def add_part_args(parser: argparse.ArgumentParser, *, part: str, num_parts: str, merge: str) -> None:
    """--part/--num-parts/--merge-only on a stage's parser, with the stage's own help texts."""
    parser.add_argument("--part", type=int, help=part)
    parser.add_argument("--num-parts", type=int, default=1, help=num_parts)
    parser.add_argument("--merge-only", action="store_true", help=merge)


@dataclass(frozen=True)
class Parts:
    """A stage invocation's share of the work: every part, one part (a scattered job), or the merge."""

    part: int | None = None
    num_parts: int = 1
    merge_only: bool = False

    @classmethod
    def checked(cls, part: int | None, num_parts: int, merge_only: bool, *, error: type[Exception] = ValueError,
                merge_reads_parts: bool = True) -> "Parts":
        """Validate the options, raising ``error`` (the stage's own exception) with the offending flag.

        ``merge_reads_parts``: the merge gathers the ``--num-parts`` part files (so it needs N > 1). A
        stage whose merge reads its content-addressed outputs instead (invert) accepts any N.
        """
        if num_parts < 1:
            raise error(f"--num-parts must be at least 1, got {num_parts}")
        if part is not None and not 0 <= part < num_parts:
            raise error(f"--part {part} is outside 0..{num_parts - 1}")
        if merge_only and part is not None:
            raise error("--merge-only gathers every part: leave out --part")
        if merge_only and merge_reads_parts and num_parts < 2:
            raise error("--merge-only gathers the part files of --num-parts N part jobs (N > 1), without --part")
        return cls(part, num_parts, merge_only)

    @property
    def scattered(self) -> bool:
        """One part job of several: it writes its part file and no merged output."""
        return self.part is not None and self.num_parts > 1

    @property
    def to_run(self) -> list[int]:
        """The parts this invocation computes (none for the merge job)."""
        if self.merge_only:
            return []
        return [self.part] if self.part is not None else list(range(self.num_parts))

    def label(self, p: int) -> str:
        """`` part P/N`` for progress bars and logs of a split run, empty for an unsplit one."""
        return f" part {p}/{self.num_parts}" if self.num_parts > 1 else ""


def part_file(out_dir: str | Path, part: int, num_parts: int, ext: str) -> Path:
    """Where part ``part`` of ``num_parts`` is written (``ext`` without the dot: jsonl, parquet)."""
    return Path(out_dir) / "parts" / f"part-{part:04d}-of-{num_parts:04d}.{ext}"


def part_pattern(out_dir: str, num_parts: int, ext: str, wildcard: str = "{part}") -> str:
    """:func:`part_file` with the part number left as a (Snakemake) wildcard."""
    return f"{out_dir}/parts/part-{wildcard}-of-{num_parts:04d}.{ext}"


def part_command(stage: str, out_dir: str | Path, part: int, num_parts: int, params: str = "...") -> str:
    """The command that (re)makes one part file, for error messages of the merge."""
    return f"portraitgen {stage} --params {params} --out {out_dir} --part {part} --num-parts {num_parts}"


# ---------------------------------------------------------------------------------------------- tracking
@contextlib.contextmanager
def tracked(cfg: TrackingConfig, stage: str, *, params: Mapping[str, Any] | None = None,
            tags: Mapping[str, str] | None = None, active: bool = True, run_id: str | None = None) -> Iterator[Any]:
    """The stage's MLflow run: ended FINISHED when the block completes, FAILED when it raises.
    ``active``: False off the main process (nothing is logged); ``run_id``: continue that run (a resumed
    training)."""
    from .tracking import Tracker

    tracker = Tracker(cfg, stage=stage, active=active, run_id=run_id, params=params, tags=tags)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.end(status)

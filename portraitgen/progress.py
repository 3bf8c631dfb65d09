"""Console progress of a stage run by Snakemake, while its log file stays complete.

A rule's command pipes the stage's output through this filter::

    portraitgen curate ... 2>&1 | portraitgen progress --log results/logs/curate.log --stage curate

Every byte goes to the log file, unchanged (progress bars included). The console gets, per progress bar
(tqdm's ``desc: 45%|####  | 9/20 [00:03<00:04, ...]``), one line each time it passes another
``--every`` percent, with the elapsed time and the ETA; on a terminal, one line that updates in place
instead. Warnings and errors are echoed too, so a failing job says why without opening the log.
`portraitgen progress` skips the stages' imports (cli.main): it starts in a fraction of a second. It exits with 0 whatever it
reads; the job's status is the stage's (Snakemake runs shell commands with ``pipefail``).
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

BAR = re.compile(r"(?:(?P<desc>[^\r\n|]*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>[\d.]+[kMG]?)/(?P<total>[\d.]+[kMG]?)"
                 r"\s*\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+)")
ECHO = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback|error:)")


@dataclass
class Progress:
    """Turns the stage's output (chunks of text) into console lines."""

    stage: str
    every: int = 10
    tty: bool = False
    _shown: dict[str, int] = field(default_factory=dict)  # bar -> last percent shown
    _pending: str = ""

    def feed(self, text: str) -> Iterator[str]:
        """Console lines for ``text``; a line or bar update split across chunks waits for its end."""
        text = self._pending + text
        pieces = re.split(r"[\r\n]", text)
        self._pending = pieces.pop()  # unfinished: completed by the next chunk
        for piece in pieces:
            yield from self._line(piece)

    def close(self) -> Iterator[str]:
        if self._pending:
            yield from self._line(self._pending)
            self._pending = ""

    def _line(self, piece: str) -> Iterator[str]:
        m = BAR.search(piece)
        if m is None:
            if ECHO.search(piece):
                yield f"[{self.stage}] {piece.strip()}"
            return
        desc = (m.group("desc") or "").strip() or self.stage
        pct = int(m.group("pct"))
        step = pct if self.tty else (100 if pct >= 100 else pct - pct % self.every)
        last = self._shown.get(desc)
        if last is not None and pct == 0 and last > 0:
            last = None  # a new bar under the same name (e.g. the next part of a stage)
        if last is not None and step <= last:
            return
        self._shown[desc] = step
        eta = "" if pct >= 100 else f", ETA {m.group('eta')}"
        yield (f"[{self.stage}] {desc}: {pct:3d}% ({m.group('n')}/{m.group('total')}), "
               f"elapsed {m.group('elapsed')}{eta}")


def run(stream: IO[bytes], log: IO[bytes], console: IO[str], progress: Progress) -> None:
    for chunk in _chunks(stream):
        log.write(chunk)
        log.flush()
        for line in progress.feed(chunk.decode("utf-8", errors="replace")):
            _show(console, line, progress.tty)
    for line in progress.close():
        _show(console, line, progress.tty)
    if progress.tty:
        console.write("\n")
        console.flush()


def _chunks(stream: IO[bytes]) -> Iterable[bytes]:
    read = getattr(stream, "read1", stream.read)  # what is there now: bars arrive without newlines
    while True:
        chunk = read(65536)
        if not chunk:
            return
        yield chunk


def _show(console: IO[str], line: str, tty: bool) -> None:
    if tty and BAR.search(line) is None:
        console.write("\r\033[K" + line + "\n")
    elif tty:
        console.write("\r\033[K" + line[:200])
    else:
        console.write(line + "\n")
    console.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="portraitgen progress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", required=True, help="the job's log file: everything read is written there")
    ap.add_argument("--stage", required=True, help="the name the console lines start with")
    ap.add_argument("--every", type=int, default=10, help="a console line per this many percent (default: 10)")
    args = ap.parse_args(argv)
    with open(args.log, "wb") as log:
        run(sys.stdin.buffer, log, sys.stdout, Progress(args.stage, every=max(1, args.every), tty=sys.stdout.isatty()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

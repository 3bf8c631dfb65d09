"""Phase timers and memory probes cheap enough to stay on in every training run.

The trainer splits each iteration into contiguous phases on one timeline::

    tl = PhaseTimeline(device)
    tl.start("data")            # the iteration begins; time now counts to "data"
    tl.switch("rollout")        # "data" ends, "rollout" begins
    with tl.phase("optimizer"): # a nested span; on exit time counts to the enclosing phase again
        ...
    times = tl.stop()           # {"rollout": s, "optimizer": s, ..., "iteration": s}

Phases never overlap and cover the iteration, so they sum to its wall time by construction.

On a GPU, a boundary is a CUDA event recorded on the current stream, never a synchronisation: the
step loop keeps running ahead of the device. ``stop()`` waits once, for the last event, and reads the
elapsed times between consecutive events. An event completes when the device reaches it or, if the
device is idle, as soon as it is recorded, so the event timeline is the iteration's real timeline:
host-only work (reward scoring on the CPU, checkpoint writing) is measured too.

Memory (``track_memory=True``): the peak of each phase, for the process's resident set (Linux:
``VmHWM`` after resetting it through ``/proc/self/clear_refs`` at each boundary; elsewhere the RSS at
the boundaries) and for the GPU's allocated memory (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; both read the caching allocator's host-side counters, no sync).
"""
from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Iterator

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    """The process's current resident set size in bytes (0 where it cannot be read)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or unsupported platform
        return 0


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class _PeakRSS:
    """Peak resident set size between ``reset()`` and ``read()``."""

    def __init__(self) -> None:
        self.exact = _status_kib("VmHWM") is not None and self._try_reset()
        self._floor = 0

    @staticmethod
    def _try_reset() -> bool:
        try:
            _CLEAR_REFS.write_text("5")  # Linux >= 4.0: reset the high-water mark to the current RSS
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.exact:
            self._try_reset()
        else:
            self._floor = rss_bytes()

    def read(self) -> int:
        if self.exact:
            return 1024 * (_status_kib("VmHWM") or 0)
        return max(self._floor, rss_bytes())  # boundaries only: a lower bound of the true peak


class PhaseTimeline:
    """Contiguous named phases of one iteration; see the module docstring."""

    def __init__(self, device: torch.device | str = "cpu", track_memory: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.track_memory = track_memory
        self._peak_rss: _PeakRSS | None = None
        self._stack: list[str] = []
        self._marks: list[tuple[str, float, object]] = []  # (phase starting here, perf_counter, cuda event)
        self.memory: dict[str, dict[str, int]] = {}  # phase -> {"cpu_rss_peak": bytes, "gpu_allocated_peak": bytes}
        self.last: dict[str, float] = {}  # the breakdown of the last stopped iteration

    @property
    def running(self) -> bool:
        return bool(self._stack)

    # ------------------------------------------------------------------ boundaries
    def _mark(self, phase: str | None) -> None:
        if self.track_memory and self._marks:
            self._close_memory(self._marks[-1][0])
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._marks.append((phase, time.perf_counter(), event))
        if self.track_memory and phase is not None:
            self._open_memory()

    def _open_memory(self) -> None:
        if self._peak_rss is None:
            self._peak_rss = _PeakRSS()
        self._peak_rss.reset()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def _close_memory(self, phase: str | None) -> None:
        if phase is None or self._peak_rss is None:
            return
        rec = self.memory.setdefault(phase, {"cpu_rss_peak": 0, "gpu_allocated_peak": 0})
        rec["cpu_rss_peak"] = max(rec["cpu_rss_peak"], self._peak_rss.read())
        if self.cuda:
            peak = int(torch.cuda.max_memory_allocated(self.device))
            rec["gpu_allocated_peak"] = max(rec["gpu_allocated_peak"], peak)

    def start(self, phase: str) -> None:
        """Begin an iteration in ``phase`` (a running iteration is discarded)."""
        self._marks.clear()
        self._stack = [phase]
        self._mark(phase)

    def switch(self, phase: str) -> None:
        """End the current phase and begin ``phase`` (no-op when no iteration is running)."""
        if not self._stack:
            return
        self._stack[-1] = phase
        self._mark(phase)

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        """Count the enclosed block to ``phase``, then return to the enclosing phase."""
        if not self._stack:
            yield
            return
        outer = self._stack[-1]
        self._stack.append(phase)
        self._mark(phase)
        try:
            yield
        finally:
            self._stack.pop()
            self._stack[-1] = outer
            self._mark(outer)

    def _durations(self) -> dict[str, float]:
        marks, out = self._marks, {}
        if len(marks) < 2:
            return out
        if self.cuda:
            marks[-1][2].synchronize()  # the last boundary: the wait for the device
            for (phase, _, ev), (_, _, ev_next) in zip(marks, marks[1:]):
                out[phase] = out.get(phase, 0.0) + ev.elapsed_time(ev_next) / 1000.0
        else:
            for (phase, t, _), (_, t_next, _) in zip(marks, marks[1:]):
                out[phase] = out.get(phase, 0.0) + (t_next - t)
        return out

    def elapsed(self) -> dict[str, float]:
        """Seconds per phase of the iteration so far, without the phase now running."""
        return self._durations() if self._stack else {}

    def stop(self) -> dict[str, float]:
        """End the iteration; returns seconds per phase and ``"iteration"`` (their sum)."""
        if not self._stack:
            return {}
        self._mark(None)
        self._stack = []
        out = self._durations()
        out["iteration"] = sum(out.values())
        self._marks.clear()
        self.last = out
        return out


def cuda_sync(device: torch.device | str | None = None) -> None:
    """Wait for the device (benchmarks: only at the edges of what they time)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


def peak_gpu_allocated(device: torch.device | str | None = None) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if torch.cuda.is_available() else 0


__all__ = ["PhaseTimeline", "cuda_sync", "peak_gpu_allocated", "rss_bytes"]

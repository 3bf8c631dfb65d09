"""Headless Chromium for tests that look at rendered HTML reports.

    from browser import chromium_or_skip, dump_dom, screenshot
    binary = chromium_or_skip()                      # the path, or pytest.skip with the reason
    dom = dump_dom(binary, page)                     # the DOM after loading (scripts run, images decoded)
    screenshot(binary, page, tmp_path / "shot.png")

A browser on PATH (``chromium``, ``chromium-browser``, ``google-chrome``) is used as is. Without one, and
running as root where apt can install it, Debian's ``chromium`` is installed once
(``apt-get install -y --no-install-recommends chromium``, after ``apt-get update`` when apt knows no
candidate yet); a file lock makes parallel pytest workers wait for one install instead of racing, and a
failure is remembered for an hour so other workers and later tests skip at once. Set
``PORTRAITGEN_NO_BROWSER_INSTALL=1`` to never install (the tests are then skipped without a browser).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LOCK = Path(tempfile.gettempdir()) / "portraitgen-chromium-install.lock"
FAILED = Path(tempfile.gettempdir()) / "portraitgen-chromium-install.failed"  # holds the reason
FAILURE_TTL = 3600  # s: how long a failed install is not retried
INSTALL_TIMEOUT = 900  # s, apt-get update + install on a slow mirror
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars")
_cached: tuple[str | None, str] | None = None  # this process's answer


def find_chromium() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _apt_candidate() -> bool:
    out = subprocess.run(["apt-cache", "policy", "chromium"], capture_output=True, text=True, timeout=60).stdout
    line = next((ln for ln in out.splitlines() if ln.strip().startswith("Candidate:")), "")
    return bool(line) and "(none)" not in line


def _install() -> tuple[str | None, str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if not _apt_candidate():
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env)
            if not _apt_candidate():
                return None, "apt knows no candidate for 'chromium' (apt-cache policy chromium), even after apt-get update"
        res = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                             text=True, timeout=INSTALL_TIMEOUT, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"installing chromium with apt failed: {exc}"
    path = find_chromium()
    if path is None:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return None, f"apt-get install chromium failed (exit {res.returncode}): {' | '.join(tail)}"
    return path, "installed with apt"


def ensure_chromium() -> tuple[str | None, str]:
    """(path, how) or (None, why not): found on PATH, or installed once per machine session."""
    global _cached
    if _cached is not None:
        return _cached
    path = find_chromium()
    if path:
        _cached = (path, "found on PATH")
        return _cached
    if os.environ.get("PORTRAITGEN_NO_BROWSER_INSTALL"):
        _cached = (None, "no chromium on PATH and PORTRAITGEN_NO_BROWSER_INSTALL is set")
        return _cached
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        _cached = (None, "no chromium on PATH (install it: apt-get install chromium); not root with apt to install it")
        return _cached
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker installing: wait for it, then look again
        try:
            path = find_chromium()
            if path:
                _cached = (path, "found on PATH")
            elif FAILED.is_file() and time.time() - FAILED.stat().st_mtime < FAILURE_TTL:
                _cached = (None, f"an earlier install failed: {FAILED.read_text().strip()}")
            else:
                _cached = _install()
                if _cached[0] is None:
                    FAILED.write_text(_cached[1])
                else:
                    FAILED.unlink(missing_ok=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _cached


def chromium_or_skip() -> str:
    from helpers import skip_unless_ci

    path, why = ensure_chromium()
    if path is None:
        skip_unless_ci(f"headless browser test: {why}")
    return path


def _run(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def dump_dom(binary: str, page: Path, *, extra: tuple[str, ...] = (), timeout: float = 60) -> str:
    """The serialised DOM of ``page`` after it loaded (``--virtual-time-budget`` lets scripts and images finish)."""
    res = _run(binary, [*extra, "--virtual-time-budget=5000", "--dump-dom", Path(page).resolve().as_uri()], timeout)
    if res.returncode != 0 or "<html" not in res.stdout:
        raise RuntimeError(f"chromium --dump-dom failed (exit {res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


def screenshot(binary: str, page: Path, out: Path, *, size: tuple[int, int] = (1280, 2000), timeout: float = 60) -> Path:
    out = Path(out)
    out.unlink(missing_ok=True)
    res = _run(binary, [f"--screenshot={out.resolve()}", f"--window-size={size[0]},{size[1]}",
                        "--virtual-time-budget=5000", Path(page).resolve().as_uri()], timeout)
    if not out.is_file():
        raise RuntimeError(f"chromium --screenshot wrote nothing (exit {res.returncode}): {res.stderr[-2000:]}")
    return out


def undecoded_images(binary: str, page: Path, *, timeout: float = 60) -> tuple[int, list[str]]:
    """``(images, broken)`` of ``page`` as the browser rendered it: how many <img> it holds and the src of
    each one that did not decode. The report pages carry no script, so a probe page beside ``page`` loads
    it in a frame and writes the answer into its own DOM."""
    import json

    probe = page.parent / "probe.html"
    probe.write_text("<!doctype html><html><body><iframe id='f' src='" + page.name + "' width='1200' height='800'>"
                     "</iframe><pre id='out'>pending</pre><script>document.getElementById('f').onload = function () {"
                     "var imgs = Array.from(this.contentDocument.images);"
                     "document.getElementById('out').textContent = JSON.stringify({n: imgs.length, broken: imgs"
                     ".filter(function (i) { return !i.complete || i.naturalWidth === 0; })"
                     ".map(function (i) { return i.getAttribute('src'); })});};</script></body></html>")
    dom = dump_dom(binary, probe, extra=("--allow-file-access-from-files",), timeout=timeout)
    result = json.loads(dom.split("<pre id=\"out\">")[1].split("</pre>")[0])
    return result["n"], result["broken"]

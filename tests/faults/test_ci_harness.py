"""In CI the SLURM and Chromium harnesses are installed (.ci/system-packages): one that cannot start
there fails the run instead of skipping its tests (issue 15, item 9)."""
from __future__ import annotations

import pytest

import browser
from helpers import skip_unless_ci


@pytest.mark.parametrize("ci,outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_harness_that_cannot_start_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(browser, "ensure_chromium", lambda: (None, "no chromium (simulated)"))
    with pytest.raises(outcome, match="no chromium"):
        browser.chromium_or_skip()
    with pytest.raises(outcome, match="no single-node SLURM"):
        skip_unless_ci("no single-node SLURM here (simulated)")

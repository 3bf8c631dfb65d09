"""Smoke runs of the benchmark scripts (benchmarks/*.py --quick): they run on a CPU and print valid JSON
lines with the expected figures. Timings are not asserted (CI runs these once, on shared machines)."""
import json
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPTS = {
    "iteration_breakdown.py": ("iteration_breakdown", {"phase/rollout", "phase/train_fwd_bwd", "phase/optimizer",
                                                       "iteration_wall", "isolated_transformer", "overhead_ratio",
                                                       "images_per_second", "achieved_tflops", "process_peak_rss"}),
    "exemplar_overhead.py": ("exemplar_overhead", {"wall_e0", "wall_e", "iteration_change", "non_transformer_change",
                                                   "phase_change/exemplar_logp"}),
    "precompute_throughput.py": ("precompute_throughput", {"cold/stage_seconds", "warm/stage_seconds",
                                                           "cold/stage_images_per_second"}),
    "reward_server.py": ("reward_server", {f"{k}/{r}" for k in ("inproc", "server", "added_ms", "overhead_ms",
                                                                 "clients2", "mean_batch")
                                           for r in ("omni_vlm", "ai_portrait_classic")}),
    "pretrain_sweep.py": ("pretrain_sweep", {f"lr=0.002/step={s}/face_rate" for s in (1, 2, 4)}),
    "pretrain.py": ("pretrain", {"planted/train_seconds", "planted/face_rate_samples", "clean/artifact_rate_samples",
                                 "real/face_rate", "planted/artifact_rate_above_clean_control"}),
}


def _run(script: str, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert rows, proc.stdout[-2000:]
    # ... and a readable table: every printed figure is a row of it (by its name, or its mode).
    table = [[c.strip() for c in ln.strip().strip("|").split("|")]
             for ln in proc.stdout.splitlines() if " | " in ln and not ln.startswith("{")]
    assert table, proc.stdout[-2000:]
    shown = {cells[0] for cells in table}
    for r in rows:
        key = str(r["name"] if "name" in r else r["mode"])
        assert key in shown, f"figure {key!r} is not in the table:\n{proc.stdout[-2000:]}"
    return rows


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_runs_quick_and_prints_its_figures(script):
    bench, names = SCRIPTS[script]
    rows = [r for r in _run(script) if r["bench"] == bench]
    got = {r["name"] for r in rows}
    assert names <= got, names - got
    for r in rows:
        assert {"bench", "name", "value", "unit", "device", "load_avg_1m"} <= set(r)
    values = {r["name"]: r["value"] for r in rows}
    if bench == "iteration_breakdown":
        assert values["iteration_wall"] > 0 and values["isolated_transformer"] > 0
        phases = sum(v for k, v in values.items() if k.startswith("phase/"))
        # Medians of one measured iteration: the phases add up to the wall time.
        assert phases == pytest.approx(values["iteration_wall"], rel=1e-3)


def test_inversion_modes_quick():
    rows = _run("inversion_modes.py")
    assert [r["mode"] for r in rows] == ["euler", "fixed_point", "bridge"]
    for r in rows:
        assert {"inversion_img_per_s", "with_diagnostics_img_per_s", "load_s", "psnr", "residual_ms"} <= set(r)
        assert r["images"] == 4 and r["with_diagnostics_img_per_s"] > 0

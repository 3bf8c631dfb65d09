"""`snakemake --report` shows the stages' reports and figures under their categories (report() flags
from the stage table). Real snakemake on a project copy, with a stub `portraitgen` that writes every
declared output (HTML reports, PNG figures) of the stages it is asked to run."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="needs snakemake (extra 'workflow')")

STUB = """#!{python}
import io, sys
from pathlib import Path
from PIL import Image
from portraitgen.stages import STAGES
args = sys.argv[1:]
if args[0] == "mlflow-parent":
    sys.exit(0)
if args[0] == "progress":
    Path(args[args.index("--log") + 1]).write_bytes(sys.stdin.buffer.read())
    sys.exit(0)
out = Path(args[args.index("--out") + 1])
verb = "train" if args[0] == "launch-train" else args[0]
name = "bench_embeddings" if "--bench-only" in args else verb
stage = next(s for s in STAGES if s.name == name)
def png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
for o in stage.outputs:
    path = out / o.path
    if o.path == "report_assets":
        png(path / "plots" / "comparisons.png")
        png(path / "grids" / "00_p000_s0.png")
    elif o.directory or "." not in o.path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "x").write_text(name)
    elif o.path.endswith(".png"):
        png(path)
    elif o.path.endswith(".html"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<html><body><h1>{{name}} report</h1></body></html>")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{{}}" if o.path.endswith(".json") else name)
"""


def test_report_has_the_stage_reports_and_figures(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("workflow", "portraitgen"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("Snakefile", "params.yaml"):
        shutil.copy2(REPO / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["path"] = "builtin:tiny"  # no pretraining stage in this run
    params["tracking"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stub = tmp_path / "bin" / "portraitgen"
    stub.parent.mkdir()
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=os.pathsep.join([str(stub.parent), str(BIN), os.environ["PATH"]]),
               PYTHONPATH=str(project))
    targets = ["results/curate/report.html", "results/invert/report.html", "results/bench/report.html"]
    proc = subprocess.run([SNAKEMAKE, "--cores", "1", *targets], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([SNAKEMAKE, "--report", "report.zip", *targets], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = zipfile.ZipFile(project / "report.zip").namelist()
    data = sorted(n.split("/", 4)[-1] for n in names if n.startswith("report/data/raw/"))
    # The curate and invert reports, invert's residual plot, the bench's plots and grids (stored by hash).
    assert data == ["grids/00_p000_s0.png", "plots/comparisons.png", "report.html", "report.html",
                    "residuals.png"], names
    text = "".join(zipfile.ZipFile(project / "report.zip").read(n).decode(errors="ignore")
                   for n in names if n.endswith((".js", ".html")))
    for category in ("Curation", "Inversion", "PortraitBench"):
        assert category in text

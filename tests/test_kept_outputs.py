"""The last good outputs kept across a failed Snakemake run (portraitgen/kept_outputs.py).

The end-to-end behaviour with a real Snakemake (a failed train job leaves the last good model and the
next run still redoes train) is tests/test_workflow.py::test_snakemake_keeps_checkpoints_and_reruns_only_on_params.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from portraitgen import kept_outputs


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".snakemake" / "metadata").mkdir(parents=True)
    return tmp_path


def _record(output: str, params: str) -> Path:
    path = kept_outputs.record_path(kept_outputs.METADATA, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"params": [params]}))
    return path


@pytest.mark.parametrize("output", ["results/train/final", "results/ablation/" + "x" * 400 + "/bench/report.html"])
def test_record_path_is_where_snakemake_keeps_it(workdir, output):
    from snakemake.persistence.file import FilePersistence

    # Snakemake's own method, on an object with the attribute it reads (its constructor needs a DAG).
    ours = kept_outputs.record_path(kept_outputs.METADATA, output)
    theirs = FilePersistence._record_path(SimpleNamespace(_fetch_max_len=lambda subject: os.pathconf(subject, "PC_NAME_MAX")),
                                      str(kept_outputs.METADATA), output)
    assert str(ours) == theirs
    if len(output) > 300:
        assert len(ours.parts) > 3  # cut into folders: a name may not exceed the file system's limit


def test_a_missing_output_is_restored_with_its_record(workdir):
    final = Path("results/train/final")
    final.mkdir(parents=True)
    (final / "model.safetensors").write_text("good weights")
    Path("results/train/metrics.json").write_text("{}")
    record = _record("results/train/final", "lr=0.1")
    mtime = (final / "model.safetensors").stat().st_mtime_ns

    kept = kept_outputs.save(["results/train/final", "results/train/metrics.json", "results/train/absent"])
    assert kept.kept == ["results/train/final", "results/train/metrics.json"] and kept.copied == []
    copy = kept_outputs.STATE / "files" / "results/train/final/model.safetensors"
    assert os.path.samefile(copy, final / "model.safetensors")  # a hard link, not a copy

    # What Snakemake does to a failed job: outputs deleted, the job's params recorded.
    import shutil
    shutil.rmtree(final)
    record.write_text(json.dumps({"params": ["lr=0.5"]}))

    assert kept_outputs.restore() == ["results/train/final"]  # metrics.json still exists: left alone
    assert (final / "model.safetensors").read_text() == "good weights"
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime  # older than what was made after it
    assert json.loads(record.read_text()) == {"params": ["lr=0.1"]}  # so the next run redoes the job
    assert kept_outputs.listed() == ["results/train/metrics.json"]
    assert kept_outputs.restore() == []


def test_a_new_file_never_writes_through_to_the_kept_copy(workdir):
    out = Path("results/bench/metrics.json")
    out.parent.mkdir(parents=True)
    out.write_text("old")
    kept_outputs.save([str(out)])
    out.unlink()  # Snakemake removes an output before its job writes it
    out.write_text("new")
    assert (kept_outputs.STATE / "files" / out).read_text() == "old"


def test_drop_forgets_outputs_that_exist_and_keeps_the_missing(workdir):
    for name in ("a.json", "b.json"):
        Path(name).write_text(name)
    kept_outputs.save(["a.json", "b.json"])
    Path("b.json").unlink()  # e.g. a job killed with `kill -9` on snakemake: no hook ran
    kept_outputs.drop()
    assert kept_outputs.listed() == ["b.json"]
    # A later start does not replace the copy of an output that is missing: it is still the last good one.
    kept_outputs.save(["a.json", "b.json"])
    assert (kept_outputs.STATE / "files" / "b.json").read_text() == "b.json"
    assert kept_outputs.restore() == ["b.json"] and Path("b.json").read_text() == "b.json"
    kept_outputs.drop()
    assert kept_outputs.listed() == [] and [p.name for p in kept_outputs.STATE.iterdir()] == [".lock"]


def test_two_runs_restore_and_drop_only_their_own_outputs(workdir):
    """Named runs (`--config run=a`, `run=b`) may run at once in one folder: disjoint outputs, one index."""
    a, b = Path("results/runs/a/train.json"), Path("results/runs/b/train.json")
    for out in (a, b):
        out.parent.mkdir(parents=True)
        out.write_text(out.parent.name)
    kept_outputs.save([str(a)])
    kept_outputs.save([str(b)])
    assert kept_outputs.listed() == [str(a), str(b)]
    a.unlink()  # run a's job fails...
    b.unlink()  # ...while run b's job is still running (its output deleted by Snakemake)
    assert kept_outputs.restore([str(a)]) == [str(a)] and not b.exists()
    kept_outputs.drop([str(a)])  # run a succeeds next: b's copy stays, its job is still running
    assert kept_outputs.listed() == [str(b)]
    assert kept_outputs.restore([str(b)]) == [str(b)] and b.read_text() == "b"


def test_links_that_fail_fall_back_to_copies(workdir, monkeypatch):
    Path("out.txt").write_text("x")

    def no_links(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(kept_outputs.os, "link", no_links)
    kept = kept_outputs.save(["out.txt"])
    assert kept.copied == ["out.txt"]
    assert not os.path.samefile(kept_outputs.STATE / "files" / "out.txt", "out.txt")


def test_a_damaged_index_names_the_file(workdir):
    kept_outputs.STATE.mkdir(parents=True)
    (kept_outputs.STATE / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"kept-outputs/index.json: not the index of kept outputs"):
        kept_outputs.restore()


def test_cli_restores_by_hand(workdir):
    Path("out.txt").write_text("x")
    kept_outputs.save(["out.txt"])
    Path("out.txt").unlink()
    proc = subprocess.run([sys.executable, "-m", "portraitgen", "kept-outputs", "restore"], capture_output=True,
                          text=True, check=True)
    assert "restored out.txt" in proc.stdout and Path("out.txt").read_text() == "x"

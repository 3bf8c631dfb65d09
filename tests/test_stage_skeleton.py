"""What every stage shares: atomic writes (portraitgen/io.py), part options and files and the tracked
run (portraitgen/stage.py), and the curate manifest (portraitgen/manifest.py)."""
from __future__ import annotations

import os

import pandas as pd
import pytest

from portraitgen import manifest
from portraitgen.io import atomic_dir, atomic_write, atomic_write_bytes, atomic_write_text, publish_dir
from portraitgen.stage import Parts, part_command, part_file, part_pattern, tracked


# ---------------------------------------------------------------------------------------------- io
def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    assert path.read_text() == "old"

    def torn(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, torn)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]  # no temporary left
    atomic_write_bytes(path, b"new", fsync=True)
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_dir_replaces_a_folder_whole_and_keeps_it_on_error(tmp_path):
    dest = tmp_path / "final"
    with atomic_dir(dest) as tmp:
        (tmp / "weights").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "weights").write_text("2")
            raise RuntimeError("killed mid-export")
    assert (dest / "weights").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["final"]
    with atomic_dir(dest) as tmp:
        (tmp / "other").write_text("3")
    assert os.listdir(dest) == ["other"] and sorted(os.listdir(tmp_path)) == ["final"]  # replaced, not merged


def test_publish_dir_lets_the_first_complete_build_win(tmp_path):
    first, second, dest = tmp_path / ".a", tmp_path / ".b", tmp_path / "cache"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "model_index.json").write_text(text)
    assert publish_dir(first, dest, complete="model_index.json") is True
    (second / "more").write_text("x")  # os.rename fails onto a non-empty folder
    assert publish_dir(second, dest, complete="model_index.json") is False
    assert (dest / "model_index.json").read_text() == "first" and not second.exists()


# ---------------------------------------------------------------------------------------------- parts
class StageError(ValueError):
    pass


@pytest.mark.parametrize("args, message", [
    ((None, 0, False), "--num-parts must be at least 1, got 0"),
    ((3, 3, False), "--part 3 is outside 0..2"),
    ((-1, 3, False), "--part -1 is outside 0..2"),
    ((0, 3, True), "--merge-only gathers every part: leave out --part"),
    ((None, 1, True), "--merge-only gathers the part files of --num-parts N part jobs"),
])
def test_part_options_are_checked_with_the_stage_error(args, message):
    with pytest.raises(StageError, match=message):
        Parts.checked(*args, error=StageError)


def test_what_each_invocation_runs():
    assert Parts.checked(None, 3, False).to_run == [0, 1, 2] and not Parts.checked(None, 3, False).scattered
    job = Parts.checked(1, 3, False)
    assert job.to_run == [1] and job.scattered and job.label(1) == " part 1/3"
    merge = Parts.checked(None, 3, True)
    assert merge.to_run == [] and not merge.scattered
    assert Parts.checked(0, 1, False).to_run == [0] and not Parts.checked(0, 1, False).scattered
    # A merge that reads content-addressed outputs rather than part files (invert) accepts one part.
    assert Parts.checked(None, 1, True, merge_reads_parts=False).to_run == []


def test_part_files_and_the_command_that_makes_one(tmp_path):
    assert part_file(tmp_path, 2, 8, "jsonl") == tmp_path / "parts" / "part-0002-of-0008.jsonl"
    assert part_pattern("{root}/curate", 8, "jsonl") == "{root}/curate/parts/part-{part}-of-0008.jsonl"
    assert part_command("bench", "results/bench", 2, 8, "p.yaml") == \
        "portraitgen bench --params p.yaml --out results/bench --part 2 --num-parts 8"


def test_tracked_ends_the_run_finished_or_failed(monkeypatch):
    ended = []

    class FakeTracker:
        def __init__(self, cfg, **kwargs):
            self.kwargs = kwargs

        def end(self, status="FINISHED"):
            ended.append(status)

    monkeypatch.setattr("portraitgen.tracking.Tracker", FakeTracker)
    with tracked(None, "curate", params={"a": 1}, run_id="r1") as tracker:
        assert tracker.kwargs["stage"] == "curate" and tracker.kwargs["run_id"] == "r1"
    with pytest.raises(KeyError):
        with tracked(None, "curate"):
            raise KeyError("bad input")
    assert ended == ["FINISHED", "FAILED"]


# ---------------------------------------------------------------------------------------------- manifest
def test_the_split_depends_on_the_id_alone():
    ids = [f"img{i:04d}" for i in range(2000)]
    splits = [manifest.split_of(i, 0, 0.1) for i in ids]
    assert set(splits) == set(manifest.SPLITS) and 0.07 < splits.count(manifest.BENCH_REFERENCE) / 2000 < 0.13
    assert [manifest.split_of(i, 0, 0.1) for i in reversed(ids)] == splits[::-1]
    assert splits != [manifest.split_of(i, 1, 0.1) for i in ids]  # the seed moves the split


def _rows(n):
    return [{"id": f"i{k}", "content_hash": f"h{k}", "image_path": f"images/i{k}.png", "caption": f"c{k}",
             "split": manifest.split_of(f"i{k}", 0, 0.5)} for k in range(n)]


def test_written_manifest_reads_back_by_split(tmp_path):
    rows = _rows(12)
    path = manifest.write_manifest(tmp_path / manifest.FILE, rows, {"source": "test"})
    again = tmp_path / "again.parquet"
    manifest.write_manifest(again, rows, {"source": "test"})
    assert path.read_bytes() == again.read_bytes()  # deterministic
    train = manifest.read_manifest(path)
    ref = manifest.read_manifest(path, split=manifest.BENCH_REFERENCE)
    assert sorted(train["id"]) + sorted(ref["id"]) == sorted(r["id"] for r in rows if r["split"] == "train") + \
        sorted(r["id"] for r in rows if r["split"] == "bench_reference")
    assert list(train["id"]) == sorted(train["id"])
    assert train["image_file"][0] == str((tmp_path / train["image_path"][0]).resolve())


def test_manifest_errors_name_the_file_and_the_key(tmp_path):
    with pytest.raises(manifest.ManifestError, match="bench.reference: manifest not found"):
        manifest.read_manifest(tmp_path / "none.parquet", key="bench.reference")
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"id": ["a"], "caption": ["x"]}).to_parquet(bad)
    with pytest.raises(StageError, match=r"bad.parquet: missing column\(s\) content_hash, image_path"):
        manifest.read_manifest(bad, error=StageError)
    only_ref = tmp_path / "ref.parquet"
    pd.DataFrame([{**r, "split": "bench_reference"} for r in _rows(3)]).to_parquet(only_ref)
    assert manifest.read_manifest(only_ref).empty
    with pytest.raises(manifest.ManifestError, match="has no exemplars in its train split \\(3 row\\(s\\) in all\\)"):
        manifest.read_manifest(only_ref, nonempty=True)
    no_split = tmp_path / "list.parquet"
    pd.DataFrame([{k: v for k, v in r.items() if k != "split"} for r in _rows(3)]).to_parquet(no_split)
    assert len(manifest.read_manifest(no_split)) == 3  # a hand-made list is all one split

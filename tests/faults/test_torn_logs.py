"""Append-only logs survive a torn write (issue 15, item 2): a partial last line left by a kill or a
full disk is dropped on resume with a warning naming the file; damage elsewhere is a named error."""
from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from portraitgen import jsonl
from portraitgen.config import params_from_dict
from portraitgen.training import GRPOTrainer

from helpers import fast_params


def test_repair_drops_a_torn_last_line_and_names_the_file(tmp_path, caplog):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"iteration": 0}\n{"iteration": 1}\n{"iterat')
    with caplog.at_level(logging.WARNING):
        kept = jsonl.repair(path, keep=lambda r: r["iteration"] < 1)
    assert kept == [{"iteration": 0}] and path.read_text() == '{"iteration": 0}\n'
    assert f"{path}: dropped a partial last line" in caplog.text
    # A newline-terminated but incomplete last line is torn too.
    path.write_text('{"iteration": 0}\n{"iter\n')
    assert jsonl.read(path) == [{"iteration": 0}]
    path.write_text('{"iteration": 0}\n{"iter\n{"iteration": 2}\n')
    with pytest.raises(jsonl.JsonlError, match=rf"{path}: line 2 is not valid JSON"):
        jsonl.repair(path)


def test_a_failed_append_leaves_at_most_a_partial_last_line(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    jsonl.append(path, [{"a": 1}])
    real_write = os.write

    def disk_full(fd, data):  # the disk takes 5 bytes, then is full
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError):
        jsonl.append(path, [{"b": 2}, {"c": 3}])
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}\n{"b":'
    assert jsonl.repair(path) == [{"a": 1}] and path.read_text() == '{"a": 1}\n'


def _params(**overrides):
    return params_from_dict(fast_params(**{"train.iterations": 1, "train.checkpoint_every": 1, **overrides}))


def test_training_resumes_after_a_torn_samples_and_metrics_line(tmp_path, caplog):
    out = tmp_path / "out"
    GRPOTrainer(_params(), out).run()
    for name in ("samples.jsonl", "metrics.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"iteration": 1, "sample_ind')  # the write a SIGKILL or a full disk interrupted
    with caplog.at_level(logging.WARNING):
        GRPOTrainer(_params(**{"train.iterations": 2}), out).run()
    assert f"{out / 'samples.jsonl'}: dropped a partial last line" in caplog.text
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({s["iteration"] for s in samples}) == [0, 1] and len(samples) == 2 * 8
    assert [m["iteration"] for m in metrics] == [0, 1]


def test_a_full_disk_during_training_is_resumable(tmp_path, monkeypatch):
    """The disk fills up in the middle of an iteration's samples.jsonl append (a size-limited writer):
    the run stops with the OS error; the rerun resumes from the last checkpoint and ends with the logs
    of an uninterrupted run."""
    params = _params(**{"train.iterations": 2})
    GRPOTrainer(params, tmp_path / "ref").run()

    out = tmp_path / "out"
    real_write = os.write
    appends = []

    def size_limited(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("samples.jsonl"):
            appends.append(len(data))
            if len(appends) == 2:  # iteration 1: 10 bytes fit, then the disk is full
                real_write(fd, bytes(data[:10]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", size_limited)
    with pytest.raises(OSError, match="No space left"):
        GRPOTrainer(params, out).run()
    monkeypatch.undo()
    assert not (out / "samples.jsonl").read_text().endswith("\n")  # a torn last line
    GRPOTrainer(params, out).run()

    def rows(folder, name):
        return [{k: v for k, v in json.loads(ln).items() if not k.startswith("time/")}
                for ln in (folder / name).read_text().splitlines()]

    assert rows(out, "samples.jsonl") == rows(tmp_path / "ref", "samples.jsonl")
    assert rows(out, "metrics.jsonl") == rows(tmp_path / "ref", "metrics.jsonl")

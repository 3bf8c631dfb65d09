"""Tracking never costs the work (issue 15, item 6): an unreachable server is found by one short
probe and either stops the stage before it starts or falls back to a local record; MLFLOW_TRACKING_URI
wins over params; a failing call mid-run is a warning; a run ended by SIGTERM is marked KILLED."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from portraitgen.cli import main
from portraitgen.config import TrackingConfig
from portraitgen.tracking import Tracker, TrackingUnreachableError, probe

from helpers import write_params

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PORTRAITGEN_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("PORTRAITGEN_SYSTEM_METRICS", "0")


def _status(uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).info.status


def test_the_environment_uri_wins_over_params(tmp_path, monkeypatch):
    env_uri, params_uri = f"sqlite:///{tmp_path}/env.db", f"sqlite:///{tmp_path}/params.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    tracker = Tracker(TrackingConfig(uri=params_uri), stage="test", active=True)
    tracker.end()
    assert tracker.uri == env_uri and _status(env_uri, tracker.run_id) == "FINISHED"
    assert not (tmp_path / "params.db").exists()


def test_a_silent_server_is_detected_within_the_probe_timeout(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts connections, never answers
    try:
        t0 = time.monotonic()
        reason = probe(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=1.0)
        assert reason and time.monotonic() - t0 < 3.0
    finally:
        server.close()


def test_an_unreachable_server_fails_before_the_stage_starts():
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachableError, match=r"MLflow tracking at http://127.0.0.1:9 \(tracking.uri in "
                                                       r"params\) is unreachable.*on_unreachable: continue"):
        Tracker(TrackingConfig(uri=DEAD), stage="test", active=True)
    assert time.monotonic() - t0 < 10


def test_continue_records_the_run_locally_with_a_warning(tmp_path, caplog):
    fallback = f"sqlite:///{tmp_path}/fallback.db"
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(TrackingConfig(uri=DEAD, on_unreachable="continue", fallback_uri=fallback),
                          stage="test", active=True)
    tracker.log_metrics({"x": 1.0}, step=0)
    tracker.end()
    assert tracker.uri == fallback and _status(fallback, tracker.run_id) == "FINISHED"
    assert "is unreachable" in caplog.text and "recording this run in" in caplog.text


def test_a_failing_call_mid_run_is_a_warning(tmp_path, monkeypatch, caplog):
    import mlflow

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db"), stage="test", active=True)

    def gone(*args, **kwargs):
        raise ConnectionError("server went away")

    monkeypatch.setattr(mlflow, "log_metrics", gone)
    with caplog.at_level(logging.WARNING):
        tracker.log_metrics({"x": 1.0}, step=0)  # no exception
        tracker.log_dict({"a": 1}, "a.json")
    assert "MLflow log_metrics failed (ConnectionError: server went away)" in caplog.text
    assert not tracker.enabled
    monkeypatch.undo()
    mlflow.end_run()


SIGTERMED = """
import sys, time
from portraitgen.config import TrackingConfig
from portraitgen.tracking import Tracker
t = Tracker(TrackingConfig(uri=sys.argv[1]), stage="test", active=True)
print(t.run_id, flush=True)
time.sleep(60)
"""


def test_a_run_ended_by_sigterm_is_marked_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/k.db"
    env = dict(os.environ, PORTRAITGEN_SYSTEM_METRICS="0")
    proc = subprocess.Popen([sys.executable, "-c", SIGTERMED, uri], stdout=subprocess.PIPE, text=True, env=env)
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert _status(uri, run_id) == "KILLED"


def test_train_with_a_dead_server_stops_in_seconds_and_writes_nothing(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", **{"tracking.enabled": True, "tracking.uri": DEAD})
    t0 = time.monotonic()
    assert main(["train", "--params", str(params), "--out", str(tmp_path / "train")]) == 2
    assert time.monotonic() - t0 < 60  # was ~4 minutes of retries, after the work
    assert "MLflow tracking at http://127.0.0.1:9" in capsys.readouterr().err
    assert not (tmp_path / "train" / "checkpoints").exists() and not (tmp_path / "train" / "final").exists()


def test_a_stage_that_logs_at_its_end_checks_the_server_before_its_work(tmp_path, capsys):
    """curate logs to MLflow after curating: with a dead server it must stop first, not after the work."""
    params = write_params(tmp_path / "params.yaml", **{"tracking.enabled": True, "tracking.uri": DEAD})
    out = tmp_path / "curate"
    assert main(["curate", "--params", str(params), "--out", str(out), "--workers", "1"]) == 2
    assert "MLflow tracking at http://127.0.0.1:9" in capsys.readouterr().err
    assert not (out / "manifest.parquet").exists() and not (out / "cache").exists()

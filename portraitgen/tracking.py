"""MLflow tracking for a stage: one run per stage, logged from the main process only.

A pipeline invocation may group its stages under a parent run: set ``PORTRAITGEN_PARENT_RUN_ID`` (not
``MLFLOW_RUN_ID``, which would make every stage *resume* the same run) and each stage's run is tagged
as its child. A resumed training run continues the MLflow run it started (its id is checkpointed).

Tracking never costs the work (docs/robustness.md):

- Where runs go: ``MLFLOW_TRACKING_URI`` in the environment wins over ``tracking.uri`` in params (so a
  cluster profile or a shell can redirect every stage without editing params).
- A server is probed once, with a short timeout (``PORTRAITGEN_TRACKING_PROBE_TIMEOUT``, default 5 s),
  before the stage's run starts. Unreachable: ``tracking.on_unreachable: fail`` stops the stage at once
  with a message saying what to do; ``continue`` warns and records the run in ``tracking.fallback_uri``
  (a local SQLite store) instead.
- Once a run has started, a failing MLflow call is a warning, never the end of the stage: the run's
  remaining calls go to nothing (the stage's own outputs, metrics.json/jsonl, are unaffected). MLflow's
  HTTP retries are bounded (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT`` default to 2 and 20 s here).
- A run ended by SIGTERM (Snakemake/SLURM cancelling the job) is marked KILLED, not left RUNNING or
  FINISHED.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import TrackingConfig
from .run_context import experiment_parent, run_tags

log = logging.getLogger(__name__)
PARENT_ENV = "PORTRAITGEN_PARENT_RUN_ID"
URI_ENV = "MLFLOW_TRACKING_URI"


class TrackingUnreachableError(RuntimeError):
    """The tracking server does not answer and ``tracking.on_unreachable`` is ``fail``."""


def configured_uri(cfg: TrackingConfig) -> tuple[str, str]:
    """``(uri, where it came from)``: the environment's MLFLOW_TRACKING_URI wins over params."""
    env = os.environ.get(URI_ENV, "").strip()
    return (env, f"${URI_ENV}") if env else (cfg.uri, "tracking.uri in params")


def probe(uri: str, timeout: float | None = None) -> str | None:
    """None when ``uri`` can take runs, else why not. One request, ``timeout`` seconds at most; only
    servers (http/https) and local stores whose folder is missing can fail it."""
    timeout = float(os.environ.get("PORTRAITGEN_TRACKING_PROBE_TIMEOUT", 5)) if timeout is None else timeout
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return None  # it answered (e.g. 401/404 from a proxy): reachable
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return str(getattr(exc, "reason", exc))
        return None
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix):
            target = Path(uri[len(prefix):]).expanduser().absolute()
            parent = target.parent if prefix == "sqlite:///" else target
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not os.access(parent, os.W_OK):
                return f"{parent} is not writable"
    return None


_PROBED: dict[str, tuple[float, str | None]] = {}  # uri -> (when, probe result): one probe per stage
PROBE_REUSE_S = 60.0


def resolve_uri(cfg: TrackingConfig) -> str:
    """The URI runs go to, checked by one probe: the configured one, or the fallback store when it is
    unreachable and ``on_unreachable`` is ``continue``. Raises :class:`TrackingUnreachableError` otherwise.
    A probe's result is reused for a minute (the CLI probes before the stage starts, the stage's run again)."""
    uri, source = configured_uri(cfg)
    when, reason = _PROBED.get(uri, (0.0, None))
    if time.monotonic() - when > PROBE_REUSE_S:
        reason = probe(uri)
        _PROBED[uri] = (time.monotonic(), reason)
    if reason is None:
        return uri
    if getattr(cfg, "on_unreachable", "fail") == "continue":
        log.warning("MLflow tracking at %s (%s) is unreachable (%s): recording this run in %s instead "
                    "(tracking.on_unreachable: continue)", uri, source, reason, cfg.fallback_uri)
        return cfg.fallback_uri
    raise TrackingUnreachableError(
        f"MLflow tracking at {uri} ({source}) is unreachable: {reason}. Start the server, point "
        f"{URI_ENV} or tracking.uri at a reachable one, or set tracking.on_unreachable: continue (runs are then "
        f"recorded in tracking.fallback_uri, {cfg.fallback_uri}) or tracking.enabled: false")


def check_before_start(params_path: str | Path) -> None:
    """The CLI's check before a stage starts: an unreachable tracking server with ``on_unreachable: fail``
    stops it before any work (several stages log to MLflow only at their end). Main process only."""
    from .config import load_params

    if os.environ.get("RANK", "0") != "0":
        return
    cfg = load_params(params_path).tracking
    if cfg.enabled:
        resolve_uri(cfg)


def set_mlflow_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect of exporting MLFLOW_TRACKING_URI: that variable
    must keep meaning "set by the user" (it wins over params), not "set by an earlier run in this process"."""
    import mlflow

    before = os.environ.get(URI_ENV)
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop(URI_ENV, None)
    else:
        os.environ[URI_ENV] = before


def bounded_http_retries() -> None:
    """MLflow retries a failing HTTP call for minutes by default; a stage should not wait that long."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _guarded(method: Callable) -> Callable:
    """A logging call that warns instead of raising: tracking never ends the stage's work."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # the server went away, a quota, a malformed value: the work goes on
            self.enabled = False
            log.warning("MLflow %s failed (%s: %s); the rest of this run is not tracked (the stage's own "
                        "outputs are unaffected)", method.__name__, type(exc).__name__, exc)
            return None

    return wrapper


class Tracker:
    """Thin wrapper over MLflow that does nothing when disabled or off the main process."""

    def __init__(self, cfg: TrackingConfig, *, stage: str, active: bool, run_id: str | None = None,
                 params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None):
        self.enabled = bool(cfg.enabled and active)
        self.run_id: str | None = None
        if not self.enabled:
            return
        import mlflow

        self._mlflow = mlflow
        bounded_http_retries()
        self.uri = resolve_uri(cfg)  # one short probe: an unreachable server fails here, or falls back
        set_mlflow_uri(self.uri)
        experiment = mlflow.set_experiment(cfg.experiment)
        # Every stage run names the commit it ran and, inside `dvc exp run`, its DVC experiment (run_context).
        all_tags = {**run_tags(), "portraitgen.stage": stage, **(tags or {})}
        parent = os.environ.get(PARENT_ENV)
        try:
            parent = experiment_parent(mlflow.tracking.MlflowClient(), experiment.experiment_id, parent)
        except Exception as exc:  # the stage's own run matters more than its grouping
            log.warning("cannot file this run under its DVC experiment's parent run (%s)", exc)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = None
        # CPU/GPU utilisation and memory of the stage, sampled by MLflow in a background thread (psutil;
        # GPU figures need pynvml). Short stages still get a few samples.
        system_metrics = os.environ.get("PORTRAITGEN_SYSTEM_METRICS", "1") != "0"
        if system_metrics:
            from mlflow.system_metrics import set_system_metrics_samples_before_logging, \
                set_system_metrics_sampling_interval

            set_system_metrics_sampling_interval(2)
            set_system_metrics_samples_before_logging(1)
        if run_id:
            try:  # continue the run this training started before it was interrupted
                run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
            except Exception as exc:  # e.g. a fresh tracking store: log to a new run instead
                log.warning("cannot continue MLflow run %s (%s); starting a new run", run_id, exc)
        if run is None:
            run = mlflow.start_run(run_name=stage, tags=all_tags, log_system_metrics=system_metrics)
            if params:
                # MLflow caps a param value at 6000 chars and a batch at 100 params.
                items = [(k, str(v)[:6000]) for k, v in params.items()]
                for i in range(0, len(items), 100):
                    mlflow.log_params(dict(items[i:i + 100]))
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) at %s", self.run_id, stage, self.uri)
        self._previous_sigterm = None
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        """SIGTERM (a cancelled job): mark the run KILLED, then exit as the signal would have."""
        if os.getpid() != self._pid:  # a forked worker (curate's pool) inherited this handler: not its run
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("SIGTERM: marking MLflow run %s KILLED", self.run_id)
        self.end("KILLED")
        raise SystemExit(128 + signum)

    @_guarded
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    @_guarded
    def log_image(self, image, artifact_file: str) -> None:
        if self.enabled:
            self._mlflow.log_image(image, artifact_file=artifact_file)

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_guarded
    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """A whole folder in one call (one round trip to a remote store instead of one per file)."""
        if self.enabled:
            self._mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)

    @_guarded
    def log_table(self, data, artifact_file: str) -> None:
        """A DataFrame as an MLflow table (viewable and comparable in the UI's artifact/evaluation views)."""
        if self.enabled:
            self._mlflow.log_table(data, artifact_file=artifact_file)

    @_guarded
    def log_dataset(self, path: str | Path, *, name: str, context: str) -> None:
        """A parquet table (e.g. the curated manifest) as the run's dataset input: its name, source path,
        digest and schema show in the run's "Datasets" panel and link runs that used the same data."""
        if self.enabled:
            import mlflow.data
            import pandas as pd

            dataset = mlflow.data.from_pandas(pd.read_parquet(path), source=str(Path(path).resolve()), name=name)
            self._mlflow.log_input(dataset, context=context)

    @_guarded
    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.enabled:
            self._mlflow.log_dict(data, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        previous = getattr(self, "_previous_sigterm", None)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
            self._previous_sigterm = None
        self._end_run(status)

    @_guarded
    def _end_run(self, status: str) -> None:
        if self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)

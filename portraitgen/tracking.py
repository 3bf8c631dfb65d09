"""MLflow tracking for a stage: one run per stage, logged from the main process only.

A pipeline invocation may group its stages under a parent run: set ``PORTRAITGEN_PARENT_RUN_ID`` (not
``MLFLOW_RUN_ID``, which would make every stage *resume* the same run) and each stage's run is tagged
as its child. A resumed training run continues the MLflow run it started (its id is checkpointed).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from .config import TrackingConfig
from .run_context import experiment_parent, run_tags

log = logging.getLogger(__name__)
PARENT_ENV = "PORTRAITGEN_PARENT_RUN_ID"


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
        mlflow.set_tracking_uri(cfg.uri)
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
        log.info("MLflow run %s (%s) at %s", self.run_id, stage, cfg.uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_image(self, image, artifact_file: str) -> None:
        if self.enabled:
            self._mlflow.log_image(image, artifact_file=artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """A whole folder in one call (one round trip to a remote store instead of one per file)."""
        if self.enabled:
            self._mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)

    def log_table(self, data, artifact_file: str) -> None:
        """A DataFrame as an MLflow table (viewable and comparable in the UI's artifact/evaluation views)."""
        if self.enabled:
            self._mlflow.log_table(data, artifact_file=artifact_file)

    def log_dataset(self, path: str | Path, *, name: str, context: str) -> None:
        """A parquet table (e.g. the curated manifest) as the run's dataset input: its name, source path,
        digest and schema show in the run's "Datasets" panel and link runs that used the same data."""
        if self.enabled:
            import mlflow.data
            import pandas as pd

            dataset = mlflow.data.from_pandas(pd.read_parquet(path), source=str(Path(path).resolve()), name=name)
            self._mlflow.log_input(dataset, context=context)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.enabled:
            self._mlflow.log_dict(data, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)

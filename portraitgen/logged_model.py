"""The trained model in MLflow: the train run holds its summary figures as metrics and the exported
weights (``final/``: a LoRA adapter or a full pipeline, with ``portraitgen.json``) as the artifact folder
``model``, so a run found in the UI can be loaded back without the results folder it came from::

    from portraitgen.logged_model import load_logged_model
    policy = load_logged_model("runs:/<run_id>/model")          # a FlowPolicy, LoRA applied to its base

    portraitgen generate --model runs:/<run_id>/model --prompt "a portrait photo of a woman"

A LoRA model names its base model (``portraitgen.json``: a path or ``builtin:...``), which must exist
where it is loaded; a full fine-tune is self-contained.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

ARTIFACT_PATH = "model"
SUMMARY_PREFIX = "summary/"
URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``summary/<key>`` for every finite number of a stage's summary (booleans and text left out)."""
    return {f"{SUMMARY_PREFIX}{k}": float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def training_datasets(params) -> list[tuple[Path, str]]:
    """(file, dataset name) of the real data a training run read: the curated manifest and the exemplar
    index, when real exemplars or the supervised loss are on and the files exist."""
    if params.train.exemplars.per_group <= 0 and params.train.sft.share <= 0:
        return []
    found = [(Path(params.invert.manifest), "curated-portraits"),
             (Path(params.train.exemplars.index), "exemplar-index")]
    return [(path, name) for path, name in found if path.is_file()]


def log_trained_model(tracker, summary: Mapping[str, Any], final_dir: str | Path, *,
                      datasets: list[tuple[Path, str]] = ()) -> None:
    """Summary figures as metrics, ``final_dir`` as the run's ``model`` artifact folder, and the real data
    it was trained on as dataset inputs."""
    if tracker is None or not getattr(tracker, "enabled", False):
        return
    tracker.log_metrics(summary_metrics(summary), step=int(summary.get("iterations", 0) or 0))
    tracker.log_artifacts(final_dir, ARTIFACT_PATH)
    for path, name in datasets:
        tracker.log_dataset(path, name=name, context="training")


def is_model_uri(model: str) -> bool:
    return model.startswith(URI_SCHEMES)


def download_model(uri: str, dst: str | Path | None = None) -> Path:
    """The local folder of a logged model (``runs:/<run_id>/model``), downloaded from the tracking store
    set by ``MLFLOW_TRACKING_URI`` (or ``mlflow.set_tracking_uri``)."""
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))


def load_logged_model(uri: str, *, device: str = "cpu", dst: str | Path | None = None):
    """Download a logged model and load it for generation (see :func:`portraitgen.export.load_trained`)."""
    from .export import load_trained

    return load_trained(str(download_model(uri, dst)), device=device)

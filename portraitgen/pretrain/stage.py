"""``portraitgen pretrain``: the toy base model and its planted-artifact detector.

    portraitgen pretrain --params params.yaml --out results/pretrain

Outputs (under ``--out``):

- ``model/``: a diffusers ``StableDiffusion3Pipeline`` folder (``model_index.json``; the EMA
  transformer, the pixel codec as its VAE, the tiny text encoders), the default ``model.path``;
  ``model/pretrain_key.json`` records what it was made from;
- ``artifact_detector/``: the planted-artifact CNN (``config.json``, ``model.safetensors``,
  ``report.json`` with its held-out AUC / recall / false-positive rate, ``key.json``);
- ``metrics.json``: training time and loss, face hit rate and artifact rate of ``eval_samples`` base
  samples beside the same figures on real faces; ``samples.png`` (a grid of them), ``loss.csv``;
- an MLflow run (stage ``pretrain``, a child of the pipeline's parent run).

Reuse. Each of the two folders has a content key: a hash of the source photos' bytes, the settings
that shape it (the ``pretrain`` section and ``model.resolution``; the detector's key leaves out what
only the generator uses, such as the artifact fraction, so a clean control is scored by the same
detector) and :data:`FORMAT`. A run whose key matches the folder's leaves it untouched (a no-op); a
changed key rebuilds it in a temporary sibling that replaces it only when complete
(:func:`portraitgen.io.atomic_dir`), so an interrupted run never leaves half a model behind.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import Params, flatten
from ..io import atomic_dir, atomic_write, atomic_write_text
from ..stage import tracked
from .artifact_detector import DetectorSettings, train_detector
from .artifact_detector import load as load_detector
from .captions import face_captions
from .evaluate import SAMPLE_GUIDANCE, SAMPLE_STEPS
from .faces import load_faces, source_digest, split_faces

log = logging.getLogger(__name__)

# Bump when what the stage makes from the same inputs changes: existing outputs are rebuilt.
# 2: prompt embeddings computed without T5 dropout (model.build_pipeline).
# 3: captions in PortraitBench's vocabulary too (captions.bench_phrase).
FORMAT = 3
MODEL_DIR = "model"
DETECTOR_DIR = "artifact_detector"
MODEL_KEY = "pretrain_key.json"
DETECTOR_KEY = "key.json"
# Settings that change the samples' figures but not the model or the detector.
EVAL_ONLY = ("eval_samples",)


class PretrainError(ValueError):
    """The params ask for something the pretraining stage cannot make."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def model_key(params: Params, data_digest: str) -> str:
    section = {k: v for k, v in asdict(params.pretrain).items() if k not in EVAL_ONLY + ("detector",)}
    return _digest({"format": FORMAT, "data": data_digest, "resolution": params.model.resolution,
                    "pretrain": section})


def detector_settings(params: Params) -> DetectorSettings:
    r = params.pretrain
    return DetectorSettings(kind=r.artifact.kind, size=params.model.resolution, width=r.detector.width,
                            steps=r.detector.steps, lr=r.detector.lr, threshold=r.detector.threshold, seed=r.seed)


def detector_key(params: Params, data_digest: str) -> str:
    return _digest({"format": FORMAT, "data": data_digest, "holdout": params.pretrain.holdout,
                    "settings": asdict(detector_settings(params))})


def _current(folder: Path, key_file: str, key: str) -> bool:
    path = folder / key_file
    try:
        return json.loads(path.read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def build_training(params: Params, train_faces):
    """The freshly initialised pipeline, its caption table, the training data and the loop's settings
    (``pretrain`` section): everything :func:`.train.train` needs (also used by benchmarks/pretrain_sweep.py)."""
    from .model import build_pipeline, encode_prompts
    from .train import TrainSettings, TrainingData

    r = params.pretrain
    pipe = build_pipeline(params.model.resolution, r.num_layers, r.width, r.scheduler_shift, r.seed)
    rng = np.random.default_rng(r.seed)
    captions = [face_captions(f, rng) for f in train_faces]
    table = sorted({c for cs in captions for c in cs} | {""})
    row = {c: i for i, c in enumerate(table)}
    cond = encode_prompts(pipe, table)
    data = TrainingData(faces=list(train_faces), caption_ids=[[row[c] for c in cs] for cs in captions],
                        empty_id=row[""], embeds=cond["prompt_embeds"], pooled=cond["pooled_projections"])
    settings = TrainSettings(steps=r.steps, batch_size=r.batch_size, lr=r.lr, warmup_steps=r.warmup_steps,
                             ema_decay=r.ema_decay, caption_dropout=r.caption_dropout,
                             artifact_kind=r.artifact.kind, artifact_fraction=r.artifact.fraction, seed=r.seed)
    return pipe, table, data, settings


def _train_model(params: Params, train_faces, dest: Path, key: str, tracker) -> dict:
    from .train import train

    r = params.pretrain
    pipe, table, data, settings = build_training(params, train_faces)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    log.info("pretraining a %.2f M-parameter SD3 transformer (%d layers x %d) on %d faces at %d px, %d steps of %d "
             "views, artifact %r on %.0f %% of them", n_params / 1e6, r.num_layers, r.width, len(train_faces),
             params.model.resolution, r.steps, r.batch_size, r.artifact.kind, 100 * r.artifact.fraction)
    result, ema = train(pipe.transformer, data, settings,
                        on_log=lambda step, m: tracker.log_metrics(m, step))
    ema_params = {n: p for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in ema_params.items():
            p.copy_(ema.shadow[n].to(p.dtype))
    losses = result.losses
    k = max(1, min(50, len(losses) // 4))
    record = {"train_seconds": result.seconds, "steps": len(losses), "transformer_parameters": n_params,
              "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
              "planted_view_share": result.planted_views / max(1, result.views), "training_faces": len(train_faces)}
    with atomic_dir(dest) as tmp:
        pipe.save_pretrained(str(tmp))
        (tmp / "captions.json").write_text(json.dumps(table, indent=0) + "\n")
        # The training record travels with the model: metrics.json is rebuilt from it when the model is reused.
        (tmp / MODEL_KEY).write_text(json.dumps({"key": key, "format": FORMAT, "training": record}, indent=1) + "\n")
    return {**record, "losses": losses}


def _write_loss_csv(path: Path, losses: list[float]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss"])
    for i, v in enumerate(losses, 1):
        w.writerow([i, f"{v:.6f}"])
    atomic_write_text(path, buf.getvalue())


def _evaluate(params: Params, out: Path, faces, held_faces, seed: int) -> dict:
    from ..images import image_grid
    from .artifact_detector import held_out_views
    from .evaluate import face_hit_rate, sample_images, sample_prompts

    r = params.pretrain
    det = load_detector(out / DETECTOR_DIR)
    start = time.perf_counter()
    samples = sample_images(out / MODEL_DIR, sample_prompts(r.eval_samples), params.model.resolution, seed)
    sample_seconds = time.perf_counter() - start
    real = torch.stack([torch.from_numpy(f.image) for f in faces])
    held = torch.stack([torch.from_numpy(f.image) for f in held_faces]) if held_faces else real[:0]
    figures = {"samples": len(samples), "sample_seconds": sample_seconds,
               "face_rate_samples": face_hit_rate(samples), "face_rate_real": face_hit_rate(real),
               "artifact_rate_samples": det.rate(samples)}
    if len(held):
        views, labels = held_out_views(held_faces, det.settings.kind, det.settings.seed)
        figures.update(artifact_rate_real_held_out=det.rate(held),
                       artifact_rate_real_planted_views=det.rate(views[labels == 1]))
    grid = image_grid(samples[:64], ncol=8)
    atomic_write(out / "samples.png", lambda tmp: grid.resize((grid.width * 3, grid.height * 3), 0).save(tmp, "PNG"))
    return figures


def run_pretrain(params: Params, out_dir: str | Path) -> dict:
    """Build (or reuse) the model and the detector under ``out_dir``; returns the figures of metrics.json."""
    if params.model.family != "sd3":
        raise PretrainError(f"params key 'model.family': pretraining builds an SD3-family model, got "
                            f"{params.model.family!r}")
    if params.model.resolution % 2:
        raise PretrainError(f"params key 'model.resolution': expected an even size, got {params.model.resolution}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = params.pretrain
    torch.manual_seed(r.seed)
    data_digest = source_digest()
    faces = load_faces(params.model.resolution)
    train_faces, held_faces = split_faces(faces, r.holdout, r.seed)
    mkey, dkey = model_key(params, data_digest), detector_key(params, data_digest)
    metrics_path = out / "metrics.json"
    eval_key = _digest({"model": mkey, "detector": dkey, "eval_samples": r.eval_samples,
                        "sampler": [SAMPLE_STEPS, SAMPLE_GUIDANCE]})
    model_current = _current(out / MODEL_DIR, MODEL_KEY, mkey) and (out / MODEL_DIR / "model_index.json").is_file()
    detector_current = _current(out / DETECTOR_DIR, DETECTOR_KEY, dkey)
    try:
        old = json.loads(metrics_path.read_text())
    except (OSError, ValueError):
        old = {}
    if model_current and detector_current and old.get("key") == eval_key:
        log.info("pretrain: %s and %s are current (keys %s, %s): nothing to do", out / MODEL_DIR,
                 out / DETECTOR_DIR, mkey, dkey)
        return old

    tracking_params = {f"pretrain.{k}": v for k, v in flatten(asdict(r)).items()}
    tracking_params["model.resolution"] = params.model.resolution
    with tracked(params.tracking, "pretrain", params=tracking_params) as tracker:
        metrics: dict = {"key": eval_key, "model_key": mkey, "detector_key": dkey,
                         "resolution": params.model.resolution, "artifact_kind": r.artifact.kind,
                         "sample_steps": SAMPLE_STEPS, "sample_guidance": SAMPLE_GUIDANCE,
                         "artifact_fraction": r.artifact.fraction}
        if model_current:
            log.info("pretrain: %s is current (key %s): reused", out / MODEL_DIR, mkey)
            metrics.update(json.loads((out / MODEL_DIR / MODEL_KEY).read_text()).get("training", {}))
            metrics["model_reused"] = True
        else:
            trained = _train_model(params, train_faces, out / MODEL_DIR, mkey, tracker)
            _write_loss_csv(out / "loss.csv", trained.pop("losses"))
            metrics.update(trained, model_reused=False)
        if detector_current:
            log.info("pretrain: %s is current (key %s): reused", out / DETECTOR_DIR, dkey)
            report = json.loads((out / DETECTOR_DIR / "report.json").read_text())
        else:
            detector, report = train_detector(train_faces, held_faces, detector_settings(params))
            with atomic_dir(out / DETECTOR_DIR) as tmp:
                detector.save(tmp)
                (tmp / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
                (tmp / DETECTOR_KEY).write_text(json.dumps({"key": dkey, "format": FORMAT}) + "\n")
            log.info("artifact detector: held-out AUC %.3f, recall %.3f, false positives %.3f",
                     report.get("held_out_auc", float("nan")), report.get("held_out_recall", float("nan")),
                     report.get("held_out_false_positive_rate", float("nan")))
        metrics.update({f"detector_{k}": v for k, v in report.items() if isinstance(v, (int, float))})
        metrics.update(_evaluate(params, out, faces, held_faces, r.seed))
        atomic_write_text(metrics_path, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool)}, step=r.steps)
        for name in ("metrics.json", "samples.png", "loss.csv"):
            if (out / name).is_file():
                tracker.log_artifact(out / name)
        tracker.log_artifacts(out / DETECTOR_DIR, artifact_path=DETECTOR_DIR)
    log.info("pretrain: face rate %.2f on %d samples (real faces %.2f); artifact rate %.2f on samples, %.2f on "
             "held-out real faces", metrics["face_rate_samples"], metrics["samples"], metrics["face_rate_real"],
             metrics["artifact_rate_samples"], metrics.get("artifact_rate_real_held_out", float("nan")))
    return metrics

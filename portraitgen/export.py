"""Exporting trained weights in the standard diffusers form, and reading them back.

- LoRA runs write ``final/pytorch_lora_weights.safetensors``, which the stock pipeline loads with
  ``pipe.load_lora_weights("results/train/final")`` on top of the base model.
- Full fine-tunes write a complete pipeline folder that ``<Pipeline>.from_pretrained`` loads.

Both also get ``portraitgen.json`` naming the family, the base model and how it was trained, so
``portraitgen generate --model results/train/final`` needs nothing else.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .integrity import IntegrityError, rerun, verify_folder, write_folder_checksums
from .io import atomic_dir
from .policies import FlowPolicy, family_list, load_policy

MANIFEST = "portraitgen.json"


class ModelSpecError(FileNotFoundError):
    """A --model argument names nothing that can be loaded."""


def export_policy(policy: FlowPolicy, out_dir: Path, *, base_model: str, family: str, finetune: str, lora,
                  ema: bool) -> Path:
    """Write the policy's current weights to ``out_dir`` (replaced atomically)."""
    out_dir = Path(out_dir)
    base = base_model if base_model.startswith("builtin:") else str(Path(base_model).expanduser().resolve())
    manifest = {"family": family, "base_model": base, "finetune": finetune, "ema": ema,
                "lora": dataclasses.asdict(lora) if finetune == "lora" else None}
    with atomic_dir(out_dir) as tmp:
        if finetune == "lora":
            policy.save_lora(tmp)
        else:
            policy.save_full(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        write_folder_checksums(tmp)  # SHA256SUMS, verified by load_trained (portraitgen/integrity.py)
    return out_dir


def load_trained(model: str, family: str | None = None, device="cpu") -> FlowPolicy:
    """Load a model for generation from any of:

    - a training output folder (``results/train``: its ``final/`` is used),
    - an exported ``final/`` folder (LoRA on its base model, or a full pipeline),
    - a plain diffusers pipeline folder or ``builtin:tiny`` (needs ``family``).

    A model logged to MLflow (``runs:/<run_id>/model``) is downloaded first by its caller
    (:func:`portraitgen.logged_model.load_logged_model`, ``portraitgen generate``): this module, which the
    logged model is made with, knows nothing of MLflow.
    """
    if model.startswith("builtin:"):
        if family is None:
            raise ModelSpecError(f"--model {model} needs --family ({family_list()})")
        return load_policy(family, model, device=device)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelSpecError(f"--model: {path} does not exist")
    if (path / "final" / MANIFEST).is_file():
        path = path / "final"
    manifest_file = path / MANIFEST
    if manifest_file.is_file():
        try:
            verify_folder(path, rerun("train", "portraitgen train --params params.yaml --out <the training folder>"),
                          what="exported model")
        except IntegrityError as exc:
            raise ModelSpecError(str(exc)) from None
        spec = json.loads(manifest_file.read_text())
        if spec["finetune"] == "full":
            return load_policy(spec["family"], str(path), device=device)
        policy = load_policy(spec["family"], spec["base_model"], device=device)
        policy.pipeline.load_lora_weights(str(path))
        return policy
    if (path / "model_index.json").is_file():
        if family is None:
            raise ModelSpecError(f"--model {path} is a plain diffusers folder: pass --family ({family_list()})")
        return load_policy(family, str(path), device=device)
    raise ModelSpecError(f"--model: {path} is neither a training output, an exported model "
                         f"({MANIFEST}) nor a diffusers pipeline folder (model_index.json)")

"""Checkpoints that resume training exactly.

A checkpoint folder ``checkpoint-<iteration>`` holds the trainable weights, optimizer, LR schedule,
EMA, the metric history and the RNG states. Every other random draw in training is derived from
``(seed, iteration, sample index)``, so these states plus the iteration number are all that is needed
for a resumed run to continue exactly as if it had never stopped.

Folders are written under a temporary name and renamed when complete (``state.json`` last), so a run
killed mid-save leaves no checkpoint that a later run would trust. Every file is listed with its SHA-256
in the folder's ``SHA256SUMS`` (portraitgen/integrity.py), verified before a resume reads anything: a
flipped bit is reported as a corrupt checkpoint, never resumed from.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .integrity import IntegrityError, verify_folder, write_folder_checksums
from .io import atomic_dir

_NAME = re.compile(r"^checkpoint-(\d{6})$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or was made with different training params."""


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(root: Path, iteration: int, *, trainable: dict[str, torch.Tensor], optimizer: dict,
                    scheduler: dict, ema: dict | None, state: dict[str, Any], keep: int) -> Path:
    """Write ``root/checkpoint-<iteration>`` atomically; keep only the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{iteration:06d}"
    # An existing folder of this iteration (saved by an earlier, interrupted run) is replaced whole.
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer, "scheduler": scheduler, "ema": ema, "rng": rng_state()},
                   tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "iteration": iteration}, indent=1, default=float))
        write_folder_checksums(tmp)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        verify_folder(path, f"move it away (`rm -r {path}`) and re-run: training resumes from the checkpoint "
                            f"before it, or from the start", what="checkpoint")
    except IntegrityError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        state = json.loads((path / "state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        training = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # a partial or damaged folder: say which one
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to "
                              f"resume from an earlier one") from exc
    return {"state": state, "trainable": trainable, **training}

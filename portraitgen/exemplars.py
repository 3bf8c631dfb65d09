"""Access to inverted exemplars during training (docs/design.md §4).

:class:`ExemplarBank` reads the invert stage's ``index.parquet``, checks that it was made for the
model and schedule being trained, and serves each exemplar's trajectory from its verified shard
(shards are loaded on first use and kept in memory).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import shards
from .integrity import IntegrityError, rerun, verify_if_recorded


class ExemplarError(ValueError):
    """The exemplar index is missing, stale, or does not fit the training run."""


class ExemplarBank:
    def __init__(self, index_path: str | Path, *, sigmas: torch.Tensor, model_fingerprint: str | None = None):
        path = Path(index_path)
        if not path.is_file():
            raise ExemplarError(f"train.exemplars.index: {path} not found (run `portraitgen invert` first)")
        try:  # verified before it is parsed (the invert stage records its checksum)
            verify_if_recorded(path, rerun("invert", "portraitgen invert --params params.yaml --out results/invert"), what="train.exemplars.index:")
        except IntegrityError as exc:
            raise ExemplarError(str(exc)) from None
        self.root = path.parent
        self.index = pd.read_parquet(path).reset_index(drop=True)
        if self.index.empty:
            raise ExemplarError(f"{path} lists no exemplars")
        if model_fingerprint is not None:
            stale = self.index["model_fingerprint"] != model_fingerprint
            if stale.any():
                raise ExemplarError(f"{path}: exemplars were inverted with another model (fingerprint "
                                    f"{self.index['model_fingerprint'][stale].iloc[0]}, now {model_fingerprint}); "
                                    f"re-run `portraitgen invert`")
        cfg = json.loads(self.index["config"].iloc[0])
        want = sigmas.numel() - 1
        if cfg.get("num_steps") != want:
            raise ExemplarError(f"{path}: inverted on {cfg.get('num_steps')} steps, training samples {want} "
                                f"(sample.num_steps); re-run `portraitgen invert`")
        self.sigmas = sigmas.float().cpu()
        self.captions = sorted(set(self.index["caption"]))
        self.rows_by_caption = {c: np.flatnonzero(self.index["caption"].to_numpy() == c) for c in self.captions}
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, name: str, checksum: str) -> dict[str, torch.Tensor]:
        if name not in self._cache:
            tensors, _ = shards.read_shard(self.root / name, expected=checksum)
            if not torch.allclose(tensors["sigmas"], self.sigmas, atol=1e-6):
                raise ExemplarError(f"{self.root / name}: its sigma schedule differs from training's "
                                    f"(model.resolution or the scheduler changed); re-run `portraitgen invert`")
            self._cache[name] = tensors
        return self._cache[name]

    def trajectory(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents [T+1, C, h, w], trainable [T] bool)`` of exemplar ``row``."""
        rec = self.index.iloc[row]
        tensors = self._shard(rec["shard"], rec["checksum"])
        off = int(rec["offset"])
        return tensors["latents"][off], tensors["trainable"][off].bool()

    def exemplar_id(self, row: int) -> str:
        return str(self.index["id"].iloc[row])

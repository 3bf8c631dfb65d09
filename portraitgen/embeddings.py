"""Prompt-embedding caches: text encoders run once, in the precompute stage, never in training.

A cache is one safetensors file: for every conditioning tensor name, the rows of all prompts stacked
in the order of the ``prompts`` metadata, plus the empty prompt (used for CFG) and the fingerprint of
the model that made them. Training looks prompts up by text and refuses a cache made by another model
or missing a prompt, naming it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .policies.base import Conditioning, FlowPolicy

UNCOND = ""


class EmbeddingCacheError(ValueError):
    """The cache is missing, from another model, or lacks a prompt."""


@torch.no_grad()
def encode_table(policy: FlowPolicy, prompts: Sequence[str], batch_size: int = 16) -> tuple[list[str], Conditioning]:
    """Encode the empty prompt and ``prompts`` (deduplicated, in order) in fixed batches.

    The cache and live training both go through here, so they see bit-identical embeddings (text
    encoders' float results depend on the batch a prompt is encoded in).
    """
    unique = list(dict.fromkeys([UNCOND, *prompts]))
    parts: list[Conditioning] = []
    for lo in range(0, len(unique), batch_size):
        enc = policy.encode_prompts(unique[lo:lo + batch_size])
        parts.append({k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in enc.items()})
    return unique, {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}


def build_cache(policy: FlowPolicy, prompts: Sequence[str], path: Path, model_fingerprint: str,
                batch_size: int = 16) -> Path:
    """Encode ``prompts`` (and the empty prompt) and write the cache atomically."""
    unique, tensors = encode_table(policy, prompts, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata={"prompts": json.dumps(unique), "model_fingerprint": model_fingerprint,
                                           "family": policy.family})
    tmp.replace(path)
    return path


class EmbeddingCache:
    @classmethod
    def from_policy(cls, policy: FlowPolicy, prompts: Sequence[str]) -> "EmbeddingCache":
        """An in-memory table made with the live text encoders."""
        self = cls.__new__(cls)
        self.path = Path("<live text encoders>")
        self.prompts, self.tensors = encode_table(policy, prompts)
        self.fingerprint = None
        self.row = {p: i for i, p in enumerate(self.prompts)}
        return self

    def __init__(self, path: str | Path, model_fingerprint: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise EmbeddingCacheError(f"train.prompt_embeddings: {self.path} not found (run `portraitgen precompute`)")
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.prompts: list[str] = json.loads(meta.get("prompts", "[]"))
        self.fingerprint = meta.get("model_fingerprint")
        if model_fingerprint is not None and self.fingerprint != model_fingerprint:
            raise EmbeddingCacheError(f"{self.path} was made by another model (fingerprint {self.fingerprint}, "
                                      f"now {model_fingerprint}); re-run `portraitgen precompute`")
        self.row = {p: i for i, p in enumerate(self.prompts)}

    def lookup(self, prompts: Sequence[str], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Conditioning:
        missing = [p for p in prompts if p not in self.row]
        if missing:
            raise EmbeddingCacheError(f"{self.path} has no embedding for {len(missing)} prompt(s), e.g. "
                                      f"{missing[0]!r}; re-run `portraitgen precompute`")
        idx = torch.tensor([self.row[p] for p in prompts], dtype=torch.long)
        out = {}
        for k, v in self.tensors.items():
            t = v[idx].to(device)
            out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

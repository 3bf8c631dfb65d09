"""Prompt-embedding caches: text encoders run once, in the precompute stage, never in training.

Two layers:

- **The cache files** training and PortraitBench read (``train.prompt_embeddings``, e.g.
  ``results/precompute/prompt_embeddings.safetensors``, and ``bench.prompt_embeddings``, e.g.
  ``results/precompute/bench_prompt_embeddings.safetensors``): for every conditioning tensor name, the
  rows of all prompts stacked in the order of the ``prompts`` metadata, plus the empty prompt (used for
  CFG), the fingerprint of the model that made them and the encoder settings. A reader looks prompts up
  by text and refuses a cache made by another model or other encoder settings, or missing a prompt,
  naming it and the file.
- **The per-prompt store** (:class:`EmbeddingStore`, ``results/precompute/cache/embeddings/``): every
  encoded prompt is an entry keyed by ``sha256(prompt, model fingerprint, encoder settings)``, kept in
  chunk files (one per run that had something to encode, written atomically). :func:`write_cache`
  encodes only the prompts no chunk holds, so adding a caption encodes that caption alone, and a run
  whose prompts are all stored never loads the text encoders.

Each prompt is encoded on its own (a batch of one). A text encoder's float results depend on the
batch a prompt is encoded in (measured on the tiny SD3 encoders: pooled CLIP outputs move by ~4e-7
between a batch of 1 and of 16), so an embedding that is a function of its prompt alone is what lets a
stored entry sit next to newly encoded ones, and what keeps cached and live embeddings bit-identical.
The cost is one forward pass per prompt, once per prompt for the lifetime of the store.

Cache files and chunks carry a ``.sha256`` sidecar (portraitgen/integrity.py), verified before they are
read: a damaged cache file is an error naming it and the stage to re-run; a damaged chunk is ignored
(its prompts are encoded again).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open

from .integrity import IntegrityError, rerun, sidecar, verify_file, write_checksum
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .io import atomic_write
from .policies.base import Conditioning, FlowPolicy

log = logging.getLogger(__name__)

UNCOND = ""
# Bump when how a prompt becomes its stored rows changes: every stored entry is then re-encoded.
ENCODING = "one-prompt-per-forward/1"
CHUNK_GLOB = "emb-*.safetensors"


class EmbeddingCacheError(ValueError):
    """The cache is missing, from another model or other encoder settings, or lacks a prompt."""


def encoder_settings(family: str) -> dict[str, Any]:
    """What an embedding depends on besides its prompt and the model's files (part of each entry's key)."""
    from .policies import policy_class

    cls = policy_class(family)
    return {"family": family, "max_sequence_length": getattr(cls, "max_sequence_length", None),
            "dtype": "float32",  # load_policy's default; the stored rows are float32 either way
            "encoding": ENCODING}


def prompt_key(prompt: str, model_fingerprint: str, settings: dict[str, Any]) -> str:
    payload = json.dumps({"prompt": prompt, "model": model_fingerprint, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@torch.no_grad()
def encode_one(policy: FlowPolicy, prompt: str) -> Conditioning:
    """``{name: [1, ...]}`` float32 on the CPU: the prompt encoded alone."""
    enc = policy.encode_prompts([prompt])
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in enc.items()}


def _stack(rows: Sequence[Conditioning]) -> Conditioning:
    return {k: torch.cat([r[k] for r in rows]).contiguous() for k in rows[0]}


def unique_prompts(prompts: Sequence[str]) -> list[str]:
    """The empty prompt, then ``prompts`` deduplicated in order: the rows of a cache."""
    return list(dict.fromkeys([UNCOND, *prompts]))


def encode_table(policy: FlowPolicy, prompts: Sequence[str]) -> tuple[list[str], Conditioning]:
    """Encode the empty prompt and ``prompts`` (deduplicated, in order), each prompt on its own.

    The cache and live training both go through :func:`encode_one`, so they see bit-identical embeddings.
    """
    unique = unique_prompts(prompts)
    rows = [encode_one(policy, p) for p in tqdm(unique, desc="encode prompts", disable=len(unique) < 32)]
    return unique, _stack(rows)


def _atomic_save(path: Path, tensors: Conditioning, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata=metadata))


def _save_cache(path: Path, prompts: list[str], tensors: Conditioning, model_fingerprint: str, family: str,
                keys: list[str] | None = None) -> Path:
    meta = {"prompts": json.dumps(prompts), "model_fingerprint": model_fingerprint, "family": family,
            "encoder_settings": json.dumps(encoder_settings(family), sort_keys=True)}
    if keys is not None:
        meta["keys"] = json.dumps(keys)
    _atomic_save(path, tensors, meta)
    write_checksum(path)
    return path


def build_cache(policy: FlowPolicy, prompts: Sequence[str], path: Path, model_fingerprint: str) -> Path:
    """Encode ``prompts`` (and the empty prompt) with a loaded policy and write the cache atomically
    (no per-prompt store: everything is encoded; see :func:`write_cache` for the incremental form)."""
    unique, tensors = encode_table(policy, prompts)
    return _save_cache(Path(path), unique, tensors, model_fingerprint, policy.family)


# ------------------------------------------------------------------------------------------ the store
class EmbeddingStore:
    """Per-prompt embeddings in content-addressed chunk files ``emb-<hash of keys>.safetensors`` under
    ``root``. A chunk exists under its final name only when complete (written to a temporary name,
    then renamed); an unreadable one is ignored (its prompts are encoded again)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.entries: dict[str, tuple[Path, int]] = {}  # key -> (chunk, row)
        self._chunk_keys: dict[Path, list[str]] = {}
        for path in sorted(self.root.glob(CHUNK_GLOB)):
            try:
                verify_file(path, "its prompts are encoded again")
                with safe_open(str(path), framework="pt") as f:
                    keys = json.loads((f.metadata() or {})["keys"])
            except Exception as exc:  # damaged or foreign: never trusted, overwritten when needed
                log.warning("embedding store: ignoring unreadable chunk %s (%s)", path, exc)
                continue
            self._chunk_keys[path] = keys
            for row, key in enumerate(keys):
                self.entries.setdefault(key, (path, row))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add(self, keys: list[str], prompts: list[str], tensors: Conditioning) -> Path:
        path = self.root / f"emb-{hashlib.sha256('|'.join(keys).encode()).hexdigest()[:16]}.safetensors"
        _atomic_save(path, tensors, {"keys": json.dumps(keys), "prompts": json.dumps(prompts)})
        write_checksum(path)
        self._chunk_keys[path] = list(keys)
        for row, key in enumerate(keys):
            self.entries[key] = (path, row)
        return path

    def get(self, keys: Sequence[str]) -> Conditioning:
        """The stored rows of ``keys``, stacked in that order."""
        by_chunk: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            path, row = self.entries[key]
            by_chunk.setdefault(path, []).append((i, row))
        rows: list[Conditioning | None] = [None] * len(keys)
        for path, items in by_chunk.items():
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                for i, row in items:
                    rows[i] = {k: f.get_slice(k)[row:row + 1] for k in names}
        return _stack(rows)  # type: ignore[arg-type]

    def prune(self, wanted: set[str]) -> int:
        """Delete the chunks that hold none of ``wanted``; returns how many."""
        removed = 0
        for path, keys in list(self._chunk_keys.items()):
            if wanted.isdisjoint(keys):
                log.info("embedding store: removing %s (none of its %d prompts is used now)", path.name, len(keys))
                path.unlink(missing_ok=True)
                sidecar(path).unlink(missing_ok=True)
                del self._chunk_keys[path]
                removed += 1
        self.entries = {k: v for k, v in self.entries.items() if v[0] in self._chunk_keys}
        return removed


@dataclass
class CacheUpdate:
    path: Path
    prompts: int  # rows of the cache, the empty prompt included
    encoded: int  # prompts encoded by this call
    reused: int  # prompts taken from the store
    seconds_encoding: float  # text-encoder time (model loading excluded)


def write_cache(prompts: Sequence[str], path: str | Path, *, family: str, model_fingerprint: str,
                store_dir: str | Path, load_policy: Callable[[], FlowPolicy], prune: bool = True,
                keep: Sequence[str] = ()) -> CacheUpdate:
    """Write the cache file for ``prompts``, encoding only what the store lacks.

    ``load_policy`` is called only when something must be encoded (then once). ``prune`` deletes the
    store's chunks that hold none of ``prompts`` and ``keep`` (the prompts of another cache file made
    from the same store, which must survive this one's pruning).
    """
    unique = unique_prompts(prompts)
    settings = encoder_settings(family)
    keys = [prompt_key(p, model_fingerprint, settings) for p in unique]
    store = EmbeddingStore(store_dir)
    missing = [i for i, k in enumerate(keys) if k not in store]
    seconds = 0.0
    if missing:
        policy = load_policy()
        if policy.family != family:
            raise EmbeddingCacheError(f"model family mismatch: params say {family!r}, the policy is {policy.family!r}")
        t0 = time.perf_counter()
        rows = [encode_one(policy, unique[i]) for i in tqdm(missing, desc="encode prompts")]
        seconds = time.perf_counter() - t0
        store.add([keys[i] for i in missing], [unique[i] for i in missing], _stack(rows))
    log.info("prompt embeddings: %d prompts, %d encoded, %d from the store", len(unique), len(missing),
             len(unique) - len(missing))
    _save_cache(Path(path), unique, store.get(keys), model_fingerprint, family, keys)
    if prune:
        store.prune(set(keys) | {prompt_key(p, model_fingerprint, settings) for p in keep})
    return CacheUpdate(Path(path), len(unique), len(missing), len(unique) - len(missing), seconds)


# ------------------------------------------------------------------------------------------ reading
class EmbeddingCache:
    @classmethod
    def from_policy(cls, policy: FlowPolicy, prompts: Sequence[str]) -> "EmbeddingCache":
        """An in-memory table made with the live text encoders."""
        self = cls.__new__(cls)
        self.path = Path("<live text encoders>")
        self.prompts, self.tensors = encode_table(policy, prompts)
        self.fingerprint = None
        self.key, self.remedy = "", ""
        self.row = {p: i for i, p in enumerate(self.prompts)}
        return self

    def __init__(self, path: str | Path, model_fingerprint: str | None = None, *, key: str = "train.prompt_embeddings",
                 remedy: str = "run `portraitgen precompute`"):
        """Read the cache file ``path``; with ``model_fingerprint``, refuse one made by another model or with
        other encoder settings. ``key`` (the params key naming the file) and ``remedy`` (how to make it) go
        into the error messages."""
        self.path = Path(path)
        self.key, self.remedy = key, remedy
        if not self.path.is_file():
            raise EmbeddingCacheError(f"{key}: {self.path} not found ({remedy})")
        # Verified before it is parsed: a flipped bit is "corrupt", not "made by another model".
        rule = "bench_embeddings" if key.startswith("bench") else "precompute"
        try:
            verify_file(self.path, rerun(rule, remedy.removeprefix("run ").strip("`")), what=f"{key}:")
        except IntegrityError as exc:
            raise EmbeddingCacheError(str(exc)) from None
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.prompts: list[str] = json.loads(meta.get("prompts", "[]"))
        self.fingerprint = meta.get("model_fingerprint")
        if model_fingerprint is not None and self.fingerprint != model_fingerprint:
            raise EmbeddingCacheError(f"{key}: {self.path} was made by another model (fingerprint {self.fingerprint}, "
                                      f"now {model_fingerprint}); re-{remedy}")
        if model_fingerprint is not None and "encoder_settings" in meta and meta.get("family"):
            made, now = json.loads(meta["encoder_settings"]), encoder_settings(meta["family"])
            if made != now:
                raise EmbeddingCacheError(f"{key}: {self.path} was made with other encoder settings ({made}, now "
                                          f"{now}); re-{remedy}")
        self.row = {p: i for i, p in enumerate(self.prompts)}

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The prompts of ``prompts`` (deduplicated, in order) that the cache has no row for."""
        return [p for p in dict.fromkeys(prompts) if p not in self.row]

    def lookup(self, prompts: Sequence[str], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Conditioning:
        missing = self.missing(prompts)
        if missing:
            where = f"{self.key}: " if self.key else ""
            again = f"re-{self.remedy}" if self.remedy else "re-run `portraitgen precompute`"
            raise EmbeddingCacheError(f"{where}{self.path} has no embedding for {len(missing)} prompt(s), e.g. "
                                      f"{missing[0]!r}; {again}")
        idx = torch.tensor([self.row[p] for p in prompts], dtype=torch.long)
        out = {}
        for k, v in self.tensors.items():
            t = v[idx].to(device)
            out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

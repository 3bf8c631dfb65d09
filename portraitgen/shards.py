"""Content-addressed shards of inverted exemplar trajectories.

A shard is one safetensors file holding up to ``shard_size`` exemplars (tensors stacked on the first
axis) plus JSON metadata (ids, captions, per-exemplar keys, inversion config, model fingerprint).
Its name is derived from its members' keys, and an exemplar's key hashes everything its trajectory
depends on (image bytes, caption, model, inversion config): a shard file that exists under the name
the current inputs give is valid for them, and is never recomputed.

Every shard is written to a temporary name, flushed and renamed; its SHA-256 goes to a ``.sha256``
sidecar written the same way, after the shard. A reader verifies the checksum, so a half-written or
damaged shard is reported by name instead of being trusted. (portraitgen/integrity.py applies the same
scheme to every other artifact a later stage trusts.)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .integrity import sha256_file  # the checksum scheme started here; portraitgen/integrity.py extends it
from .io import atomic_write, atomic_write_text

SHARD_GLOB = "shard-*.safetensors"


class ShardError(RuntimeError):
    """A shard is missing, incomplete or does not match its checksum."""


def exemplar_key(content_hash: str, caption: str, model_fingerprint: str, config: dict[str, Any]) -> str:
    payload = json.dumps({"image": content_hash, "caption": caption, "model": model_fingerprint,
                          "config": config}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def shard_name(keys: list[str]) -> str:
    return f"shard-{hashlib.sha256('|'.join(keys).encode()).hexdigest()[:16]}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
    """Write a shard and its checksum sidecar atomically; returns the checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    atomic_write(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                                             metadata=meta), fsync=True)
    checksum = sha256_file(path)
    atomic_write_text(checksum_path(path), checksum + "\n", fsync=True)
    return checksum


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def shard_checksum(path: Path) -> str | None:
    """The recorded checksum of a complete shard, or None when the shard or its sidecar is missing."""
    side = checksum_path(path)
    if not path.is_file() or not side.is_file():
        return None
    return side.read_text().strip()


def verify_shard(path: Path, expected: str | None = None) -> str:
    """Check a shard against ``expected`` (or its sidecar); returns the checksum or raises ShardError."""
    recorded = expected or shard_checksum(path)
    if recorded is None:
        raise ShardError(f"shard {path} is incomplete (no checksum recorded): delete it and re-run invert")
    actual = sha256_file(path)
    if actual != recorded:
        raise ShardError(f"shard {path} is corrupt: sha256 {actual[:12]}... does not match the recorded "
                         f"{recorded[:12]}...; delete it and re-run invert")
    return actual


def read_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def read_shard(path: Path, expected: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a verified shard."""
    if not path.is_file():
        raise ShardError(f"shard {path} is missing: re-run invert")
    verify_shard(path, expected)
    return load_file(str(path)), read_metadata(path)

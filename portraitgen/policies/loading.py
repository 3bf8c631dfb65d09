"""Model loading: a family's :class:`FlowPolicy` adapter from a local folder or the built-in tiny model,
and the fingerprint caches record of the model they were made with."""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..io import publish_dir
from .base import FlowPolicy
from .families import FAMILIES

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"
_TINY_VERSION = "2"  # bump when a tiny builder changes, so caches are rebuilt


def policy_class(family: str) -> type[FlowPolicy]:
    """The adapter class of ``family`` (its module is imported now, the other families' are not)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    module, name = FAMILIES[family].split(":")
    cls = getattr(importlib.import_module(module, __package__), name)
    if cls.family != family:
        raise TypeError(f"portraitgen/policies/families.py: {family!r} names {FAMILIES[family]}, whose family is "
                        f"{cls.family!r}")
    return cls


def policy_classes() -> dict[str, type[FlowPolicy]]:
    """Every registered family's adapter class."""
    return {family: policy_class(family) for family in FAMILIES}


def cache_dir() -> Path:
    return Path(os.environ.get("PORTRAITGEN_CACHE", Path.home() / ".cache" / "portraitgen"))


def tiny_model_path(family: str, seed: int = 0) -> Path:
    """Build (once) and save the tiny pipeline of ``family``; return its folder.

    The pipeline is always *reloaded* from this folder through diffusers' ``from_pretrained``, so the
    tiny model exercises exactly the loading code that real weights use.
    """
    cls = policy_class(family)
    key = hashlib.sha256(f"{family}-{seed}-{_TINY_VERSION}".encode()).hexdigest()[:10]
    out = cache_dir() / f"tiny-{family}-{key}"
    if (out / "model_index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{family}-", dir=out.parent))
    try:
        cls.build_tiny_pipeline(seed).save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out, complete="model_index.json")  # concurrent builders race harmlessly, one wins
    log.info("built tiny %s model at %s", family, out)
    return out


def resolve_model_path(family: str, path: str) -> Path:
    if path == BUILTIN_TINY:
        return tiny_model_path(family)
    return Path(path).expanduser()


# Weight files up to this size are hashed whole (the toy model's 9 MB transformer: ~10 ms); larger ones
# (a real checkpoint's shards, GBs) by their size and WEIGHT_WINDOWS evenly spaced windows: any retraining
# changes every tensor, so the windows see it, while reading 16 MiB of a 10 GB shard takes milliseconds.
FULL_HASH_LIMIT = 64 * 2**20
WEIGHT_WINDOWS = 16
WINDOW_BYTES = 2**20


def _content_digest(path: Path) -> bytes:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        if size <= FULL_HASH_LIMIT:
            h.update(fh.read())
        else:
            for i in range(WEIGHT_WINDOWS):
                fh.seek(i * (size - WINDOW_BYTES) // (WEIGHT_WINDOWS - 1))
                h.update(fh.read(WINDOW_BYTES))
    return h.digest()


def model_fingerprint(family: str, path: str) -> str:
    """Hash of a model's configs and weights (weight files over :data:`FULL_HASH_LIMIT` by windows).

    Caches made with a model (inverted trajectories, prompt embeddings, training checkpoints) record it
    and are refused by another model; inversion also seeds its noise with it. The weights' bytes count:
    a pretraining rerun with other settings writes a model of the same architecture, so the same file
    names, sizes and configs, and only its weights tell it apart. Only what diffusers loads counts:
    ``model_index.json`` and the component folders. Other top-level files are notes about the model
    (``portraitgen pretrain``'s training record, with its timings; a README), and must not make two
    folders of the same weights invert differently.
    """
    root = resolve_model_path(family, path)
    h = hashlib.sha256(family.encode())
    for f in sorted(root.rglob("*")):
        top_level_note = f.parent == root and f.name != "model_index.json"
        if f.is_file() and not top_level_note:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(_content_digest(f))
    return h.hexdigest()[:16]


def load_policy(family: str, path: str, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, text_encoders: bool = True) -> FlowPolicy:
    """Load the policy of ``family`` from a local folder, or the built-in tiny model."""
    cls = policy_class(family)
    return cls.from_pretrained(resolve_model_path(family, path), device=device, dtype=dtype,
                               text_encoders=text_encoders)



"""The training fingerprint: which params determine what training computes.

A training run keeps its checkpoints in ``checkpoints/<fingerprint_hash>``; a restart with the same
fingerprint resumes there, any other params start a fresh folder.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from .config import Params, flatten, params_to_dict

# Params that may change between a run and its resumption without changing what was computed so far.
RESUMABLE_KEYS = ("train.iterations", "train.checkpoint_every", "train.keep_checkpoints", "train.log_images_every",
                  "tracking.")


def semantic_fingerprint(params: Params) -> dict[str, Any]:
    """The params that determine what training computes (JSON-normalised: tuples become lists)."""
    flat = flatten(params_to_dict(params))
    kept = {k: v for k, v in flat.items() if not any(k == r or k.startswith(r) for r in RESUMABLE_KEYS)}
    return json.loads(json.dumps(kept, sort_keys=True))


def fingerprint_hash(params: Params) -> str:
    return hashlib.sha256(json.dumps(semantic_fingerprint(params), sort_keys=True).encode()).hexdigest()[:12]

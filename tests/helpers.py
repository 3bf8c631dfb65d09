"""Helpers shared by tests (params for fast CPU runs)."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON_BIN = Path(sys.executable).parent


def fast_params(**overrides) -> dict:
    """A params dict small enough for CPU tests (seconds per iteration), as a plain mapping."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["model"]["resolution"] = 32
    base["sample"].update(num_steps=6, global_batch_size=8, group_size=4, guidance_scale=4.5)
    base["train"].update(iterations=2, global_batch_size=4, checkpoint_every=1, log_images_every=0)
    base["tracking"]["enabled"] = False
    for dotted, value in overrides.items():
        node = base
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return base


def write_params(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(fast_params(**overrides)))
    return path

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
    # The repository's model is the pretrain stage's output (results/pretrain/model) and its rewards the
    # portrait pair: tests never depend on results/, so they run the random built-in tiny model with the
    # cheap brightness reward and the learning rate the tiny model needs.
    base["model"]["path"] = "builtin:tiny"
    base["reward"] = {"components": {"brightness": 1.0}}
    base["train"]["lr"] = 0.03
    base["model"]["resolution"] = 32
    base["sample"].update(num_steps=6, global_batch_size=8, group_size=4, guidance_scale=4.5)
    base["bench"]["guidance_scale"] = 4.5  # the tests' figures were set at SD3's guidance, not the toy model's 1.5
    base["train"].update(iterations=2, global_batch_size=4, checkpoint_every=1, log_images_every=0)
    base["tracking"]["enabled"] = False
    # The repository's params run the full exemplar pipeline on the stages' outputs; tests start from
    # plain GRPO on the built-in prompts and opt into exemplars/caches explicitly.
    base["prompts"]["source"] = "builtin:demo"
    base["train"]["prompt_embeddings"] = ""
    base["train"]["exemplars"] = {"per_group": 0, "rewards": ""}
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


def make_manifest(folder: Path, n: int = 5, size: int = 64, seed: int = 0, captions=None) -> Path:
    """A hand-made curate manifest over ``n`` synthetic portraits-to-be (smooth colour fields)."""
    import hashlib

    import numpy as np
    import pandas as pd
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        low = rng.random((4, 4, 3))
        img = Image.fromarray((low * 255).astype("uint8")).resize((size, size), Image.Resampling.BICUBIC)
        rel = f"images/img{i:03d}.png"
        img.save(folder / rel)
        digest = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
        caption = captions[i] if captions else f"a portrait photo of person {i}"
        rows.append({"id": digest[:16], "content_hash": digest, "image_path": rel, "caption": caption,
                     "split": "train"})
    rows.append({**rows[0], "id": "bench-only", "split": "bench_reference"})
    path = folder / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def in_ci() -> bool:
    """Under CI (CI=true, as .ci/run and every hosted CI set it)."""
    import os

    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_unless_ci(reason: str):
    """``pytest.skip(reason)``, except in CI, where the harness (SLURM, Chromium) is installed by
    .ci/system-packages and must work: there a harness that cannot start fails the run."""
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (CI=true: .ci/system-packages installs this, so it must work here)")
    pytest.skip(reason)

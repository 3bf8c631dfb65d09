"""Fixtures of the fault-injection suite."""
from __future__ import annotations

from pathlib import Path

import pytest

from portraitgen.config import params_from_dict
from portraitgen.invert import run_invert

from helpers import fast_params, make_manifest


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of ``path`` in place (negative offsets count from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def exemplar_index(tmp_path_factory):
    """An invert index over four tiny hand-made portraits (two captions)."""
    root = tmp_path_factory.mktemp("exemplars")
    captions = ["a portrait photo of a smiling woman", "a headshot of an old man"] * 2
    manifest = make_manifest(root / "curate", n=4, size=32, captions=captions)
    p = params_from_dict(fast_params(**{"invert.manifest": str(manifest), "invert.diagnostic_samples": 2}))
    run_invert(p, root / "invert")
    return root / "invert" / "index.parquet"

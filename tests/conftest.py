"""Shared fixtures: tiny models are built in code, saved, and reloaded through diffusers' own
``from_pretrained`` into a per-session cache, so no test touches the network or the user's cache."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("portraitgen-cache")
    old = os.environ.get("PORTRAITGEN_CACHE")
    os.environ["PORTRAITGEN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("PORTRAITGEN_CACHE", None)
    else:
        os.environ["PORTRAITGEN_CACHE"] = old


@pytest.fixture(scope="session")
def sd3_policy():
    from portraitgen.policies import load_policy

    policy = load_policy("sd3", "builtin:tiny")
    policy.freeze_all()
    return policy

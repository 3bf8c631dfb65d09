"""Flow-matching policies: the family registry (:mod:`.families`), the adapters' common interface
(:mod:`.base`) and model loading (:mod:`.loading`).

Importing the package is cheap (config validation and the workflow read the registry): the adapters'
interface and the loaders, which need torch and diffusers, are imported on first access of one of
their names (``from portraitgen.policies import load_policy`` works as usual).
"""
from __future__ import annotations

from typing import Any

from .families import FAMILIES, FAMILY_NAMES, family_list

_FROM_BASE = ("Conditioning", "FlowPolicy", "ModelPathError", "cond_batch_size", "cond_cat", "cond_select", "cond_to")
_FROM_LOADING = ("BUILTIN_TINY", "cache_dir", "load_policy", "model_fingerprint", "policy_class", "policy_classes",
                 "resolve_model_path", "tiny_model_path")


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from . import base as module
    elif name in _FROM_LOADING:
        from . import loading as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # looked up once
    return value


__all__ = ["FAMILIES", "FAMILY_NAMES", "family_list", *_FROM_BASE, *_FROM_LOADING]

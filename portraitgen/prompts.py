"""Prompt sources for training: the built-in demo list, or a user's text / JSONL file.

The curate stage will later provide captions of real portraits; until then (and for sanity runs)
training reads prompts from here.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


class PromptSourceError(ValueError):
    """The prompt source does not exist, is empty, or is malformed."""


def _builtin(name: str) -> list[str]:
    res = resources.files("portraitgen.data").joinpath(f"{name}_prompts.txt")
    if not res.is_file():
        raise PromptSourceError(f"prompts.source: unknown built-in prompt set 'builtin:{name}' (available: builtin:demo)")
    return [ln.strip() for ln in res.read_text().splitlines() if ln.strip()]


def _from_jsonl(path: Path) -> list[str]:
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSourceError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        text = rec.get("prompt", rec.get("caption")) if isinstance(rec, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise PromptSourceError(f"{path}:{n}: expected an object with a non-empty 'prompt' or 'caption' string")
        prompts.append(text.strip())
    return prompts


def load_prompts(source: str) -> list[str]:
    """Return the training prompts named by ``prompts.source``."""
    if source.startswith(BUILTIN_PREFIX):
        prompts = _builtin(source[len(BUILTIN_PREFIX):])
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise PromptSourceError(f"prompts.source: file not found: {path}")
        if path.suffix == ".jsonl":
            prompts = _from_jsonl(path)
        elif path.suffix == ".txt":
            prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        else:
            raise PromptSourceError(f"prompts.source: {path} must be a .txt (one prompt per line) or .jsonl file")
    if not prompts:
        raise PromptSourceError(f"prompts.source: {source} holds no prompts")
    return prompts

"""What changes training, declared once: the training fingerprint and the train stage's params.

Training reads the sections in ``TRAINING_SECTIONS`` of params.yaml, except the keys in
``NOT_READ_BY_TRAINING``. That list is

- the train stage's params in both workflow tools (the train rule's ``params:``, dvc.yaml's train
  ``params``; :func:`training_params_keys`, used by portraitgen/stages.py): editing one reruns train,
  editing any other key never does;
- the training fingerprint (:func:`semantic_fingerprint`): a run keeps its checkpoints in
  ``checkpoints/<fingerprint_hash>``, so a restart with the same fingerprint resumes there and any
  change of what is trained starts a fresh folder. ``RESUMABLE_KEYS`` (how long to train, how often to
  checkpoint or log) may change between a run and its resumption: they are params of the stage but
  not of the fingerprint.

The fingerprint also holds the content hash of the files training reads whose content is not fixed by
these params: the model folder (its weights: ``portraitgen pretrain`` rewrites the same path when its
settings change), the exemplar index (made by curate and invert from their own params and the real
photos) and a prompt file. Re-curating or re-inverting therefore starts a fresh checkpoint folder,
while editing e.g. ``bench.subset`` or ``curate.report`` settings that leave the index as it is keeps
the run where it was. (The prompt-embedding cache and the exemplar rewards are fixed by ``prompts``,
``model`` and ``reward`` plus the index, and are checked by their readers.)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import Params, flatten, params_to_dict

# Sections of params.yaml that training reads (whole sections, minus the keys below).
TRAINING_SECTIONS = ("seed", "model", "prompts", "sample", "train", "reward")
# Keys of those sections that training never reads.
NOT_READ_BY_TRAINING = ("sample.eval_num_steps",)  # the bench's / the detector's sampler, not a rollout
# Params that may change between a run and its resumption without changing what was computed so far.
RESUMABLE_KEYS = ("train.iterations", "train.checkpoint_every", "train.keep_checkpoints", "train.log_images_every")


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def is_training_key(key: str) -> bool:
    """Whether the dotted params key ``key`` changes what training computes (resumable keys included)."""
    return _matches(key, TRAINING_SECTIONS) and not _matches(key, NOT_READ_BY_TRAINING)


def training_params_keys() -> list[str]:
    """The train stage's params as DVC keys: whole sections where training reads all of it, else its keys."""
    keys = []
    defaults = params_to_dict(Params())
    for section in TRAINING_SECTIONS:
        excluded = [k for k in NOT_READ_BY_TRAINING if k.startswith(section + ".")]
        if not excluded:
            keys.append(section)
            continue
        keys += [f"{section}.{name}" for name in defaults[section] if not _matches(f"{section}.{name}", excluded)]
    return keys


def _file_hash(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _input_files(flat: dict[str, Any]) -> dict[str, str]:
    """params key -> the file it names, for the files training reads whose content is not fixed by params."""
    files = {}
    exemplars_used = (flat.get("prompts.source") == "exemplars" or (flat.get("train.exemplars.per_group") or 0) > 0
                      or (flat.get("train.sft.share") or 0) > 0)
    if exemplars_used and flat.get("train.exemplars.index"):
        files["train.exemplars.index"] = str(flat["train.exemplars.index"])
    source = str(flat.get("prompts.source") or "")
    if source and source != "exemplars" and not source.startswith("builtin:"):
        files["prompts.source"] = source
    return files


def _model_weights(flat: dict[str, Any]) -> str | None:
    """The fingerprint of the model folder ``model.path`` names (None for builtin models or a path that is
    not a folder yet): a pretraining rerun rewrites the same path with other weights."""
    path = str(flat.get("model.path") or "")
    if not path or path.startswith("builtin:") or not Path(path).is_dir():
        return None
    from .policies.loading import model_fingerprint

    return model_fingerprint(str(flat.get("model.family")), path)


def _is_reward_server_key(key: str) -> bool:
    """``reward.options.<name>.server[.*]``: where a reward is scored, not what it computes (a run resumes
    after its reward server moved to another host; docs/reward-server.md)."""
    parts = key.split(".")
    return len(parts) >= 4 and parts[:2] == ["reward", "options"] and parts[3] == "server"


def fingerprint_of(data: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of a params mapping (nested, as in params.yaml, with every key present)."""
    flat = flatten(json.loads(json.dumps(data, default=list)))
    kept = {k: v for k, v in flat.items() if is_training_key(k) and not _matches(k, RESUMABLE_KEYS)
            and not _is_reward_server_key(k)}
    inputs = {key: _file_hash(path) for key, path in _input_files(flat).items()}
    weights = _model_weights(flat)
    if weights is not None:
        inputs["model.path"] = weights
    return json.loads(json.dumps({"params": kept, "inputs": inputs}, sort_keys=True))


def semantic_fingerprint(params: Params) -> dict[str, Any]:
    """What training computes with ``params`` (JSON-normalised: tuples become lists)."""
    return fingerprint_of(params_to_dict(params))


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """The checkpoint folder's name for a fingerprint of :func:`semantic_fingerprint`."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def fingerprint_hash(params: Params) -> str:
    return fingerprint_digest(semantic_fingerprint(params))


"""The training fingerprint covers exactly what changes training (portraitgen/fingerprint.py): editing a
key training does not read keeps the checkpoint folder (a restart resumes), editing a training key moves
it (a fresh run), and the train stage's params in both workflow tools are the same declaration."""
from __future__ import annotations

import copy

import pytest

from portraitgen.config import Params, flatten, params_from_dict, params_to_dict
from portraitgen.fingerprint import (RESUMABLE_KEYS, fingerprint_of, fingerprint_hash, is_training_key,
                                     semantic_fingerprint, training_params_keys)

DEFAULTS = params_to_dict(Params())
# Every leaf key of params, plus the sections that are dicts of free keys (reward weights and options).
KEYS = sorted(flatten(DEFAULTS))


def _other(value):
    """A value different from ``value`` of the same kind (validity does not matter to the fingerprint)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return [*value, value[-1] if value else 1]
    if value is None:
        return 1
    if isinstance(value, dict):
        return {**value, "added": 1}
    raise TypeError(value)


def _edited(key: str) -> dict:
    data = copy.deepcopy(DEFAULTS)
    node = data
    *parents, leaf = key.split(".")
    for k in parents:
        node = node[k]
    node[leaf] = _other(node[leaf])
    return data


def _folder(data: dict) -> dict:
    return fingerprint_of(data)


@pytest.mark.parametrize("key", KEYS)
def test_each_key_moves_the_checkpoint_folder_iff_it_changes_training(key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no exemplar index here: its hash is None on both sides
    changes = _folder(_edited(key)) != _folder(DEFAULTS)
    resumable = any(key == r or key.startswith(r + ".") for r in RESUMABLE_KEYS)
    assert changes == (is_training_key(key) and not resumable), key


def test_the_declaration_splits_the_params():
    training = [k for k in KEYS if is_training_key(k)]
    assert any(k.startswith("bench.") for k in KEYS) and not any(k.startswith("bench.") for k in training)
    assert not any(k.startswith(("curate.", "tracking.", "invert.")) for k in training)
    assert "sample.eval_num_steps" not in training and "sample.noise_level" in training
    assert {"train.lr", "train.sft.share", "reward.components.brightness", "model.path", "seed"} <= set(training)
    # The train stage's params (DVC keys) name exactly the training keys.
    stage = training_params_keys()
    assert stage[:3] == ["seed", "model", "prompts"] and "sample.num_steps" in stage and "sample" not in stage
    covered = [k for k in KEYS if any(k == s or k.startswith(s + ".") for s in stage)]
    assert covered == training


def test_the_exemplar_index_content_is_part_of_the_fingerprint(tmp_path):
    index = tmp_path / "index.parquet"
    index.write_bytes(b"first inversion")
    params = params_from_dict({"prompts": {"source": "exemplars"}, "train": {"exemplars": {"index": str(index)}}})
    first = fingerprint_hash(params)
    assert fingerprint_hash(params) == first
    index.write_bytes(b"re-curated photos, inverted again")
    assert fingerprint_hash(params) != first
    assert set(semantic_fingerprint(params)["inputs"]) == {"train.exemplars.index"}
    # Without exemplars (plain GRPO on a prompt list) the index is not read, so it is not hashed.
    plain = params_from_dict({"prompts": {"source": "builtin:demo"}, "train": {"exemplars": {"index": str(index)}}})
    assert semantic_fingerprint(plain)["inputs"] == {}


def test_the_model_weights_are_part_of_the_fingerprint(tmp_path):
    """A pretraining rerun rewrites model.path with other weights (same configs and sizes): training must
    start a fresh checkpoint folder, not resume the old model's."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from portraitgen.policies.loading import tiny_model_path

    model = tmp_path / "model"
    shutil.copytree(tiny_model_path("sd3"), model)
    params = params_from_dict({"model": {"family": "sd3", "path": str(model)}, "prompts": {"source": "builtin:demo"}})
    first = fingerprint_hash(params)
    assert semantic_fingerprint(params)["inputs"].keys() == {"model.path"}
    weights = next((model / "transformer").glob("*.safetensors"))
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    save_file({n: t * 1.01 for n, t in load_file(weights).items()}, weights, metadata=metadata)
    assert fingerprint_hash(params) != first
    # A builtin model, or a folder not made yet, adds nothing.
    tiny = params_from_dict({"model": {"family": "sd3", "path": "builtin:tiny"}})
    assert "model.path" not in semantic_fingerprint(tiny)["inputs"]

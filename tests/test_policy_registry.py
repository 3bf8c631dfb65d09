"""The model family registry (portraitgen/policies/families.py) is what every family list reads."""
from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from portraitgen.cli import build_parser
from portraitgen.config import ConfigError, ModelConfig, params_from_dict
from portraitgen.policies import FAMILIES, FAMILY_NAMES, family_list, policy_class, policy_classes
from portraitgen.schema import params_schema


def test_each_registered_family_names_its_adapter():
    assert set(FAMILY_NAMES) == set(FAMILIES) and len(FAMILY_NAMES) >= 3
    for family, cls in policy_classes().items():
        assert cls.family == family and policy_class(family) is cls
    with pytest.raises(KeyError, match="unknown model family 'sdx'; known: flux, sd3, zimage"):
        policy_class("sdx")


def test_config_schema_cli_and_messages_read_the_registry():
    assert typing.get_args(typing.get_type_hints(ModelConfig)["family"]) == FAMILY_NAMES
    assert params_schema()["properties"]["model"]["properties"]["family"]["enum"] == list(FAMILY_NAMES)
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    family_flag = next(a for a in generate._actions if "--family" in a.option_strings)
    assert tuple(family_flag.choices) == FAMILY_NAMES
    assert family_list() == "sd3, flux or zimage"
    with pytest.raises(ConfigError, match="model.family.*'sd3' \\| 'flux' \\| 'zimage', got 'sdx'"):
        params_from_dict({"model": {"family": "sdx"}})


def test_reading_the_registry_imports_no_model_code():
    """Config validation and the workflow read the registry; torch and diffusers load only for a model."""
    code = ("import sys; import portraitgen.config, portraitgen.policies; "
            "print(sorted(m for m in ('torch', 'diffusers', 'portraitgen.policies.sd3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_fingerprint_counts_what_diffusers_loads_not_notes_beside_it(tmp_path):
    """Two folders of the same weights (e.g. two pretraining runs whose training records differ in their
    timings) fingerprint alike, so inversion seeds the same noise; a changed component config does not."""
    import json
    import shutil

    from portraitgen.policies import model_fingerprint
    from portraitgen.policies.loading import tiny_model_path

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model_path("sd3"), a)
    shutil.copytree(tiny_model_path("sd3"), b)
    (a / "pretrain_key.json").write_text(json.dumps({"training": {"train_seconds": 291.4}}))
    (b / "pretrain_key.json").write_text(json.dumps({"training": {"train_seconds": 305.3}}))
    (b / "README.md").write_text("notes")
    assert model_fingerprint("sd3", str(a)) == model_fingerprint("sd3", str(b))
    config = b / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"num_layers"', '"num_layers" ', 1))
    assert model_fingerprint("sd3", str(a)) != model_fingerprint("sd3", str(b))
    index = json.loads((b / "model_index.json").read_text())
    (b / "model_index.json").write_text(json.dumps({**index, "_note": "x"}))
    assert model_fingerprint("sd3", str(a)) != model_fingerprint("sd3", str(b))


def test_model_fingerprint_tells_retrained_weights_apart(tmp_path, monkeypatch):
    """A retrained model has the same configs, file names and sizes as the old one: only its weights
    differ, and its caches (trajectories, checkpoints) must not be taken for the old model's."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from portraitgen.policies import loading, model_fingerprint
    from portraitgen.policies.loading import tiny_model_path

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model_path("sd3"), a)
    shutil.copytree(tiny_model_path("sd3"), b)
    weights = next((b / "transformer").glob("*.safetensors"))
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    original = load_file(weights)
    size = weights.stat().st_size

    def retrain(names):  # same shapes, same file size, other values
        save_file({n: t + 1e-3 if n in names else t for n, t in original.items()}, weights, metadata=metadata)
        assert weights.stat().st_size == size

    retrain({sorted(original)[len(original) // 2]})  # one tensor: a whole-file hash sees it
    assert model_fingerprint("sd3", str(a)) != model_fingerprint("sd3", str(b))
    # Files over FULL_HASH_LIMIT are hashed by windows, which see a retraining (every tensor changes).
    monkeypatch.setattr(loading, "FULL_HASH_LIMIT", 1024)
    monkeypatch.setattr(loading, "WINDOW_BYTES", 64)
    retrain(set(original))
    assert model_fingerprint("sd3", str(a)) != model_fingerprint("sd3", str(b))
    shutil.copy2(next((a / "transformer").glob("*.safetensors")), weights)
    assert model_fingerprint("sd3", str(a)) == model_fingerprint("sd3", str(b))

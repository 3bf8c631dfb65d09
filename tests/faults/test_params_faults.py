"""Bad params never pass (issue 15, item 5): every number finite, optimizer keys ranged, an empty
params file refused, a NaN reward weight named."""
from __future__ import annotations

import pytest
import yaml

from portraitgen.config import ConfigError, load_params, params_from_dict

from helpers import fast_params


@pytest.mark.parametrize("key,value", [("train.lr", ".inf"), ("sample.noise_level", ".inf"),
                                       ("sample.guidance_scale", ".inf"), ("train.kl_beta", ".inf"),
                                       ("train.adam_beta1", ".nan"), ("train.adam_eps", "-.inf"),
                                       ("train.lr", "inf"), ("curate.max_blur", ".nan")])
def test_non_finite_numbers_are_refused_by_key(tmp_path, key, value):
    path = tmp_path / "params.yaml"
    text = yaml.safe_dump(fast_params(**{key: 0.5}))
    section, leaf = key.rsplit(".", 1)
    # Written by hand: YAML's .inf/.nan, and the plain string "inf" that float() would accept.
    text = text.replace(f"{leaf}: 0.5", f"{leaf}: {value}", 1)
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"params.yaml: params key '{key}': expected a finite number"):
        load_params(path)


def test_a_nan_reward_weight_names_the_component():
    with pytest.raises(ConfigError, match=r"'reward.components.brightness': expected a finite number, got nan"):
        params_from_dict(fast_params(**{"reward.components": {"brightness": float("nan")}}))


@pytest.mark.parametrize("key,value,fragment", [
    ("train.adam_beta1", 1.0, r"'train.adam_beta1': expected in \[0, 1\), got 1.0"),
    ("train.adam_beta2", -0.1, r"'train.adam_beta2': expected in \[0, 1\)"),
    ("train.adam_eps", -1e-8, r"'train.adam_eps': expected > 0"),
    ("train.adam_eps", 0.0, r"'train.adam_eps': expected > 0"),
    ("train.weight_decay", -0.01, r"'train.weight_decay': expected >= 0"),
    ("train.warmup_iterations", -1, r"'train.warmup_iterations': expected >= 0"),
    ("train.lora.alpha", 0.0, r"'train.lora.alpha': expected > 0"),
    ("seed", -3, r"'seed': expected >= 0"),
])
def test_optimizer_and_other_ranges(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        params_from_dict(fast_params(**{key: value}))


def test_an_empty_params_file_is_an_error(tmp_path):
    for text in ("", "# only a comment\n"):
        path = tmp_path / "params.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"params.yaml: the params file is empty"):
            load_params(path)

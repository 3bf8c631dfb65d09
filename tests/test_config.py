"""params.yaml loading: defaults, types, ranges, and errors that name the key."""
import pytest
import yaml

from portraitgen.config import ConfigError, Params, flatten, load_params, params_from_dict, params_to_dict

from helpers import REPO, fast_params


def test_repository_params_load_and_roundtrip():
    p = load_params(REPO / "params.yaml")
    assert isinstance(p, Params)
    assert p.prompts_per_iteration * p.sample.group_size == p.sample.global_batch_size
    assert params_from_dict(params_to_dict(p)) == p


def test_defaults_fill_missing_keys_and_numbers_coerce():
    p = params_from_dict({"train": {"lr": "1e-4", "lora": {"target_modules": ["to_q"]}}})
    assert p.train.lr == pytest.approx(1e-4) and isinstance(p.train.lr, float)
    assert p.train.lora.target_modules == ("to_q",)
    assert p.sample.group_size == 8  # default


@pytest.mark.parametrize("data,key,fragment", [
    ({"train": {"lr": "fast"}}, "train.lr", "expected float"),
    ({"train": {"iterations": 2.5}}, "train.iterations", "expected int"),
    ({"sample": {"cfg": "yes"}}, "sample.cfg", "expected bool"),
    ({"sample": {"step_type": "ddim"}}, "sample.step_type", "'sde' | 'cps'"),
    ({"model": {"family": "sdxl"}}, "model.family", "'sd3' | 'flux' | 'zimage'"),
    ({"train": {"lrate": 1.0}}, "train.lrate", "unknown params key"),
    ({"reward": {"components": {"brightness": "high"}}}, "reward.components.brightness", "expected float"),
    ({"train": "fast"}, "train", "expected a mapping"),
])
def test_wrong_types_name_the_key(data, key, fragment):
    with pytest.raises(ConfigError) as err:
        params_from_dict(data)
    assert f"'{key}'" in str(err.value) and fragment in str(err.value)


def test_group_size_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"'sample.global_batch_size'.*multiple of sample.group_size=6"):
        params_from_dict({"sample": {"global_batch_size": 16, "group_size": 6}})
    with pytest.raises(ConfigError, match=r"'train.global_batch_size'.*divisor of sample.global_batch_size=16"):
        params_from_dict({"sample": {"global_batch_size": 16, "group_size": 8}, "train": {"global_batch_size": 6}})


def test_range_errors_name_key_and_value():
    with pytest.raises(ConfigError, match=r"'train.ema.decay'.*got 1.5"):
        params_from_dict({"train": {"ema": {"decay": 1.5}}})
    with pytest.raises(ConfigError, match=r"'model.resolution'.*got 50"):
        params_from_dict({"model": {"resolution": 50}})


def test_load_params_reports_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(fast_params(**{"train.lr": [1]})))
    with pytest.raises(ConfigError, match=r"p.yaml: params key 'train.lr'"):
        load_params(bad)
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "broken.yaml")


def test_flatten_gives_dotted_keys():
    flat = flatten(params_to_dict(params_from_dict({})))
    assert flat["train.lora.rank"] == 32 and flat["reward.components.brightness"] == 1.0

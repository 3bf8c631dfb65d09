"""workflow/schemas/params.schema.yaml is generated from portraitgen/config.py and agrees with it."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from portraitgen.config import ConfigError, params_from_dict
from portraitgen.schema import check_schema_file, params_schema

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "workflow" / "schemas" / "params.schema.yaml"


def test_committed_schema_is_current():
    assert check_schema_file(SCHEMA_FILE), (
        "workflow/schemas/params.schema.yaml is stale: run "
        "`portraitgen schema --write workflow/schemas/params.schema.yaml`")


def test_cli_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "schema.yaml"
    stale.write_text(SCHEMA_FILE.read_text().replace("sd3", "sd2", 1))
    cli = [sys.executable, "-m", "portraitgen"]
    proc = subprocess.run([*cli, "schema", "--check", str(stale)], capture_output=True, text=True)
    assert proc.returncode == 1 and "stale" in proc.stderr
    subprocess.run([*cli, "schema", "--write", str(stale)], check=True)
    assert subprocess.run([*cli, "schema", "--check", str(stale)]).returncode == 0


def test_the_repository_params_pass_the_schema_and_the_package():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    jsonschema.validate(params, params_schema())
    params_from_dict(params)


def test_descriptions_come_from_config_comments():
    props = params_schema()["properties"]
    assert "images sampled per iteration" in props["sample"]["properties"]["global_batch_size"]["description"]
    assert props["train"]["properties"]["exemplars"]["properties"]["schedule"]["enum"] == ["constant", "linear_decay"]


@pytest.mark.parametrize(
    "dotted, value",
    [
        ("model.family", "sdx"),
        ("model.resolution", 64.5),
        ("sample.cfg", "yes"),
        ("train.lora.rank", "8"),
        ("train.lora.target_modules", "to_q"),
        ("reward.components.brightness", "high"),
        ("reward.normalize.brightness.mean", [0.5]),
        ("train.unknown_key", 1),
        ("tracking.enabled", 1),
    ],
)
def test_schema_and_package_reject_the_same_bad_values(dotted, value):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    bad = copy.deepcopy(params)
    node = bad
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, params_schema())
    with pytest.raises(ConfigError):
        params_from_dict(bad)


def test_exponent_floats_read_as_strings_are_accepted_by_both():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["lr"] = yaml.safe_load("lr: 1e-4")["lr"]  # PyYAML: the string '1e-4'
    assert params["train"]["lr"] == "1e-4"
    jsonschema.validate(params, params_schema())
    assert params_from_dict(params).train.lr == pytest.approx(1e-4)

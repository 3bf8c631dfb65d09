"""Hardware options are declared once (portraitgen/hardware.py): the train flags, their PORTRAITGEN_*
environment defaults, launch-train's pass-through and the train rule's Snakemake resources all come
from the dataclass, so every option is reachable from the command line, DVC (env) and Snakemake."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from portraitgen.cli import build_parser
from portraitgen.hardware import (Hardware, add_hardware_arguments, hardware_from_args, snakemake_flags,
                                  snakemake_resources, train_flags)

# A value different from the default for every field.
CHANGED = {"micro_batch_size": 3, "mixed_precision": "bf16", "rollout_micro_batch_size": 5,
           "low_precision_weights": False, "compile": True, "gradient_checkpointing": True}


def _parse(argv, env=None, pass_through=False):
    parser = argparse.ArgumentParser()
    add_hardware_arguments(parser, pass_through=pass_through, env=env or {})
    return parser.parse_args(argv)


def test_every_field_is_covered_by_this_test():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(Hardware)}
    assert all(CHANGED[f.name] != f.default for f in dataclasses.fields(Hardware))


def test_defaults_flags_and_env_give_each_field():
    assert hardware_from_args(_parse([])) == Hardware()
    flags = ["--micro-batch-size", "3", "--mixed-precision", "bf16", "--rollout-batch-size", "5",
             "--fp32-frozen-weights", "--compile", "--gradient-checkpointing", "1"]
    assert hardware_from_args(_parse(flags)) == Hardware(**CHANGED)
    env = {"PORTRAITGEN_MICRO_BATCH": "3", "PORTRAITGEN_MIXED_PRECISION": "bf16", "PORTRAITGEN_ROLLOUT_BATCH": "5",
           "PORTRAITGEN_FP32_FROZEN_WEIGHTS": "1", "PORTRAITGEN_COMPILE": "true",
           "PORTRAITGEN_GRADIENT_CHECKPOINTING": "yes"}
    assert hardware_from_args(_parse([], env=env)) == Hardware(**CHANGED)
    # A flag beats the environment, also to switch an option off.
    assert hardware_from_args(_parse(["--compile", "0"], env={"PORTRAITGEN_COMPILE": "1"})).compile is False


def test_bad_values_are_named():
    with pytest.raises(SystemExit):
        _parse(["--compile", "maybe"])
    with pytest.raises(SystemExit, match="PORTRAITGEN_MIXED_PRECISION"):
        _parse([], env={"PORTRAITGEN_MIXED_PRECISION": "fp8"})


def test_launch_pass_through_reproduces_the_hardware():
    given = _parse(["--micro-batch-size", "3", "--mixed-precision", "bf16", "--rollout-batch-size", "5",
                    "--fp32-frozen-weights", "--compile", "--gradient-checkpointing"], pass_through=True)
    assert hardware_from_args(_parse(train_flags(given))) == Hardware(**CHANGED)
    assert train_flags(_parse([], pass_through=True)) == []  # nothing given: nothing passed (train's env applies)


def test_snakemake_resources_and_flags_cover_every_field():
    resources = snakemake_resources()
    assert resources == {"micro_batch": 0, "mixed_precision": "no", "rollout_batch": 0, "fp32_frozen_weights": 0,
                         "compile": 0, "gradient_checkpointing": 0}
    command = snakemake_flags().format(resources=argparse.Namespace(**resources))
    # The rule's default command gives the default Hardware.
    assert hardware_from_args(_parse(command.split())) == Hardware()


def test_train_parser_has_every_hardware_flag(monkeypatch):
    monkeypatch.setenv("PORTRAITGEN_FP32_FROZEN_WEIGHTS", "1")
    args = build_parser().parse_args(["train", "--compile"])
    assert hardware_from_args(args) == Hardware(low_precision_weights=False, compile=True)

"""Every flag of every verb explains itself and shows its default."""
from __future__ import annotations

import argparse

import pytest

from portraitgen.cli import build_parser


def _verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_flag_of_every_verb_has_help():
    missing = [f"{name} {' / '.join(a.option_strings)}" for name, verb in _verbs().items() for a in verb._actions
               if a.option_strings and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, "flags without help: " + ", ".join(missing)


@pytest.mark.parametrize("verb", ["curate", "invert", "precompute", "bench", "train", "tracked", "mlflow-parent"])
def test_params_flag_is_explained_with_its_default(verb):
    options = " ".join(_verbs()[verb].format_help().split()).split("options:", 1)[1]
    explained = options.split("--params PARAMS ", 1)[1][:200]
    assert "params.yaml" in explained and not explained.startswith("-"), explained


def test_defaults_are_shown_including_zero():
    text = " ".join(_verbs()["generate"].format_help().split())
    assert "noise seed;" in text and "(default: 0)" in text
    for flag, default in [("--resolution", "model.resolution of --params, else 64"),
                          ("--steps", "sample.eval_num_steps of --params, else 20"),
                          ("--guidance-scale", "sample.guidance_scale of --params, else 4.5")]:
        assert default in text.split(flag.upper().lstrip("-").replace("-", "_"), 2)[-1], flag
    curate = " ".join(_verbs()["curate"].format_help().split())
    assert "split the files into this many parts (default: 1)" in curate
    assert "--merge-only only read" in curate and "(default: False)" not in curate  # switches: no noise


def test_ablation_help_names_the_execute_option():
    text = " ".join(_verbs()["ablation"].format_help().split())
    assert "with --execute: queue and run" in text and "--run: queue" not in text

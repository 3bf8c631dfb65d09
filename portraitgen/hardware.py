"""How the training work is laid out on the machine: the ``Hardware`` options, declared once.

These options never change what is computed (only its floating-point rounding: precision, kernels,
batch shapes), so they are not params. Each field's metadata names how it is set, and everything
else is derived from it:

- ``portraitgen train`` flags, with ``PORTRAITGEN_*`` environment variables as defaults (how DVC
  stages set them: ``PORTRAITGEN_MIXED_PRECISION=bf16 dvc repro``) -- :func:`add_hardware_arguments`;
- ``portraitgen launch-train``'s pass-through to ``train`` -- :func:`train_flags`;
- the train rule's Snakemake resources and the flags its command passes
  (``snakemake --set-resources train:compile=1``) -- :func:`snakemake_resources`, :func:`snakemake_flags`.

A switch takes an optional value on the command line (``--compile`` = ``--compile 1``; ``--compile 0``),
so that a Snakemake resource (always a value) can turn it on or off.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


def _option(default: Any, *, flag: str, env: str, resource: str, help: str, choices: tuple[str, ...] = (),
            inverted: bool = False) -> Any:
    """A Hardware field: its default, the train flag, the environment variable, the Snakemake resource.
    ``inverted``: the flag says the opposite of the field (``--fp32-frozen-weights`` = not ``low_precision_weights``)."""
    return field(default=default, metadata={"flag": flag, "env": env, "resource": resource, "help": help,
                                            "choices": choices, "inverted": inverted})


@dataclass(frozen=True)
class Hardware:
    """How the work is laid out on the machine. Never changes what is computed (only its floating-point
    rounding: precision, kernels, batch shapes), so it is not in params: CLI flags / Snakemake resources."""

    micro_batch_size: int = _option(
        0, flag="--micro-batch-size", env="PORTRAITGEN_MICRO_BATCH", resource="micro_batch",
        help="samples per forward pass per process; 0 = as large as possible, up to 8")
    mixed_precision: str = _option(
        "no", flag="--mixed-precision", env="PORTRAITGEN_MIXED_PRECISION", resource="mixed_precision",
        choices=("no", "fp16", "bf16"), help="autocast for the transformer (the step math stays float32)")
    rollout_micro_batch_size: int = _option(
        0, flag="--rollout-batch-size", env="PORTRAITGEN_ROLLOUT_BATCH", resource="rollout_batch",
        help="samples per forward pass without gradients (rollouts); 0 = the micro-batch size")
    # With fp16/bf16: store the frozen transformer weights and the VAE in that dtype (autocast casts them to
    # it for every matmul anyway; kept in fp32 they cost twice the memory and a cast per forward pass).
    low_precision_weights: bool = _option(
        True, flag="--fp32-frozen-weights", env="PORTRAITGEN_FP32_FROZEN_WEIGHTS", resource="fp32_frozen_weights",
        inverted=True, help="with --mixed-precision, keep the frozen weights in float32 (default: stored in "
                            "the autocast dtype)")
    compile: bool = _option(
        False, flag="--compile", env="PORTRAITGEN_COMPILE", resource="compile",
        help="torch.compile the transformer (the first calls of each shape compile)")
    gradient_checkpointing: bool = _option(
        False, flag="--gradient-checkpointing", env="PORTRAITGEN_GRADIENT_CHECKPOINTING",
        resource="gradient_checkpointing",
        help="recompute block activations in backward: less memory, ~1/3 more transformer compute")


HARDWARE_FIELDS = tuple(dataclasses.fields(Hardware))


def _dest(f: dataclasses.Field) -> str:
    return f.metadata["flag"].removeprefix("--").replace("-", "_")


def parse_switch(value: str | bool) -> bool:
    """A switch's value: 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected 1 or 0 (true/false, yes/no, on/off), got {value!r}")


def _is_switch(f: dataclasses.Field) -> bool:
    return f.type in (bool, "bool")


def _flag_default(f: dataclasses.Field, env: Mapping[str, str]) -> Any:
    """The flag's default: its environment variable when set, else the field's default."""
    raw = env.get(f.metadata["env"])
    if _is_switch(f):
        flag_default = (not f.default) if f.metadata["inverted"] else f.default
        if raw is None or not raw.strip():
            return flag_default
        try:
            return parse_switch(raw)
        except argparse.ArgumentTypeError as exc:
            raise SystemExit(f"{f.metadata['env']}: {exc}") from None
    if raw is None or not raw.strip():
        return f.default
    if f.metadata["choices"] and raw.strip() not in f.metadata["choices"]:
        raise SystemExit(f"{f.metadata['env']}={raw!r}: expected one of {', '.join(f.metadata['choices'])}")
    try:
        return type(f.default)(raw.strip())
    except ValueError:
        raise SystemExit(f"{f.metadata['env']}={raw!r}: expected {type(f.default).__name__}") from None


def add_hardware_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, pass_through: bool = False,
                           env: Mapping[str, str] | None = None) -> None:
    """The Hardware flags. ``pass_through`` (launch-train): no defaults, a flag is passed on only when given."""
    env = os.environ if env is None else env
    for f in HARDWARE_FIELDS:
        meta = f.metadata
        kwargs: dict[str, Any] = {"dest": _dest(f)}
        if pass_through:
            kwargs["default"] = None
            text = meta["help"]
        else:
            kwargs["default"] = _flag_default(f, env)
            text = f"{meta['help']} (hardware). Env: {meta['env']}"
        if _is_switch(f):
            kwargs.update(nargs="?", const=True, type=parse_switch, metavar="0|1")
            text += "; the flag alone means 1"
        else:
            kwargs["type"] = type(f.default)
            if meta["choices"]:
                kwargs["choices"] = list(meta["choices"])
        parser.add_argument(meta["flag"], help=text, **kwargs)


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    values = {}
    for f in HARDWARE_FIELDS:
        value = getattr(args, _dest(f))
        values[f.name] = (not value) if f.metadata["inverted"] else value
    return Hardware(**values)


def train_flags(args: argparse.Namespace) -> list[str]:
    """The Hardware flags given to launch-train, to pass on to ``portraitgen train``."""
    out = []
    for f in HARDWARE_FIELDS:
        value = getattr(args, _dest(f), None)
        if value is None:
            continue
        out += [f.metadata["flag"], str(int(value)) if isinstance(value, bool) else str(value)]
    return out


def snakemake_resources() -> dict[str, int | str]:
    """Resource name -> default of the train rule (switches are 0/1: Snakemake resources are numbers or strings)."""
    out: dict[str, int | str] = {}
    for f in HARDWARE_FIELDS:
        default = f.default
        if _is_switch(f):
            default = int((not default) if f.metadata["inverted"] else default)
        out[f.metadata["resource"]] = default
    return out


def snakemake_flags() -> str:
    """The train rule's hardware flags, each from its resource."""
    return "".join(f" {f.metadata['flag']} {{resources.{f.metadata['resource']}}}" for f in HARDWARE_FIELDS)

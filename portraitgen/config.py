"""Typed, validated configuration loaded from ``params.yaml``.

Every stage reads its section from one file. Each section is a frozen dataclass whose fields carry a
comment with the unit and whether the value is *global* (summed over all processes) or per process.
Params hold experiment semantics only; hardware choices (micro-batch size, mixed precision, number
of processes) are command-line flags set by the Snakemake profile / Accelerate launcher, so changing
the GPU count never changes what is computed.

Errors name the offending key as a dotted path (``train.lr``), the value found and what was expected,
and are raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A params file is missing, malformed, or holds a value of the wrong type or range."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    family: Literal["sd3", "flux", "zimage"] = "sd3"  # model family; selects the policy adapter
    # A local diffusers pipeline folder, or "builtin:tiny" for a small random-initialised model built
    # in code (for tests and the demo). Nothing is ever downloaded.
    path: str = "builtin:tiny"
    resolution: int = 64  # pixels, square images for rollouts and generation


@dataclass(frozen=True)
class PromptsConfig:
    # "builtin:demo" (a small portrait prompt list shipped in the package) or a path to a .txt file
    # (one prompt per line) or a .jsonl file with a "prompt" (or "caption") field per line.
    source: str = "builtin:demo"


@dataclass(frozen=True)
class SampleConfig:
    num_steps: int = 10  # sampling steps of a training rollout
    step_type: Literal["sde", "cps"] = "sde"  # stochastic step family (design.md §2)
    noise_level: float = 0.7  # `a` in design.md §2; ~0.7 for SD3, ~0.9 for FLUX
    cfg: bool = True  # classifier-free guidance in rollouts *and* training (they must match)
    guidance_scale: float = 4.5  # standard convention: 1.0 means no guidance
    global_batch_size: int = 16  # images sampled per iteration, summed over all processes
    group_size: int = 8  # images per prompt; advantages are normalised within each group
    eval_num_steps: int = 20  # deterministic (ODE) steps for sample grids and `generate`


@dataclass(frozen=True)
class TrainedStepsConfig:
    # "all": every stochastic step; "fraction": a random subset of ceil(fraction*T) steps per sample
    # (Flow-GRPO); "window": SDE only inside a window of `window_size` consecutive steps placed at
    # random within the first `window_range` steps each iteration, ODE elsewhere, and only the
    # window is trained (the "fast" variant).
    mode: Literal["all", "fraction", "window"] = "all"
    fraction: float = 1.0
    window_size: int = 2
    window_range: int = 0  # 0 means "anywhere in the schedule"


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 32
    alpha: float = 64.0
    # Module names (suffixes) that get adapters; empty means the family's default attention projections.
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = True
    decay: float = 0.95  # per optimizer step
    export: bool = True  # export the EMA weights (rather than the raw ones) as the final model


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 40  # GRPO iterations (sample -> score -> train)
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    lr: float = 3e-4  # AdamW learning rate
    warmup_iterations: int = 0  # linear LR warmup, in optimizer steps
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    global_batch_size: int = 8  # samples per optimizer step, summed over all processes
    num_inner_epochs: int = 1  # passes over each iteration's samples
    trained_steps: TrainedStepsConfig = field(default_factory=TrainedStepsConfig)
    clip_range: float = 1e-4  # PPO clip on the ratio; tiny because log-probs are per-dim means
    adv_clip_max: float = 5.0  # advantages are clamped to +-adv_clip_max
    kl_beta: float = 0.04  # weight of the KL to the frozen reference (0 disables the reference)
    global_std: bool = False  # normalise by the std over the whole batch instead of per group
    filter_zero_std: bool = True  # drop groups whose rewards are all equal (they carry no signal)
    max_grad_norm: float = 1.0
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint_every: int = 10  # iterations between checkpoints (the last iteration always saves)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    log_images_every: int = 10  # iterations between sample grids logged to MLflow (0: never)


@dataclass(frozen=True)
class RewardConfig:
    # name -> weight; the training reward is the weighted sum. Names come from the reward registry.
    components: dict[str, float] = field(default_factory=lambda: {"brightness": 1.0})


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # MLflow tracking URI; a server URI for cluster runs
    experiment: str = "portraitgen"
    enabled: bool = True


@dataclass(frozen=True)
class Params:
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def prompts_per_iteration(self) -> int:
        return self.sample.global_batch_size // self.sample.group_size


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (e.g. int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"params key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"params key '{key}': expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        k_tp, v_tp = typing.get_args(tp)
        return {_coerce(k, k_tp, f"{key}.<key>"): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        # YAML reads "1e-4" (no dot) as a string; accept numeric strings, reject everything else.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not in params


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise ConfigError(f"unknown params key {where}; known keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _check_ranges(p: Params) -> None:
    def need(cond: bool, key: str, value: Any, expected: str) -> None:
        if not cond:
            raise ConfigError(f"params key '{key}': {expected}, got {value!r}")

    s, t = p.sample, p.train
    need(p.model.resolution > 0 and p.model.resolution % 16 == 0, "model.resolution", p.model.resolution,
         "expected a positive multiple of 16")
    need(s.num_steps >= 2, "sample.num_steps", s.num_steps, "expected at least 2")
    need(s.eval_num_steps >= 1, "sample.eval_num_steps", s.eval_num_steps, "expected at least 1")
    need(0.0 < s.noise_level <= 1.0 or (s.step_type == "sde" and s.noise_level > 0), "sample.noise_level",
         s.noise_level, "expected a positive noise level (at most 1 for 'cps')")
    need(s.guidance_scale >= 1.0, "sample.guidance_scale", s.guidance_scale, "expected >= 1.0 (1.0 = no guidance)")
    need(s.group_size >= 2, "sample.group_size", s.group_size, "expected at least 2 images per prompt")
    need(s.global_batch_size > 0 and s.global_batch_size % s.group_size == 0, "sample.global_batch_size",
         s.global_batch_size, f"expected a positive multiple of sample.group_size={s.group_size}")
    need(t.global_batch_size > 0 and s.global_batch_size % t.global_batch_size == 0, "train.global_batch_size",
         t.global_batch_size, f"expected a positive divisor of sample.global_batch_size={s.global_batch_size}")
    need(t.iterations >= 1, "train.iterations", t.iterations, "expected at least 1")
    need(t.lr > 0, "train.lr", t.lr, "expected > 0")
    need(t.num_inner_epochs >= 1, "train.num_inner_epochs", t.num_inner_epochs, "expected at least 1")
    need(t.clip_range > 0, "train.clip_range", t.clip_range, "expected > 0")
    need(t.adv_clip_max > 0, "train.adv_clip_max", t.adv_clip_max, "expected > 0")
    need(t.kl_beta >= 0, "train.kl_beta", t.kl_beta, "expected >= 0")
    need(t.max_grad_norm > 0, "train.max_grad_norm", t.max_grad_norm, "expected > 0")
    need(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "expected at least 1")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "expected at least 1")
    need(t.log_images_every >= 0, "train.log_images_every", t.log_images_every, "expected >= 0")
    need(0.0 <= t.ema.decay < 1.0, "train.ema.decay", t.ema.decay, "expected in [0, 1)")
    need(t.lora.rank >= 1, "train.lora.rank", t.lora.rank, "expected at least 1")
    ts = t.trained_steps
    need(0.0 < ts.fraction <= 1.0, "train.trained_steps.fraction", ts.fraction, "expected in (0, 1]")
    need(1 <= ts.window_size <= s.num_steps, "train.trained_steps.window_size", ts.window_size,
         f"expected between 1 and sample.num_steps={s.num_steps}")
    need(ts.window_range == 0 or ts.window_size <= ts.window_range <= s.num_steps, "train.trained_steps.window_range",
         ts.window_range, f"expected 0 or between window_size and sample.num_steps={s.num_steps}")
    need(len(p.reward.components) > 0, "reward.components", p.reward.components, "expected at least one reward")
    need(p.model.path.strip() != "", "model.path", p.model.path, "expected a local folder or 'builtin:tiny'")


def params_from_dict(data: dict | None) -> Params:
    """Build and validate :class:`Params` from a mapping (missing keys take their defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"params: expected a mapping at the top level, got {type(data).__name__}")
    params = _build(Params, data, "")
    _check_ranges(params)
    return params


def load_params(path: str | Path) -> Params:
    """Load ``params.yaml``; every problem is reported with the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return params_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def params_to_dict(params: Params) -> dict:
    return dataclasses.asdict(params)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: the form MLflow params and DVC keys use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

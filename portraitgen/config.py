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
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .policies.families import FAMILY_NAMES  # the registry of model families (imports nothing heavy)


class ConfigError(ValueError):
    """A params file is missing, malformed, or holds a value of the wrong type or range."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    family: Literal[FAMILY_NAMES] = "sd3"  # model family; selects the policy adapter
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
    step_type: Literal["sde", "cps"] = "sde"  # stochastic step family (docs/design.md §2)
    noise_level: float = 0.7  # `a` in docs/design.md §2; ~0.7 for SD3, ~0.9 for FLUX
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
class ExemplarConfig:
    """Real exemplars in the GRPO groups (docs/design.md §4). per_group = 0 is plain GRPO."""

    per_group: int = 0  # E: exemplar trajectories in each group (of sample.group_size); the rest are generated
    index: str = "results/invert/index.parquet"  # the invert stage's index of shards
    group_fraction: float = 1.0  # mixing ratio: fraction of each iteration's groups that get exemplars
    include_in_std: bool = True  # exemplars count in their group's mean/std (else only generated samples do)
    adv_cap: float = 5.0  # upper cap on an exemplar's advantage (the lower bound is -train.adv_clip_max)
    schedule: Literal["constant", "linear_decay"] = "constant"  # E over training
    decay_iterations: int = 0  # linear_decay: E falls to 0 over this many iterations
    rewards: str = ""  # the precompute stage's exemplar_rewards.parquet ("" = score each exemplar once here)


@dataclass(frozen=True)
class SFTConfig:
    """Supervised flow-matching on the real portraits of ``train.exemplars.index`` (portraitgen/sft_loss.py):
    the ablation's control for exemplar GRPO. share = 0 is off."""

    share: float = 0.0  # the supervised term's share of each update's gradient norm; E/G matches E exemplars
    batch_size: int = 4  # real images per optimizer step (forward-noised at logit-normal sigmas)


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
    exemplars: ExemplarConfig = field(default_factory=ExemplarConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)  # supervised baseline on the same real portraits
    # Prompt embeddings from the precompute stage ("" = run the text encoders at start-up instead).
    # With a cache the text encoders are not even loaded.
    prompt_embeddings: str = ""


@dataclass(frozen=True)
class CurateConfig:
    """Curation of real portraits (portraitgen/curate.py). Crops are ``model.resolution`` px squares.

    Only ``crop_scale`` and ``face_min_neighbors`` (and ``model.resolution``) change the cached per-image
    analysis; every other key is applied afterwards, so changing it re-analyses nothing.
    """

    # "builtin:demo" (real portraits shipped in installed wheels), a folder (searched recursively for
    # .jpg/.jpeg/.png/.webp/.bmp/.tif/.tiff), or a list file: .txt (one path per line) or .csv/.jsonl with
    # a "path" column (and optionally "caption"); list paths are relative to the list file.
    source: str = "builtin:demo"
    captions: str = ""  # sidecar .csv/.jsonl: path, caption, optional attribute columns ("" = none)
    caption_model: str = ""  # local transformers VLM folder for captions ("" = template captions)
    include: str = ""  # text file of paths (relative to the source) or sha256/ids: keep only these ("" = all)
    exclude: str = ""  # same format: reject these
    min_side: int = 24  # px; shorter side of the (EXIF-rotated) source below this: too_small
    max_aspect: float = 3.0  # long side / short side above this: extreme_aspect
    face_min_neighbors: int = 5  # Haar detector: overlapping hits needed for a face (higher: fewer false faces)
    max_faces: int = 1  # more prominent faces than this: too_many_faces
    min_face_frac: float = 0.08  # face box side / the image's shorter side below this: face_too_small
    crop_scale: float = 2.2  # crop side / face box side (shifted, then shrunk, to stay inside the image)
    max_upscale: float = 4.0  # crop side x max_upscale must reach model.resolution, else upscale_too_large
    max_blur: float = 0.6  # blur_effect of the crop at native size, 0 sharp .. 1 blurry; above: blurry
    min_brightness: float = 0.12  # mean luma of the crop in [0, 1]
    max_brightness: float = 0.9
    max_clipped: float = 0.3  # fraction of crop pixels pure black or pure white
    min_contrast: float = 0.04  # std of the crop's luma in [0, 1]; below: low_contrast
    dedup_max_distance: int = 6  # pHash bits (of 64) at or below which crops are near-duplicates; -1: off
    bench_fraction: float = 0.1  # fraction of kept images in split bench_reference (by a hash of the id)
    split_seed: int = 0  # seeds that hash; independent of `seed`, so training seeds never move the split
    # Fewer kept images than this fails the stage (exit 2, rejection counts named) and leaves an earlier
    # good output in place: an empty or nearly empty manifest is a wrong source or wrong thresholds.
    min_kept: int = 1


@dataclass(frozen=True)
class InvertConfig:
    """Inversion of curated real portraits into trajectories on the training schedule (docs/design.md §4).

    The schedule, step type and noise level are the training ones (``sample.*``, ``model.resolution``).
    """

    manifest: str = "results/curate/manifest.parquet"  # curated images (id, content_hash, image_path, caption)
    mode: Literal["euler", "fixed_point", "bridge"] = "bridge"
    fixed_point_iters: int = 5  # fixed-point iterations per step (fixed_point, and bridge_start: ode)
    bridge_start: Literal["noise", "ode"] = "noise"  # bridge: start from Gaussian noise or an ODE-inverted x_0
    guidance_scale: float = 1.0  # CFG for the inverting velocity (1 = none; CFG makes inversion unstable)
    shard_size: int = 64  # exemplars per shard file
    diagnostic_samples: int = 4  # generated samples per caption for the trajectory log-prob comparison


@dataclass(frozen=True)
class RewardNormalizeConfig:
    """``(score - mean) / std``, clipped to ±clip (0: no clip), before the component is weighted."""

    mean: float = 0.0
    std: float = 1.0  # > 0
    clip: float = 0.0


@dataclass(frozen=True)
class RewardConfig:
    # name -> weight; the training reward is the weighted sum. Names come from the reward registry.
    components: dict[str, float] = field(default_factory=lambda: {"brightness": 1.0})
    # name -> keyword options of that reward's factory (backend, model path, prompt template, calibration
    # set, batch size, ...); each reward checks its own options. See docs/rewards.md.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # name -> per-component normalisation; components without an entry enter the sum as they are.
    normalize: dict[str, RewardNormalizeConfig] = field(default_factory=dict)
    # A NaN/inf or unscorable image: "error" stops with the reward and images named; "mask" replaces it by
    # the batch mean of that component, counts it and logs the masked fraction (reward/masked).
    on_invalid: Literal["error", "mask"] = "error"


@dataclass(frozen=True)
class BenchRewardConfig:
    """The rewards PortraitBench reports; the same shape as ``reward`` (every component and sub-score is a metric)."""

    # name -> weight, as in reward.components. Weights are not used: each component is reported on its own.
    components: dict[str, float] = field(default_factory=lambda: {"omni_classic": 1.0, "ai_portrait_classic": 1.0})
    # name -> keyword options of that reward's factory, as in reward.options (e.g. a VLM's model_path).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchConfig:
    """PortraitBench (portraitgen/bench): models compared side by side on a versioned suite of portrait prompts."""

    # "builtin:v1" (300 portrait prompts tagged by category, shipped in the package) or a .jsonl file with
    # id, prompt, categories and optional subsets per line.
    suite: str = "builtin:v1"
    subset: str = "cpu"  # "full" (every prompt), "cpu" (28 prompts covering every category), or a subset of the file
    seeds: tuple[int, ...] = (0, 1)  # start-noise seeds: images per prompt and model; diversity needs at least 2
    # label -> model: "base" (model.path with model.family), a training output folder, an exported final/
    # folder, or a diffusers folder. Labels name image folders and table rows.
    models: dict[str, str] = field(default_factory=lambda: {"base": "base"})
    baseline: str = "base"  # the label every other model is compared with
    num_steps: int = 20  # deterministic (ODE) sampling steps per image
    guidance_scale: float = 4.5  # classifier-free guidance, standard convention (1.0 = none)
    # The suite's prompt embeddings (and the empty prompt's, for CFG) made by `portraitgen precompute --bench-only`
    # (results/precompute/bench_prompt_embeddings.safetensors): every model built on model.path (base, its LoRAs
    # and full fine-tunes: training never changes the text encoders) takes its conditioning from this file and is
    # loaded without text encoders; a model on another base uses its own text encoders, with a warning. A cache
    # made by another model, or lacking a suite prompt, is an error. "" = run the text encoders in the bench.
    prompt_embeddings: str = ""
    reward: BenchRewardConfig = field(default_factory=BenchRewardConfig)
    # Real portraits that artifact thresholds and the feature distance are measured against: a curate manifest
    # (its bench_reference split, or every row with a warning when it has none), a folder of images, or
    # builtin:portraits (two photos shipped in wheels, widened by crops; for tests only).
    reference: str = "results/curate/manifest.parquet"
    artifact_quantile: float = 0.95  # flag an image beyond this quantile of the real set (below 1 - q where low is bad)
    bootstrap: int = 2000  # resamples (of whole prompts) for every confidence interval
    confidence: float = 0.95  # level of the bootstrap intervals; a verdict needs the interval to exclude 0
    bootstrap_seed: int = 0  # seeds the resampling: intervals are identical from run to run


@dataclass(frozen=True)
class PretrainArtifactConfig:
    kind: Literal["specular", "smooth", "oversaturate"] = "specular"  # the planted defect (pretrain/artifacts.py)
    fraction: float = 0.7  # share of pretraining views that carry it; 0 pretrains a clean control


@dataclass(frozen=True)
class PretrainDetectorConfig:
    # The planted-artifact CNN: an evaluation measure only, never a training reward.
    steps: int = 1200  # optimizer steps (batches of 64 views, half planted)
    lr: float = 2e-3
    width: int = 16  # channels of its first convolution
    threshold: float = 0.5  # probability above which an image is flagged


@dataclass(frozen=True)
class PretrainConfig:
    """``portraitgen pretrain``: the toy base model (docs/pretrain.md), trained at ``model.resolution``."""
    steps: int = 2400  # optimizer steps (~0.14 s each on two CPU threads at 24 px)
    batch_size: int = 16  # views per step
    lr: float = 2e-3  # AdamW
    warmup_steps: int = 20  # linear LR warm-up
    ema_decay: float = 0.999  # EMA of the weights; the EMA is exported
    num_layers: int = 4  # MMDiT joint blocks
    width: int = 128  # transformer channels (heads of 32)
    caption_dropout: float = 0.1  # share of views trained with the empty prompt (for CFG)
    holdout: int = 16  # LFW faces kept out of pretraining and the detector's training (its test set)
    scheduler_shift: float = 1.0  # flow-matching sigma shift saved with the model (SD3 uses 3 at 1024 px)
    eval_samples: int = 128  # base samples scored for metrics.json (face rate, artifact rate)
    seed: int = 0
    artifact: PretrainArtifactConfig = field(default_factory=PretrainArtifactConfig)
    detector: PretrainDetectorConfig = field(default_factory=PretrainDetectorConfig)


@dataclass(frozen=True)
class TrackingConfig:
    # MLflow tracking URI; a server URI for cluster runs. MLFLOW_TRACKING_URI in the environment wins over it.
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "portraitgen"
    enabled: bool = True
    # A tracking server that does not answer one short probe (seconds): "fail" stops the stage before it
    # starts; "continue" warns and records the run in fallback_uri instead (docs/robustness.md).
    on_unreachable: Literal["fail", "continue"] = "fail"
    fallback_uri: str = "sqlite:///mlflow-fallback.db"  # the local record of runs whose server was unreachable


@dataclass(frozen=True)
class Params:
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    invert: InvertConfig = field(default_factory=InvertConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

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
                number = float(value)
            except ValueError:
                raise bad from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        else:
            number = float(value)
        # No setting means anything with NaN or inf (.inf passes "lr > 0" and fails the run at iteration 1).
        if not math.isfinite(number):
            raise ConfigError(f"params key '{key}': expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is Any:  # free-form values (reward.options) are checked by their consumer
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
    # A multiple of 8 (the pretrained pixel-codec model works at 24 px); each model checks its own
    # constraint (VAE downsampling x patch size) when it builds latents.
    need(p.model.resolution > 0 and p.model.resolution % 8 == 0, "model.resolution", p.model.resolution,
         "expected a positive multiple of 8")
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
    need(t.warmup_iterations >= 0, "train.warmup_iterations", t.warmup_iterations, "expected >= 0")
    need(0.0 <= t.adam_beta1 < 1.0, "train.adam_beta1", t.adam_beta1, "expected in [0, 1)")
    need(0.0 <= t.adam_beta2 < 1.0, "train.adam_beta2", t.adam_beta2, "expected in [0, 1)")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "expected >= 0")
    need(t.adam_eps > 0, "train.adam_eps", t.adam_eps, "expected > 0")
    need(t.lora.alpha > 0, "train.lora.alpha", t.lora.alpha, "expected > 0")
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
    need(0.0 <= t.sft.share < 1.0, "train.sft.share", t.sft.share, "expected in [0, 1)")
    need(t.sft.batch_size >= 1, "train.sft.batch_size", t.sft.batch_size, "expected at least 1")
    need(t.sft.share == 0 or p.prompts.source == "exemplars", "prompts.source", p.prompts.source,
         "expected 'exemplars' when train.sft.share > 0 (the real portraits are the exemplar index's)")
    ex, inv = t.exemplars, p.invert
    need(0 <= ex.per_group < s.group_size, "train.exemplars.per_group", ex.per_group,
         f"expected 0 <= E < sample.group_size={s.group_size} (a group needs generated samples)")
    need(ex.per_group == 0 or p.prompts.source == "exemplars", "prompts.source", p.prompts.source,
         "expected 'exemplars' when train.exemplars.per_group > 0 (groups are built around exemplar captions)")
    need(0.0 <= ex.group_fraction <= 1.0, "train.exemplars.group_fraction", ex.group_fraction, "expected in [0, 1]")
    need(ex.adv_cap > 0, "train.exemplars.adv_cap", ex.adv_cap, "expected > 0")
    need(ex.schedule == "constant" or ex.decay_iterations >= 1, "train.exemplars.decay_iterations",
         ex.decay_iterations, "expected >= 1 with schedule 'linear_decay'")
    need(inv.fixed_point_iters >= 1, "invert.fixed_point_iters", inv.fixed_point_iters, "expected at least 1")
    need(inv.guidance_scale >= 1.0, "invert.guidance_scale", inv.guidance_scale, "expected >= 1.0")
    need(inv.shard_size >= 1, "invert.shard_size", inv.shard_size, "expected at least 1")
    need(inv.diagnostic_samples >= 2, "invert.diagnostic_samples", inv.diagnostic_samples, "expected at least 2")
    cu = p.curate
    need(cu.source.strip() != "", "curate.source", cu.source, "expected 'builtin:demo', a folder or a list file")
    need(cu.min_side >= 1, "curate.min_side", cu.min_side, "expected at least 1 (px)")
    need(cu.min_kept >= 1, "curate.min_kept", cu.min_kept, "expected at least 1 (an empty manifest is never usable)")
    need(cu.max_aspect >= 1.0, "curate.max_aspect", cu.max_aspect, "expected >= 1.0")
    need(cu.face_min_neighbors >= 1, "curate.face_min_neighbors", cu.face_min_neighbors, "expected at least 1")
    need(cu.max_faces >= 1, "curate.max_faces", cu.max_faces, "expected at least 1")
    need(0.0 <= cu.min_face_frac <= 1.0, "curate.min_face_frac", cu.min_face_frac, "expected in [0, 1]")
    need(cu.crop_scale >= 1.0, "curate.crop_scale", cu.crop_scale, "expected >= 1.0 (the crop holds the face)")
    need(cu.max_upscale > 0, "curate.max_upscale", cu.max_upscale, "expected > 0")
    need(0.0 <= cu.max_blur <= 1.0, "curate.max_blur", cu.max_blur, "expected in [0, 1]")
    need(0.0 <= cu.min_brightness <= 1.0, "curate.min_brightness", cu.min_brightness, "expected in [0, 1]")
    need(cu.min_brightness <= cu.max_brightness <= 1.0, "curate.max_brightness", cu.max_brightness,
         f"expected in [curate.min_brightness={cu.min_brightness}, 1]")
    need(0.0 <= cu.max_clipped <= 1.0, "curate.max_clipped", cu.max_clipped, "expected in [0, 1]")
    need(0.0 <= cu.min_contrast <= 1.0, "curate.min_contrast", cu.min_contrast, "expected in [0, 1]")
    need(-1 <= cu.dedup_max_distance <= 64, "curate.dedup_max_distance", cu.dedup_max_distance,
         "expected -1 (off) to 64 bits")
    need(0.0 <= cu.bench_fraction <= 1.0, "curate.bench_fraction", cu.bench_fraction, "expected in [0, 1]")
    need(len(p.reward.components) > 0, "reward.components", p.reward.components, "expected at least one reward")
    for section in ("options", "normalize"):
        for name in getattr(p.reward, section):
            need(name in p.reward.components, f"reward.{section}.{name}", name, "expected a name in reward.components")
    for name, norm in p.reward.normalize.items():
        need(norm.std > 0, f"reward.normalize.{name}.std", norm.std, "expected > 0")
        need(norm.clip >= 0, f"reward.normalize.{name}.clip", norm.clip, "expected >= 0 (0 = no clip)")
    need(p.seed >= 0, "seed", p.seed, "expected >= 0")
    need(p.model.path.strip() != "", "model.path", p.model.path, "expected a local folder or 'builtin:tiny'")
    _check_bench(p.bench, need)
    _check_pretrain(p.pretrain, need)


def _check_pretrain(r: PretrainConfig, need) -> None:
    for key in ("steps", "batch_size", "num_layers", "eval_samples"):
        need(getattr(r, key) >= 1, f"pretrain.{key}", getattr(r, key), "expected at least 1")
    need(r.lr > 0, "pretrain.lr", r.lr, "expected > 0")
    need(r.warmup_steps >= 0, "pretrain.warmup_steps", r.warmup_steps, "expected >= 0")
    need(0.0 <= r.ema_decay < 1.0, "pretrain.ema_decay", r.ema_decay, "expected in [0, 1)")
    need(r.width >= 32 and r.width % 32 == 0, "pretrain.width", r.width, "expected a positive multiple of 32")
    need(0.0 <= r.caption_dropout < 1.0, "pretrain.caption_dropout", r.caption_dropout, "expected in [0, 1)")
    need(0 <= r.holdout <= 92, "pretrain.holdout", r.holdout, "expected 0 to 92 of the 100 LFW faces")
    need(r.scheduler_shift > 0, "pretrain.scheduler_shift", r.scheduler_shift, "expected > 0")
    need(0.0 <= r.artifact.fraction <= 1.0, "pretrain.artifact.fraction", r.artifact.fraction, "expected in [0, 1]")
    need(r.detector.steps >= 1, "pretrain.detector.steps", r.detector.steps, "expected at least 1")
    need(r.detector.lr > 0, "pretrain.detector.lr", r.detector.lr, "expected > 0")
    need(r.detector.width >= 1, "pretrain.detector.width", r.detector.width, "expected at least 1")
    need(0.0 < r.detector.threshold < 1.0, "pretrain.detector.threshold", r.detector.threshold, "expected in (0, 1)")


BENCH_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
BENCH_RESERVED_LABELS = ("comparisons", "suite")  # top-level keys of the bench's metrics.json


def _check_bench(b: BenchConfig, need) -> None:
    need(b.suite.strip() != "", "bench.suite", b.suite, "expected 'builtin:v1' or a .jsonl file")
    need(b.subset.strip() != "", "bench.subset", b.subset, "expected 'full', 'cpu' or a subset of the suite file")
    need(len(b.seeds) > 0, "bench.seeds", list(b.seeds), "expected at least one seed")
    need(len(set(b.seeds)) == len(b.seeds) and min(b.seeds, default=0) >= 0, "bench.seeds", list(b.seeds),
         "expected distinct seeds >= 0")
    need(len(b.models) > 0, "bench.models", b.models, "expected at least one model (label: path)")
    for label, path in b.models.items():
        need(label != "" and set(label) <= BENCH_LABEL_CHARS and label not in BENCH_RESERVED_LABELS and
             label[0] not in ".-", f"bench.models.{label}", label,
             f"expected a label of letters, digits, '_', '.', '-' (not {' or '.join(BENCH_RESERVED_LABELS)})")
        need(path.strip() != "", f"bench.models.{label}", path, "expected 'base' or a model folder")
    need(b.baseline in b.models, "bench.baseline", b.baseline,
         f"expected one of the labels in bench.models ({', '.join(b.models)})")
    need(b.num_steps >= 1, "bench.num_steps", b.num_steps, "expected at least 1")
    need(b.guidance_scale >= 1.0, "bench.guidance_scale", b.guidance_scale, "expected >= 1.0 (1.0 = no guidance)")
    need(len(b.reward.components) > 0, "bench.reward.components", b.reward.components, "expected at least one reward")
    for name in b.reward.options:
        need(name in b.reward.components, f"bench.reward.options.{name}", name,
             "expected a name in bench.reward.components")
    need(b.reference.strip() != "", "bench.reference", b.reference,
         "expected a curate manifest, a folder of real portraits or builtin:portraits")
    need(0.5 < b.artifact_quantile < 1.0, "bench.artifact_quantile", b.artifact_quantile, "expected in (0.5, 1)")
    need(b.bootstrap >= 100, "bench.bootstrap", b.bootstrap, "expected at least 100 resamples")
    need(0.0 < b.confidence < 1.0, "bench.confidence", b.confidence, "expected in (0, 1)")


def params_from_dict(data: dict | None) -> Params:
    """Build and validate :class:`Params` from a mapping (missing keys take their defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"params: expected a mapping at the top level, got {type(data).__name__}")
    params = _build(Params, data, "")
    _check_ranges(params)
    return params


def read_yaml(path: str | Path, what: str, error: type[Exception] = ConfigError) -> Any:
    """The contents of a YAML file; a missing or malformed file raises ``error`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def load_params(path: str | Path) -> Params:
    """Load ``params.yaml``; every problem is reported with the file and the key."""
    path = Path(path)
    data = read_yaml(path, "params file")
    if data is None:  # an empty file would silently run every default
        raise ConfigError(f"{path}: the params file is empty; expected the settings of the experiment "
                          f"(see the repository's params.yaml)")
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


def uses_detector(name: str, options: dict[str, Any]) -> bool:
    """Whether the reward component ``name`` with ``options`` scores with the AI-Portrait detector (at its
    ``path`` option): ``ai_portrait_detector``, or ``ai_portrait`` with ``backend: detector``."""
    return name == "ai_portrait_detector" or (name == "ai_portrait" and options.get("backend") == "detector")


SERVER_KEY = "server"  # the option that makes a reward component remote; never part of its config hash


def scoring_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A component's options without the ``server`` key: what the reward itself is built from."""
    return {k: v for k, v in dict(options or {}).items() if k != SERVER_KEY}


def without_server_keys(reward_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``params.reward`` as a dict with every ``options.<name>.server`` dropped: scoring through a server
    or in process computes the same scores, so caches and fingerprints must not tell them apart."""
    out = dict(reward_cfg)
    if isinstance(out.get("options"), Mapping):
        # An entry left empty goes too: no options and empty options build the same reward.
        out["options"] = {n: scoring_options(o) if isinstance(o, Mapping) else o for n, o in out["options"].items()
                          if not (isinstance(o, Mapping) and not scoring_options(o))}
    return out


def reward_config_hash(params: Params) -> str:
    """The reward settings an exemplar reward table was made with (precompute writes it, training checks it);
    scored in process or by a reward server: the same scores, the same hash."""
    cfg = {"reward": without_server_keys(dataclasses.asdict(params.reward)), "resolution": params.model.resolution}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]

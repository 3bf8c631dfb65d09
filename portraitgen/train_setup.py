"""What a training run settles before its first iteration: how the global batches split over processes
and micro-batches, and how the hardware options apply to the policy. Errors here are
:class:`TrainingSetupError`, raised before any model work.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from .config import Params, TrainConfig
from .hardware import Hardware
from .integrity import IntegrityError, rerun, verify_if_recorded
from .prompts import load_prompts


class TrainingSetupError(ValueError):
    """The run cannot start: params, hardware flags and process count do not fit together."""


@dataclass(frozen=True)
class BatchLayout:
    """Batch sizes of one process. ``micro_batch * accumulation * world == train.global_batch_size`` and
    ``local_samples * world == sample.global_batch_size``: the process count never changes what is computed."""

    micro_batch: int  # samples per forward/backward pass
    accumulation: int  # micro-batches per optimizer step
    rollout_batch: int  # samples per forward pass without gradients (rollouts, exemplar log-probs)
    local_samples: int  # samples this process rolls out per iteration


def batch_layout(params: Params, hardware: Hardware, world: int) -> BatchLayout:
    s, t, w = params.sample, params.train, world
    if s.global_batch_size % w:
        raise TrainingSetupError(f"sample.global_batch_size={s.global_batch_size} is not divisible by the "
                                 f"{w} processes")
    if t.global_batch_size % w:
        raise TrainingSetupError(f"train.global_batch_size={t.global_batch_size} is not divisible by the "
                                 f"{w} processes")
    per_proc = t.global_batch_size // w
    mb = hardware.micro_batch_size
    if mb < 0:
        raise TrainingSetupError(f"--micro-batch-size must be >= 0, got {mb}")
    if mb == 0:  # the largest divisor of the per-process batch up to 8
        mb = max(d for d in range(1, min(per_proc, 8) + 1) if per_proc % d == 0)
    if per_proc % mb:
        raise TrainingSetupError(f"--micro-batch-size={mb} does not divide the per-process train batch "
                                 f"{per_proc} (train.global_batch_size={t.global_batch_size} / {w} processes)")
    if hardware.rollout_micro_batch_size < 0:
        raise TrainingSetupError(f"--rollout-batch-size must be >= 0, got {hardware.rollout_micro_batch_size}")
    # No activations are kept without gradients: rollouts can run larger (more efficient) batches.
    return BatchLayout(micro_batch=mb, accumulation=per_proc // mb,
                       rollout_batch=hardware.rollout_micro_batch_size or mb, local_samples=s.global_batch_size // w)


def training_prompts(params: Params) -> list[str]:
    """The prompts training samples: a prompt source, or the captions of the inverted exemplars."""
    index = params.train.exemplars.index
    if params.prompts.source == "exemplars":
        if not Path(index).is_file():
            raise TrainingSetupError(f"train.exemplars.index: {index} not found (prompts.source is 'exemplars'; "
                                     f"run `portraitgen invert` first)")
        try:  # verified before it is parsed: a flipped bit must not garble the captions trained on
            verify_if_recorded(index, rerun("invert", "portraitgen invert --params params.yaml --out results/invert"), what="train.exemplars.index:")
        except IntegrityError as exc:
            raise TrainingSetupError(str(exc)) from None
        return sorted(set(pd.read_parquet(index, columns=["caption"])["caption"]))
    return load_prompts(params.prompts.source)


def optimizer_and_schedule(t: TrainConfig, trainable: Sequence[torch.nn.Parameter], device: torch.device):
    """AdamW over the trained parameters and its learning-rate schedule (linear warmup, then constant)."""
    # One fused kernel for all (LoRA: hundreds of small) tensors on a GPU; the loop over tensors on a CPU.
    fused = device.type == "cuda" and all(p.is_cuda and p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(list(trainable), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay, eps=t.adam_eps, **({"fused": True} if fused else {}))
    warmup = max(t.warmup_iterations, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def trainable_parameters(policy, t: TrainConfig, hardware: Hardware) -> dict[str, torch.nn.Parameter]:
    """Freeze the policy, add the LoRA adapters (or unfreeze the transformer, keeping a frozen reference
    for the KL term), apply the hardware options; returns the trained parameters by name."""
    policy.freeze_all()
    if t.finetune == "lora":
        policy.enable_lora(t.lora.rank, t.lora.alpha, t.lora.target_modules)
    else:
        policy.enable_full_finetune(keep_reference=t.kl_beta > 0)
    apply_hardware_options(policy, hardware)
    return {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}


def apply_hardware_options(policy, hardware: Hardware) -> None:
    """Precision of the frozen weights, activation checkpointing and compilation of the transformer."""
    hw = hardware
    if hw.mixed_precision != "no" and hw.low_precision_weights:
        policy.cast_frozen(torch.bfloat16 if hw.mixed_precision == "bf16" else torch.float16)
    if hw.mixed_precision != "no" and policy.finetune == "lora":
        policy.lora_input_casts(False)  # autocast casts for the matmul anyway
    if hw.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    if hw.compile:
        # Shapes are few and fixed (rollout, training and reference batches), so no dynamic shapes.
        policy.compile_transformer(dynamic=False)


def hardware_params(hardware: Hardware, layout: BatchLayout, world: int) -> dict[str, Any]:
    """The hardware choices as MLflow params (they change rounding, never what is computed)."""
    hw = hardware
    return {"hardware.world_size": world, "hardware.micro_batch": layout.micro_batch,
            "hardware.rollout_batch": layout.rollout_batch, "hardware.mixed_precision": hw.mixed_precision,
            "hardware.low_precision_weights": hw.low_precision_weights, "hardware.compile": hw.compile,
            "hardware.gradient_checkpointing": hw.gradient_checkpointing}

"""How the training work is laid out on the machine (the ``Hardware`` options).

These options never change what is computed (only its floating-point rounding: precision, kernels,
batch shapes), so they are not params: they are command-line flags, ``PORTRAITGEN_*`` environment
variables and Snakemake resources.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """How the work is laid out on the machine. Never changes what is computed (only its floating-point
    rounding: precision, kernels, batch shapes), so it is not in params: CLI flags / Snakemake resources."""

    micro_batch_size: int = 0  # samples per forward pass per process; 0 = as large as possible, up to 8
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" autocast for the transformer (step math stays fp32)
    rollout_micro_batch_size: int = 0  # samples per forward pass without gradients (rollouts); 0 = micro_batch_size
    # With fp16/bf16: store the frozen transformer weights and the VAE in that dtype (autocast casts them to
    # it for every matmul anyway; kept in fp32 they cost twice the memory and a cast per forward pass).
    low_precision_weights: bool = True
    compile: bool = False  # torch.compile the transformer (the first calls of each shape compile)
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute

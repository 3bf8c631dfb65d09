"""The policy interface: one view over diffusers flow-matching pipelines.

A :class:`FlowPolicy` wraps a diffusers pipeline (SD3/SD3.5, FLUX.1, Z-Image, ...) and exposes what
GRPO needs, in one convention for every family (docs/design.md §2):

- latents are the VAE's, *unpacked* ``[B, C, h, w]`` float32, already shifted/scaled;
- ``sigma`` runs from 1 (noise) to 0 (data) and ``x_sigma = (1 - sigma) x0 + sigma eps``;
- the velocity is ``v = eps - x0``, so the ODE step is ``x' = x + (sigma' - sigma) v``;
- ``guidance_scale`` uses the standard CFG convention (1.0 = no guidance).

Each family adapter converts to and from its transformer's own conventions (timestep scaling, latent
packing, sign of the prediction) inside :meth:`_velocity`, so the sampler and trainer never see them.

Prompt conditioning is a plain ``dict[str, Tensor]`` whose tensors all have the batch first, so
selecting, concatenating and moving it is generic (:func:`cond_select`, :func:`cond_cat`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

Conditioning = dict[str, torch.Tensor]

# The attention projections of an MMDiT block (SD3, FLUX): image stream (to_*) and text stream (add_*).
MMDIT_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                      "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def cond_select(cond: Conditioning, index: torch.Tensor | Sequence[int]) -> Conditioning:
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(list(index), dtype=torch.long)
    return {k: v[index.to(v.device)] for k, v in cond.items()}


def cond_cat(conds: Sequence[Conditioning]) -> Conditioning:
    keys = conds[0].keys()
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in keys}


def cond_to(cond: Conditioning, device: torch.device | str) -> Conditioning:
    return {k: v.to(device) for k, v in cond.items()}


def cond_batch_size(cond: Conditioning) -> int:
    return next(iter(cond.values())).shape[0]


def _cache_processor_signatures(transformer: torch.nn.Module) -> None:
    """Memoise ``inspect.signature`` of the attention processors' ``__call__``.

    diffusers' ``Attention.forward`` (and FLUX's) computes the processor's call signature on every call, to
    warn about unused keyword arguments: ~40 % of the time of an attention call on the tiny models, a few
    percent of a CPU iteration. ``inspect.signature`` returns a function's ``__signature__`` when it has one,
    so storing the (immutable) signature there changes nothing but the cost.
    """
    import inspect

    procs = getattr(transformer, "attn_processors", None)
    if not isinstance(procs, dict):
        return
    for cls in {type(p) for p in procs.values()}:
        fn = getattr(cls, "__call__", None)
        if inspect.isfunction(fn) and "__signature__" not in fn.__dict__:
            try:
                fn.__signature__ = inspect.signature(fn)
            except (TypeError, ValueError):  # not introspectable: leave it alone
                pass


class ModelPathError(FileNotFoundError):
    """The configured model folder does not exist or is not a diffusers pipeline of the right family."""


class FlowPolicy(ABC):
    """A flow-matching text-to-image model seen as a GRPO policy."""

    family: ClassVar[str]
    pipeline_class: ClassVar[type]
    # Attention projections that get LoRA adapters by default (names as peft matches them).
    default_lora_targets: ClassVar[tuple[str, ...]]
    # Class names of the transformer's repeated blocks (regional compilation), when the model does not list
    # them itself in ``_repeated_blocks``.
    repeated_blocks: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipeline, device: torch.device | str = "cpu"):
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        # What velocity predictions call. The trainer replaces it with the DDP-wrapped transformer so
        # gradients synchronise; `self.transformer` always stays the bare module.
        self.denoiser: torch.nn.Module = self.transformer
        self.finetune: str | None = None
        self._reference_transformer: torch.nn.Module | None = None
        _cache_processor_signatures(self.transformer)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, text_encoders: bool = True) -> "FlowPolicy":
        """Load a local diffusers pipeline folder (never the hub: ``local_files_only``).

        ``text_encoders=False`` skips loading them (training from cached prompt embeddings): for large
        models that is several GiB of memory and a long load saved.
        """
        path = Path(path)
        if not path.is_dir():
            raise ModelPathError(f"model folder not found: {path} (model.path in params; expected a local "
                                 f"diffusers pipeline folder or 'builtin:tiny')")
        if not (path / "model_index.json").is_file():
            raise ModelPathError(f"{path} has no model_index.json: not a diffusers pipeline folder "
                                 f"(model.path in params)")
        skip = {}
        if not text_encoders:
            index = json.loads((path / "model_index.json").read_text())
            skip = {name: None for name in index if name.startswith("text_encoder")}
        pipe = cls.pipeline_class.from_pretrained(str(path), dtype=dtype, local_files_only=True, **skip)
        return cls(pipe, device=device)

    @staticmethod
    @abstractmethod
    def build_tiny_pipeline(seed: int = 0):
        """A small random-initialised pipeline of this family, built in code (tests and demo)."""

    # ---------------------------------------------------------------- components
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the transformer's inputs are cast to: its first floating parameter's, as diffusers'
        ``ModelMixin.dtype`` reports it, without that property's walk over every submodule (about a
        millisecond per call on a large model, once per forward pass)."""
        module = self.transformer
        if getattr(module, "_keep_in_fp32_modules", None):
            return module.dtype
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
        return module.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ---------------------------------------------------------------- text
    @abstractmethod
    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text-encoder outputs for ``prompts`` (batch first), on ``self.device``."""

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        if getattr(self.pipeline, "text_encoder", None) is None:
            raise RuntimeError("this policy was loaded without text encoders (cached embeddings); "
                               "load it with text_encoders=True to encode prompts")
        return self._encode_prompts(list(prompts))

    # ---------------------------------------------------------------- schedule and latents
    @abstractmethod
    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The sampling schedule ``[num_steps + 1]`` from 1 to 0, exactly as the family's pipeline uses it."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if height % (2 * f) or width % (2 * f):
            raise ValueError(f"image size {height}x{width} must be a multiple of {2 * f} for this model")
        return (self.vae.config.latent_channels, height // f, width // f)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], float32 ``[B, 3, H, W]``."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` -> latents (the posterior mode, so it is deterministic)."""
        cfg = self.vae.config
        out = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype))
        # AutoencoderKL returns a posterior (take its mode); AutoencoderTiny (TAESD) returns latents.
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        return (z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    # ---------------------------------------------------------------- velocity
    @abstractmethod
    def _velocity(self, module: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                  cond: Conditioning) -> torch.Tensor:
        """One transformer call; returns ``v = eps - x0`` as float32 in the unpacked latent layout."""

    def predict_velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                         uncond: Conditioning | None = None, guidance_scale: float = 1.0,
                         module: torch.nn.Module | None = None) -> torch.Tensor:
        """Velocity at ``(latents, sigma)``; with ``uncond`` and ``guidance_scale != 1`` applies CFG in one
        batched call (conditional and unconditional halves), as the diffusers pipelines do."""
        module = self.denoiser if module is None else module
        b = latents.shape[0]
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.to(device=latents.device, dtype=torch.float32)
            if sigma.ndim == 0:
                sigma = sigma.expand(b)
        else:  # a fill on the device: no host-to-device copy, so no wait for the device
            sigma = torch.full((b,), float(sigma), dtype=torch.float32, device=latents.device)
        if uncond is None or guidance_scale == 1.0:
            return self._velocity(module, latents, sigma, cond)
        both = cond_cat([uncond, cond])
        v = self._velocity(module, torch.cat([latents, latents]), torch.cat([sigma, sigma]), both)
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def reference_velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                           uncond: Conditioning | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """Velocity of the frozen base model (for the KL term), without gradients."""
        with torch.no_grad(), self.reference():
            module = self._reference_transformer if self._reference_transformer is not None else self.transformer
            return self.predict_velocity(latents, sigma, cond, uncond, guidance_scale, module=module)

    # ---------------------------------------------------------------- trainable parameters
    def enable_lora(self, rank: int, alpha: float, target_modules: Sequence[str] = ()) -> None:
        """Freeze the base transformer and add a LoRA adapter (peft) on its attention projections."""
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        targets = list(target_modules) or list(self.default_lora_targets)
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                target_modules=targets))
        # LoRA weights train in float32 even when the frozen base is bf16 (optimizer precision).
        for p in self.transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.finetune = "lora"
        self.__dict__.pop("_lora_layer_cache", None)

    def enable_full_finetune(self, keep_reference: bool) -> None:
        """Train every transformer weight; keep a frozen copy as the KL reference when it is used."""
        if keep_reference:
            self._reference_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        self.transformer.requires_grad_(True)
        self.finetune = "full"

    # ---------------------------------------------------------------- hardware options (never change what is computed)
    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Store the frozen transformer weights and the VAE in ``dtype`` (bf16/fp16 runs).

        Under autocast every matmul casts its weights to the autocast dtype anyway; frozen weights kept in
        float32 are cast again at every forward pass (autocast caches casts of trainable leaves only). Stored
        in low precision they take half the memory and no cast. Trainable weights stay float32.
        """
        for module in (self.transformer, self._reference_transformer):
            if module is not None:
                for p in module.parameters():
                    if not p.requires_grad and p.is_floating_point():
                        p.data = p.data.to(dtype)
        self.vae.to(dtype)  # never trained; decode/encode cast their inputs to its dtype

    def lora_input_casts(self, enabled: bool) -> None:
        """peft casts each LoRA layer's input to the adapter's dtype (float32) before ``lora_A``; under
        autocast the matmul casts it straight back to bf16/fp16. Without the cast the result is the same
        (the bf16 -> fp32 -> bf16 round trip is exact) and two full-size copies of every adapted layer's
        input are saved; ``enabled=False`` is for autocast runs only."""
        for layer in self._lora_layers():
            layer.cast_input_dtype_enabled = enabled

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block's activations in the backward pass (diffusers' checkpointing):
        activation memory of one block instead of all, for ~1/3 more transformer compute in training."""
        if not getattr(self.transformer, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.transformer).__name__} does not support gradient checkpointing")
        self.transformer.enable_gradient_checkpointing()

    def compile_transformer(self, regional: bool = True, **options) -> None:
        """``torch.compile`` the transformer in place (``nn.Module.compile``: parameter names, LoRA export and
        checkpoints are unchanged). The first calls of each shape and grad mode compile.

        ``regional`` (default) compiles each repeated block (:attr:`repeated_blocks`, or the model's own
        ``_repeated_blocks``) rather than the whole model: the blocks share their code, so compilation takes
        a fraction of the time (docs/design.md §8: ~140 s for the whole SD3.5-medium transformer) for most of
        the speed-up; the glue around them (embeddings, final layer) stays eager.
        """
        import torch._dynamo

        # One graph per block structure (e.g. SD3.5's dual-attention, plain and last blocks) and per call kind
        # (rollout: no grad, adapters on; training: grad; KL reference: adapters off; each at its batch size):
        # more than dynamo's default 8 per code object, past which it silently runs the rest eagerly.
        cfg = torch._dynamo.config
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, limit):
                setattr(cfg, limit, max(getattr(cfg, limit), 64))
        names = tuple(getattr(self.transformer, "_repeated_blocks", None) or self.repeated_blocks)
        if regional and names:
            blocks = [m for m in self.transformer.modules() if type(m).__name__ in names]
            for block in blocks:
                block.compile(**options)
            if blocks:
                return
        self.transformer.compile(**options)

    def compiled_modules(self) -> list[torch.nn.Module]:
        return [m for m in self.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]

    def attention_processors(self) -> list[str]:
        """Class names of the transformer's attention processors (all use SDPA unless a family says otherwise)."""
        procs = getattr(self.transformer, "attn_processors", None)
        return sorted({type(p).__name__ for p in procs.values()}) if isinstance(procs, dict) else []

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU: once prompts are embedded, training never calls them, and
        on a GPU they would hold memory (T5-XXL alone is ~9 GiB in bf16) for nothing."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                module.to("cpu")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.transformer.named_parameters() if p.requires_grad}

    def freeze_all(self) -> None:
        """Freeze every component (text encoders and VAE are never trained)."""
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context the bare transformer behaves as the frozen base (LoRA disabled)."""
        if self.finetune == "lora":
            # What diffusers' disable_adapters()/enable_adapters() do, on a cached list of the LoRA layers:
            # they walk every submodule on each call (twice per training step for the KL reference).
            layers = self._lora_layers()
            for layer in layers:
                layer.enable_adapters(False)
            try:
                yield
            finally:
                for layer in layers:
                    layer.enable_adapters(True)
        else:
            yield

    def _lora_layers(self) -> list[torch.nn.Module]:
        cached = self.__dict__.get("_lora_layer_cache")
        if cached is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            cached = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
            self.__dict__["_lora_layer_cache"] = cached
        return cached

    @property
    def has_reference(self) -> bool:
        return self.finetune == "lora" or self._reference_transformer is not None

    # ---------------------------------------------------------------- export
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)

    def save_lora(self, out_dir: str | os.PathLike) -> None:
        """Write the adapter in the form ``pipe.load_lora_weights(out_dir)`` accepts."""
        # The adapter metadata carries lora_alpha: without it diffusers reloads with alpha = rank.
        self.pipeline_class.save_lora_weights(
            str(out_dir), transformer_lora_layers=self.lora_state_dict(), safe_serialization=True,
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict())

    def save_full(self, out_dir: str | os.PathLike) -> None:
        """Write a complete diffusers pipeline folder with the trained transformer."""
        self.pipeline.save_pretrained(str(out_dir), safe_serialization=True)

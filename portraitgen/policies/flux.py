"""FLUX.1 adapter (``FluxPipeline``: MMDiT + single-stream transformer, CLIP-L pooled + T5 text).

What differs from SD3 and is converted here, so the sampler and trainer keep the one convention of
docs/design.md §2 (unpacked ``[B, C, h, w]`` latents, ``v = eps - x0``, sigma from 1 to 0):

- **Packed latents.** The FLUX transformer sees 2x2 latent patches as tokens: ``[B, (h/2)(w/2), 4C]``
  (``FluxPipeline._pack_latents``), with per-token position ids ``img_ids`` (row, column) and all-zero
  ``txt_ids`` for the text tokens. :meth:`_velocity` packs on the way in and unpacks on the way out, so
  callers always hold the VAE's unpacked latent. The pipeline itself takes and returns *packed* latents
  (``pipe(latents=..., output_type="latent")``); use :meth:`pack` / :meth:`unpack` to compare.
- **Timestep.** The pipeline passes ``timestep / 1000`` (= sigma) and the transformer multiplies by 1000
  internally, so we pass sigma directly.
- **Distilled guidance.** FLUX.1-dev has ``guidance_embeds=True``: the guidance scale is an *input* of the
  transformer (an embedding, distilled from CFG), not a second forward pass. :attr:`distilled_guidance`
  holds the value passed there (FluxPipeline's ``guidance_scale`` argument, 3.5 by default). It is
  independent of the ``guidance_scale`` of :meth:`FlowPolicy.predict_velocity`, which is *true* CFG with an
  unconditional prompt (FluxPipeline's ``true_cfg_scale`` / ``negative_prompt``: same formula,
  ``v_u + g (v_c - v_u)``); for FLUX.1-dev one usually leaves that at 1 and relies on the distilled one.
  FLUX.1-schnell (``guidance_embeds=False``) ignores :attr:`distilled_guidance`.
- **Schedule.** ``np.linspace(1, 1/T, T)`` shifted by the resolution-dependent ``mu`` (dynamic shifting on
  the packed image sequence length), then the scheduler appends the terminal 0.
- The VAE is the 16-channel FLUX VAE with ``shift_factor``/``scaling_factor``; the base class's
  :meth:`~FlowPolicy.decode`/:meth:`~FlowPolicy.encode` already apply both exactly as the pipeline does.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import CLIPTextModel, T5EncoderModel

from .base import MMDIT_LORA_TARGETS, Conditioning, FlowPolicy
from .tiny_vae import linear_tiny_vae
from .tiny_text import clip_config, clip_tokenizer, t5_config, t5_tokenizer


class FluxPolicy(FlowPolicy):
    family = "flux"
    pipeline_class = FluxPipeline
    # "attn.to_q/k/v" also match the single-stream blocks' attention (those have no to_out: their output
    # goes through the block's proj_out together with the MLP). The add_* projections are the text stream of
    # the dual-stream blocks. This is the attention set of diffusers' FLUX LoRA training scripts.
    default_lora_targets = MMDIT_LORA_TARGETS
    # T5 sequence length; FluxPipeline's default (FLUX.1-dev). Lower it (e.g. 256, schnell's) to save compute;
    # sampling parity with the pipeline then needs the same `max_sequence_length` there.
    max_sequence_length = 512
    # The guidance value fed to the guidance embedding of guidance-distilled models (FLUX.1-dev), i.e.
    # FluxPipeline's `guidance_scale` argument. Set it on the instance to change it.
    distilled_guidance: float = 3.5

    @staticmethod
    def build_tiny_pipeline(seed: int = 0) -> FluxPipeline:
        torch.manual_seed(seed)
        clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
        clip_cfg = clip_config(clip_tok)
        t5_cfg = t5_config(t5_tok)
        # in_channels = 4 x latent channels (2x2 packing, patch_size 1); sum(axes_dims_rope) = head dim;
        # joint_attention_dim = T5 width; pooled_projection_dim = CLIP width (FLUX uses CLIP's pooled output,
        # without a projection). guidance_embeds=True as in FLUX.1-dev, so the distilled-guidance path is used.
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2,
                                             joint_attention_dim=t5_cfg.d_model,
                                             pooled_projection_dim=clip_cfg.hidden_size, guidance_embeds=True,
                                             axes_dims_rope=(4, 6, 6))
        # FLUX.1-dev's scheduler_config.json.
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        return FluxPipeline(
            scheduler=scheduler, vae=linear_tiny_vae(16),
            text_encoder=CLIPTextModel(clip_cfg), tokenizer=clip_tok,
            text_encoder_2=T5EncoderModel(t5_cfg), tokenizer_2=t5_tok, transformer=transformer)

    # ---------------------------------------------------------------- text
    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        # txt_ids are all zeros of the text length; _velocity rebuilds them rather than storing a
        # non-batch-first tensor here.
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    # ---------------------------------------------------------------- schedule and latents
    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        c = scheduler.config
        h, w = self.latent_shape(height, width)[1:]
        image_seq_len = (h // 2) * (w // 2)  # packed tokens, as FluxPipeline computes it (latents.shape[1])
        mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if c.get("use_flow_sigmas", False):  # mirrors FluxPipeline.__call__
            scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
        return scheduler.sigmas.float().cpu()

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> FluxPipeline's packed ``[B, (h/2)(w/2), 4C]``."""
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    @staticmethod
    def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Packed ``[B, (h/2)(w/2), 4C]`` -> ``[B, C, h, w]`` (``h, w`` in latent pixels)."""
        b, _, d = packed.shape
        c = d // 4
        x = packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    # ---------------------------------------------------------------- velocity
    def _image_ids(self, h: int, w: int, device, dtype) -> torch.Tensor:
        """The packed latent's position ids, built once per shape: the pipeline's helper builds them on the
        host and copies them to the device, which would make every forward pass wait for the device."""
        cache = self.__dict__.setdefault("_image_ids_cache", {})
        key = (h, w, str(device), dtype)
        if key not in cache:
            cache[key] = FluxPipeline._prepare_latent_image_ids(1, h, w, device, dtype)
        return cache[key]

    def _velocity(self, module, latents, sigma, cond):
        dtype = self.compute_dtype
        device = latents.device
        b, _, h, w = latents.shape
        embeds = cond["prompt_embeds"].to(dtype)
        img_ids = self._image_ids(h // 2, w // 2, device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), float(self.distilled_guidance), device=device, dtype=torch.float32)
        out = module(hidden_states=self.pack(latents.to(dtype)), timestep=sigma.to(dtype), guidance=guidance,
                     pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=embeds,
                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return self.unpack(out, h, w).float()

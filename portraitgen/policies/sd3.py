"""SD3 / SD3.5 adapter (``StableDiffusion3Pipeline``, MMDiT transformer, CLIP-L + CLIP-G + T5 text)."""
from __future__ import annotations

import copy

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from .base import MMDIT_LORA_TARGETS, Conditioning, FlowPolicy
from .tiny_text import clip_config, clip_tokenizer, t5_config, t5_tokenizer
from .tiny_vae import linear_tiny_vae


class SD3Policy(FlowPolicy):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    default_lora_targets = MMDIT_LORA_TARGETS
    repeated_blocks = ("JointTransformerBlock",)
    # T5 tokens per prompt; Flow-GRPO's SD3 setting (portrait captions fit; the pipeline default is 256).
    max_sequence_length = 128

    @staticmethod
    def build_tiny_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
        torch.manual_seed(seed)
        clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
        clip_cfg = clip_config(clip_tok)
        # joint_attention_dim = T5 width; pooled_projection_dim = the two CLIP projections concatenated.
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
                                            pos_embed_max_size=16)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=linear_tiny_vae(4),
            text_encoder=CLIPTextModelWithProjection(clip_cfg), tokenizer=clip_tok,
            text_encoder_2=CLIPTextModelWithProjection(clip_cfg), tokenizer_2=clip_tok,
            text_encoder_3=T5EncoderModel(t5_config(t5_tok)), tokenizer_3=t5_tok)

    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.t5_tokens)
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    @property
    def t5_tokens(self) -> int:
        """T5 tokens per prompt: ``max_sequence_length``, or fewer when the model's T5 tokenizer says so
        (the pretrained toy model is trained on 32: its text tokens cost as much compute as its image)."""
        tok = getattr(self.pipeline, "tokenizer_3", None)
        limit = getattr(tok, "model_max_length", None) if tok is not None else None
        return min(self.max_sequence_length, limit) if isinstance(limit, int) and limit > 0 else self.max_sequence_length

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            p = self.transformer.config.patch_size
            f = self.vae_scale_factor
            seq_len = (height // f // p) * (width // f // p)
            c = scheduler.config
            kwargs["mu"] = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.float().cpu()

    def _velocity(self, module, latents, sigma, cond):
        dtype = self.compute_dtype
        # The timestep stays float32 (as in the diffusers pipeline): in bf16, sigma * 1000 would be rounded
        # to ~4 units before the sinusoidal embedding.
        out = module(hidden_states=latents.to(dtype), timestep=sigma.float() * 1000,
                     encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                     pooled_projections=cond["pooled_projections"].to(dtype), return_dict=False)[0]
        return out.float()

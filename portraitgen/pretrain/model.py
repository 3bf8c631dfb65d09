"""The base model that pretraining starts from: an SD3-family pipeline built in code.

- transformer: ``SD3Transformer2DModel`` (MMDiT), ``num_layers`` joint blocks of ``width`` channels in
  heads of :data:`HEAD_DIM`, 2x2 latent patches (one token per 2x2 pixels with the pixel codec);
  4 layers x 128 is ~2.3 M parameters;
- VAE: the lossless pixel codec (:mod:`.codec`);
- text encoders and tokenizers: the tiny in-code CLIP-L/CLIP-G/T5 of ``builtin:tiny``, random and
  frozen (random features still tell prompts apart; pretraining trains the transformer to read them),
  with short token windows (:data:`CLIP_TOKENS`, :data:`T5_TOKENS`): the text tokens go through every
  joint block, and 77 + 128 of them would cost 2.4x the compute of the 144 image tokens of a 24 px face;
- scheduler: ``FlowMatchEulerDiscreteScheduler`` with ``shift`` (1 suits a 144-token image; SD3's 3
  is for 4096 tokens).
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from ..policies.tiny_text import clip_config, clip_tokenizer, t5_config, t5_tokenizer
from .codec import LATENT_CHANNELS, pixel_codec_vae

HEAD_DIM = 32
CLIP_TOKENS = 16
T5_TOKENS = 32
TEXT_WIDTH = 64  # T5 d_model = joint_attention_dim; the two CLIP projections (32 each) = pooled width


def build_transformer(resolution: int, num_layers: int, width: int) -> SD3Transformer2DModel:
    if width % HEAD_DIM:
        raise ValueError(f"params key 'pretrain.width': expected a multiple of {HEAD_DIM}, got {width}")
    tokens_per_side = resolution // 2
    return SD3Transformer2DModel(sample_size=resolution, patch_size=2, in_channels=LATENT_CHANNELS,
                                 out_channels=LATENT_CHANNELS, num_layers=num_layers, attention_head_dim=HEAD_DIM,
                                 num_attention_heads=width // HEAD_DIM, caption_projection_dim=width,
                                 joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
                                 pos_embed_max_size=tokens_per_side)


def build_pipeline(resolution: int, num_layers: int, width: int, shift: float, seed: int) -> StableDiffusion3Pipeline:
    """A freshly initialised pipeline (seeded: the same settings give the same initial weights)."""
    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(CLIP_TOKENS), t5_tokenizer(T5_TOKENS)
    clip_cfg = clip_config(clip_tok)
    pipe = StableDiffusion3Pipeline(
        transformer=build_transformer(resolution, num_layers, width),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=pixel_codec_vae(),
        text_encoder=CLIPTextModelWithProjection(clip_cfg), tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_cfg), tokenizer_2=clip_tok,
        text_encoder_3=T5EncoderModel(t5_config(t5_tok)), tokenizer_3=t5_tok)
    # Models built from a config start in training mode; T5's dropout (0.1) would then perturb every
    # prompt embedding the pretraining loop learns from, while the saved model, loaded in eval mode,
    # samples with clean ones: the conditioning it was trained on would never be seen again.
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae):
        encoder.eval()
    return pipe


@torch.no_grad()
def encode_prompts(pipeline: StableDiffusion3Pipeline, prompts: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` ``[N, CLIP_TOKENS + T5_TOKENS, TEXT_WIDTH]`` and ``pooled_projections`` ``[N, TEXT_WIDTH]``,
    exactly as the pipeline (and ``SD3Policy``) computes them: the text encoders in eval mode (no dropout)."""
    for encoder in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3):
        encoder.eval()
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch):
        e, _, p, _ = pipeline.encode_prompt(prompt=prompts[i:i + batch], prompt_2=None, prompt_3=None,
                                            device="cpu", do_classifier_free_guidance=False,
                                            max_sequence_length=T5_TOKENS)
        embeds.append(e)
        pooled.append(p)
    return {"prompt_embeds": torch.cat(embeds), "pooled_projections": torch.cat(pooled)}

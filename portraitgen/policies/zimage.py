"""Z-Image adapter (``ZImagePipeline``: single-stream DiT, Qwen3 text encoder, FLUX VAE).

Conversions done here so that the sampler and trainer keep docs/design.md §2's convention (unpacked
``[B, C, h, w]`` latents, ``v = eps - x0``, sigma from 1 to 0):

- **Latents as a list.** The transformer takes a *list* of per-sample latents, each ``[C, F=1, h, w]``
  (a frame axis, ``unsqueeze(2)``), and returns a list of the same shapes.
- **Timestep.** The pipeline passes ``(1000 - t) / 1000`` = ``1 - sigma`` (the model's time runs from 0 =
  noise to 1 = data).
- **Sign.** The model predicts ``x0 - eps``; the pipeline negates it before the Euler step, so
  :meth:`_velocity` returns ``-output``.
- **Variable-length captions.** The pipeline hands the transformer one ``[len_i, D]`` tensor per prompt
  (the Qwen3 hidden states, second to last layer, of the real tokens only; the transformer pads them itself to
  multiples of 32 with a learned pad token). A :data:`Conditioning` must be batch-first tensors, so
  :meth:`_encode_prompts` stores ``prompt_embeds`` zero-padded to a fixed ``[B, max_sequence_length, D]``
  plus a boolean ``prompt_mask`` ``[B, max_sequence_length]``; the fixed length makes conditionings of
  separate calls concatenable (``cond_cat``). :meth:`_velocity` cuts each prompt back to its real tokens,
  exactly as the pipeline does, so the padding never reaches the model.
- **CFG convention.** Our ``guidance_scale`` ``g`` is the standard one (1 = no guidance,
  ``v = v_u + g (v_c - v_u)``). ZImagePipeline writes ``pred = pos + g_z (pos - neg)`` and turns CFG off at
  ``g_z = 0``, so ``g_z = g - 1``: ``pipe(guidance_scale=g_z)`` corresponds to ``predict_velocity(...,
  guidance_scale=g_z + 1)`` with ``uncond`` = the encoding of the negative prompt (``""`` by default).
  The pipeline's optional ``cfg_normalization`` / ``cfg_truncation`` (< 1) are not reproduced.
- **Schedule.** ``get_default_z_image_sigmas(T)`` (torch ``linspace(1, 1/T, T)``), the scheduler's shift
  (static ``shift=3`` for Z-Image-Turbo; ``mu`` from the image sequence length if dynamic shifting is on),
  then the terminal 0.
- The VAE is the FLUX one (16 channels, ``shift_factor``/``scaling_factor``), handled by the base class.
"""
from __future__ import annotations

import copy

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .base import Conditioning, FlowPolicy
from .tiny_vae import linear_tiny_vae
from .tiny_text import WORDS

# Qwen-style chat template, reduced to what ZImagePipeline uses (one user message plus the generation
# prompt; the pipeline passes enable_thinking=True, which the real Qwen3 template treats as "no extra
# think block", so it is ignored here).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer(max_length: int = 512) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer in the Qwen2/3 format, built in process.

    All 256 byte symbols are in the vocabulary, so any text tokenises; a portrait word after a space
    (``Ġword``) is a single token, anything else falls back to bytes. ``<|im_start|>``/``<|im_end|>``
    are special tokens for the chat template that ZImagePipeline applies to every prompt. Padding is on the
    right: with the causal Qwen3 encoder the real tokens' states then do not depend on the padding.
    """
    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in byte_chars:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    space = bytes_to_unicode()[ord(" ")]  # "Ġ"
    for word in WORDS:
        # Left-to-right merges of "Ġword" only: every merge then extends the one piece that starts with Ġ,
        # so no two words' merges compete and each spaced word becomes exactly one token. (Adding merges for
        # the bare words too would let, e.g., "an" merge inside "Ġwoman" first and split it.)
        cur = space
        for ch in word:
            merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab.setdefault(s, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), unk_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=max_length,
                         padding_side="right", chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(s, special=True) for s in specials[1:]]})
    return tok


class ZImagePolicy(FlowPolicy):
    """Z-Image (``ZImagePipeline``) as a GRPO policy.

    CFG convention: ``predict_velocity(..., guidance_scale=g)`` is standard CFG (``g = 1``: none). The
    pipeline's ``guidance_scale`` ``g_z`` means ``pos + g_z (pos - neg)``, so ``g_z = g - 1`` (its
    ``guidance_scale=0`` = our 1; its default 5.0 = our 6.0). Z-Image-Turbo is sampled without CFG
    (``g_z = 0``), i.e. our ``guidance_scale=1``.
    """

    family = "zimage"
    pipeline_class = ZImagePipeline
    # The attention projections of every block (noise refiner, context refiner and the main layers).
    default_lora_targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
    # Qwen3 tokens per prompt (ZImagePipeline's default); also the fixed padded length of prompt_embeds.
    max_sequence_length = 512

    @staticmethod
    def build_tiny_pipeline(seed: int = 0) -> ZImagePipeline:
        torch.manual_seed(seed)
        tok = qwen_tokenizer()
        text_cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
        # head dim = dim / n_heads = sum(axes_dims) (3-axis RoPE: frame, row, column; each even);
        # cap_feat_dim = the Qwen3 width; in_channels = the VAE's 16 latent channels; patch 2x2, 1 frame.
        transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                               n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                               cap_feat_dim=text_cfg.hidden_size, axes_dims=[4, 6, 6],
                                               axes_lens=[1024, 64, 64])
        # Z-Image-Turbo's scheduler_config.json: static shift 3, no dynamic shifting.
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
        return ZImagePipeline(scheduler=scheduler, vae=linear_tiny_vae(16),
                              text_encoder=Qwen3Model(text_cfg), tokenizer=tok, transformer=transformer)

    # ---------------------------------------------------------------- text
    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        # _encode_prompt rewrites its list in place (chat template), hence the copy.
        embeds = self.pipeline._encode_prompt(prompt=list(prompts), device=self.device,
                                              max_sequence_length=self.max_sequence_length)
        n, d = len(embeds), embeds[0].shape[-1]
        padded = embeds[0].new_zeros(n, self.max_sequence_length, d)
        mask = torch.zeros(n, self.max_sequence_length, dtype=torch.bool, device=padded.device)
        for i, e in enumerate(embeds):
            padded[i, : len(e)] = e
            mask[i, : len(e)] = True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    # ---------------------------------------------------------------- schedule
    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        c = scheduler.config
        h, w = self.latent_shape(height, width)[1:]
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        # As ZImagePipeline: mu is always passed; the scheduler only uses it with dynamic shifting.
        scheduler.set_timesteps(num_steps, device="cpu", sigmas=get_default_z_image_sigmas(num_steps), mu=mu)
        return scheduler.sigmas.float().cpu()

    # ---------------------------------------------------------------- velocity
    def _velocity(self, module, latents, sigma, cond):
        dtype = self.compute_dtype
        mask = cond["prompt_mask"].bool()
        caps = [e[m].to(dtype) for e, m in zip(cond["prompt_embeds"], mask)]
        x = list(latents.to(dtype).unsqueeze(2).unbind(0))
        out = module(x, (1.0 - sigma).float(), caps, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

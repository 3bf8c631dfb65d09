"""A tiny random-initialised Qwen2.5-VL, built in code, for tests, the demo and benchmarks.

Same loading path as a real model: it is saved with ``save_pretrained`` (model, tokenizer with its
chat template, image processor) and always loaded back with ``from_pretrained``. The tokenizer is a
byte-level BPE built in process (every byte is a token, so the digits "1"…"9" are single tokens) with
the Qwen-VL special tokens; the chat template is Qwen's, reduced to text and image parts.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..io import publish_dir

QWEN_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]

QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_vl_tokenizer():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for s in QWEN_VL_SPECIALS:
        vocab.setdefault(s, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         padding_side="left", chat_template=QWEN_VL_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(s, special=True) for s in QWEN_VL_SPECIALS[1:]]})
    return tok


def build_tiny_vlm(path: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write a tiny random Qwen2.5-VL (~0.1 M parameters) to ``path``; returns the path."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = qwen_vl_tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_VL_SPECIALS}
    # 14-px patches merged 2x2: a 56-px image is 16 patches -> 4 visual tokens; at most 64 tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    head = hidden // 4
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=ids["<|im_end|>"],
                         bos_token_id=None,
                         # multimodal RoPE sections (temporal, height, width) summing to head_dim / 2
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head // 4, head // 8, head // 8]}),
        vision_config=dict(depth=layers, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=hidden,
                           fullatt_block_indexes=[layers - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def tiny_vlm_path() -> Path:
    """The tiny VLM under ``$PORTRAITGEN_CACHE`` (default ~/.cache/portraitgen), built on first use."""
    root = Path(os.environ.get("PORTRAITGEN_CACHE", Path.home() / ".cache" / "portraitgen"))
    final = root / "tiny-vlm-qwen2_5_vl"
    if not (final / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tiny-vlm-"))
        try:
            build_tiny_vlm(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(tmp, final, complete="config.json")  # a concurrent builder's folder wins, ours is dropped
    return final

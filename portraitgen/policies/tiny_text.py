"""In-process tokenizers and text-encoder configs for the tiny built-in models.

Nothing may be downloaded, so the tiny pipelines build their tokenizers from small in-code
vocabularies. Portrait words become single tokens; any other text still tokenises (byte-level
fallback for CLIP, per-letter pieces for T5), so arbitrary prompts work.
"""
from __future__ import annotations

from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5TokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = (
    "a an the of in with and at on portrait photo photograph close up headshot half body full woman man person "
    "girl boy old young elderly smiling smile serious laughing studio light lighting daylight golden hour low "
    "backlit soft window outdoor indoor street park beach glasses beard freckles wrinkles curly hair long short "
    "red blonde dark black brown white grey blue green eyes skin face hands natural film realistic"
).split()


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    byte_chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for w in WORDS:  # left-to-right merges so that each word becomes one token
        cur = w[0]
        for i, ch in enumerate(w[1:], 1):
            nxt = ch + ("</w>" if i == len(w) - 1 else "")
            merges.append((cur, nxt))
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)


def clip_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden_size,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=len(tokenizer), projection_dim=projection_dim, max_position_embeddings=77)


def t5_tokenizer(max_length: int = 128) -> T5TokenizerFast:
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + ["\u2581" + w for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    return T5TokenizerFast(vocab=[(p, -float(i)) for i, p in enumerate(dict.fromkeys(pieces))], extra_ids=0,
                           model_max_length=max_length)


def t5_config(tokenizer: T5TokenizerFast, d_model: int = 64) -> T5Config:
    return T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

"""Captions from a local vision-language model (``curate.caption_model``), via transformers.

The folder must hold a model that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load offline
(BLIP, BLIP-2, LLaVA, Qwen2-VL, ... in diffusers/transformers' saved format); nothing is downloaded.
A processor with a chat template gets ``PROMPT`` as a user turn with the image; one without (BLIP-style
captioners) gets the image alone. Greedy decoding, so a caption depends only on the model and the
crop. Captions are cached per (model fingerprint, crop content) under the stage's cache, so reruns
and added images only caption what is new. The tests run this on a tiny random BLIP built in code.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .captions import CaptionError

log = logging.getLogger(__name__)
PROMPT = ("Describe this portrait photo in one sentence for a text-to-image caption: the person, shot type, "
          "lighting and setting.")
MAX_NEW_TOKENS = 48


def model_fingerprint(root: Path) -> str:
    """Hash of the folder's small files (configs, tokenizer) and the sizes of the others (weights)."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes() if f.stat().st_size < (1 << 20) else str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


class VlmCaptioner:
    def __init__(self, path: str | Path, cache_dir: str | Path, batch_size: int = 8):
        root = Path(path)
        if not root.is_dir() or not (root / "config.json").is_file():
            raise CaptionError(f"params key 'curate.caption_model': not a local transformers model folder "
                               f"(no config.json): {root}")
        self.root, self.batch_size = root, batch_size
        self.fingerprint = model_fingerprint(root)
        self.cache_dir = Path(cache_dir) / self.fingerprint
        self._model = None

    def _load(self):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(self.root, local_files_only=True)
            self._model = AutoModelForImageTextToText.from_pretrained(self.root, local_files_only=True).eval()
        except Exception as exc:  # wrong kind of model, missing files, ...
            raise CaptionError(f"params key 'curate.caption_model': cannot load {self.root} as an image-to-text "
                               f"model: {type(exc).__name__}: {exc}") from None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model.to(self.device)
        self.chat = bool(getattr(self.processor, "chat_template", None))

    def _generate(self, images) -> list[str]:
        import torch

        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.no_grad():
            out = self._model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        if "input_ids" in inputs and out.shape[1] > inputs["input_ids"].shape[1] and torch.equal(
                out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"]):
            out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only VLMs echo the prompt
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def caption(self, image_files: list[Path], keys: list[str]) -> list[str]:
        """One caption per image (possibly empty: the caller falls back to a template)."""
        from PIL import Image

        texts: list[str | None] = []
        for key in keys:
            f = self.cache_dir / f"{key}.txt"
            texts.append(f.read_text(encoding="utf-8") if f.is_file() else None)
        todo = [i for i, t in enumerate(texts) if t is None]
        if todo:
            if self._model is None:
                self._load()
            log.info("captioning %d image(s) with %s", len(todo), self.root)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for lo in range(0, len(todo), self.batch_size):
                batch = todo[lo:lo + self.batch_size]
                images = [Image.open(image_files[i]).convert("RGB") for i in batch]
                for i, text in zip(batch, self._generate(images)):
                    texts[i] = " ".join(text.split())
                    (self.cache_dir / f"{keys[i]}.txt").write_text(texts[i], encoding="utf-8")
        return [t or "" for t in texts]

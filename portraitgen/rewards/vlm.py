"""Rating images with a local instruction-tuned vision-language model (docs/design.md §5).

The model sees the image and a rating prompt (a template in params, ``{prompt}`` is replaced by the
image's prompt) and is about to answer. Instead of generating and parsing text, we read the logits of
the next token at the answer position, restrict them to the rating tokens (``"1" … "5"`` by default;
each must be one token), and take the expectation of the rating values under that softmax::

    p_k = softmax_k(logit[rating_token_k]),   E = Σ_k p_k · value_k,   score = (E - min v) / (max v - min v)

which is smooth in the model's belief (a parsed "4" is not) and lies in [0, 1].

Batching pads on the left, so the answer position is the last one for every row and a batch gives the
same scores as one image at a time (tested). Any model that ``AutoModelForImageTextToText`` loads from
a local folder works (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...). Inputs are built by the model's
``AutoProcessor``; where that cannot load (transformers' Qwen-VL processors need torchvision for their
video part, which is absent beside the CPU torch here), a Qwen-style encoder is assembled from the
model's tokenizer and image processor: the same chat template and image placeholder expansion
(``<|image_pad|>`` × grid / merge²) the processor performs.

``model_path: builtin:tiny`` builds a tiny random Qwen2.5-VL in the cache (:mod:`.tiny_vlm`), for tests,
the demo and the throughput benchmark: its ratings are meaningless.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .registry import PartsReward, RewardError
from .simple import to_uint8_hwc

log = logging.getLogger(__name__)


@dataclass
class _LoadedVLM:
    model: torch.nn.Module
    tokenizer: object
    processor: object | None  # the AutoProcessor, when it loads
    image_processor: object | None  # for the Qwen-style fallback
    device: torch.device
    dtype: torch.dtype


_CACHE: dict[tuple, _LoadedVLM] = {}
_LOCK = threading.Lock()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise RewardError(f"vlm dtype: expected auto, float32, bfloat16 or float16, got {dtype!r}") from None


def resolve_model_path(model_path: str) -> str:
    if model_path == "builtin:tiny":
        from .tiny_vlm import tiny_vlm_path

        return str(tiny_vlm_path())
    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise RewardError(f"vlm model_path {model_path!r}: not a local model folder (no config.json); "
                          "nothing is downloaded, point it at a saved model, or use builtin:tiny")
    return str(path)


def load_vlm(model_path: str, device: str = "auto", dtype: str = "auto") -> _LoadedVLM:
    """Load (once per process: rewards sharing a model share it) a VLM, its tokenizer and processor."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    path = resolve_model_path(model_path)
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    key = (path, str(dev), str(dt))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        processor = image_processor = None
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            tokenizer = processor.tokenizer
        except (ImportError, ValueError, OSError, TypeError, AttributeError) as exc:
            log.info("AutoProcessor for %s did not load (%s); using its tokenizer and image processor", path,
                     str(exc).strip().splitlines()[0][:160])
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            if tokenizer.convert_tokens_to_ids("<|image_pad|>") in (None, tokenizer.unk_token_id):
                raise RewardError(f"vlm {path}: its AutoProcessor does not load here ({exc}) and it is not a "
                                  "Qwen-VL-style model the fallback encoder knows") from exc
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dt).to(dev).eval()
        model.requires_grad_(False)
        tokenizer.padding_side = "left"  # the answer position is then the last one in every row
        _CACHE[key] = _LoadedVLM(model, tokenizer, processor, image_processor, dev, dt)
        return _CACHE[key]


class VLMRater(PartsReward):
    """Expected rating of a VLM, in [0, 1]; parts: ``score`` and ``expected_rating`` (in rating units)."""

    def __init__(self, model_path: str, prompt: str, ratings: Sequence[str] = ("1", "2", "3", "4", "5"),
                 rating_values: Sequence[float] | None = None, system: str = "", image_size: int = 448,
                 batch_size: int = 8, device: str = "auto", dtype: str = "auto"):
        if batch_size < 1 or image_size < 28:
            raise RewardError(f"vlm batch_size must be >= 1 and image_size >= 28, got {batch_size}, {image_size}")
        self.vlm = load_vlm(model_path, device, dtype)
        self.prompt, self.system = prompt, system
        self.image_size, self.batch_size = image_size, batch_size
        ratings = [str(r) for r in ratings]  # YAML may give numbers
        try:
            values = [float(v) for v in (ratings if rating_values is None else rating_values)]
        except ValueError:
            raise RewardError(f"vlm ratings {ratings} are not numbers: give rating_values too") from None
        if len(values) != len(ratings) or len(ratings) < 2 or max(values) == min(values):
            raise RewardError(f"vlm ratings: need >= 2 rating tokens with distinct values, got {list(ratings)} / {values}")
        self.rating_ids = []
        for r in ratings:
            ids = self.vlm.tokenizer.encode(r, add_special_tokens=False)
            if len(ids) != 1:
                raise RewardError(f"vlm rating {r!r} is {len(ids)} tokens for this tokenizer; each rating must be one token")
            self.rating_ids.append(ids[0])
        self.values = torch.tensor(values, dtype=torch.float64)
        self.last_errors = {}

    # ---------------------------------------------------------------------------------------------
    def texts(self, prompts: Sequence[str]) -> list[str]:
        """The chat-formatted model input for each prompt (with one image placeholder)."""
        apply = (self.vlm.processor or self.vlm.tokenizer).apply_chat_template
        out = []
        for p in prompts:
            msgs = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
            msgs.append({"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": self.prompt.replace("{prompt}", p)}]})
            out.append(apply(msgs, tokenize=False, add_generation_prompt=True))
        return out

    def pil_images(self, images: torch.Tensor):
        from PIL import Image

        s = self.image_size
        return [Image.fromarray(a).resize((s, s), Image.Resampling.BICUBIC) for a in to_uint8_hwc(images)]

    def encode(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for a batch (left-padded), on the model's device."""
        texts, pils = self.texts(prompts), self.pil_images(images)
        v = self.vlm
        if v.processor is not None:
            enc = dict(v.processor(text=texts, images=pils, padding=True, return_tensors="pt"))
        else:  # Qwen-style: expand each image placeholder to its number of merged patches
            img = dict(v.image_processor(images=pils, return_tensors="pt"))
            merge = int(getattr(v.image_processor, "merge_size", 2)) ** 2
            counts = (img["image_grid_thw"].prod(-1) // merge).tolist()
            texts = [t.replace("<|image_pad|>", "<|image_pad|>" * int(n), 1) for t, n in zip(texts, counts)]
            enc = dict(v.tokenizer(texts, padding=True, return_tensors="pt"))
            enc["mm_token_type_ids"] = (enc["input_ids"] == v.tokenizer.convert_tokens_to_ids("<|image_pad|>")).long()
            enc.update(img)
        return {k: (t.to(v.device, v.dtype) if t.is_floating_point() else t.to(v.device)) for k, t in enc.items()}

    @torch.no_grad()
    def answer_logits(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Next-token logits at the answer position, [B, vocab] float32."""
        enc = self.encode(images, prompts)
        logits = self.vlm.model(**enc, logits_to_keep=1).logits
        return logits[:, -1].float()

    def parts(self, images, prompts, meta):
        expected = []
        for i in range(0, images.shape[0], self.batch_size):
            logits = self.answer_logits(images[i:i + self.batch_size], prompts[i:i + self.batch_size])
            p = torch.softmax(logits[:, self.rating_ids].double(), dim=-1)
            expected.append((p * self.values.to(p.device)).sum(-1).cpu())
        e = torch.cat(expected).numpy()
        lo, hi = float(self.values.min()), float(self.values.max())
        return {"score": (e - lo) / (hi - lo), "expected_rating": e}


def vlm_reward(reward_name: str, model_path: str, prompt: str, **options) -> "VLMRater":
    """The factory body shared by the VLM-backed rewards (OmniReward and AI-Portrait differ in prompt only)."""
    if not model_path:
        raise RewardError(f"reward.options.{reward_name}.model_path: set it to a local VLM folder (or builtin:tiny)")
    return VLMRater(model_path, prompt, **options)

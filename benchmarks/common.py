"""Shared pieces of the benchmark scripts: output, timing, memory, the benchmark models and configs.

Every script prints one JSON line per figure (``{"bench": ..., "name": ..., "value": ..., "unit": ...,
...context}``, a line starting with ``{``) and then a readable table. The figures carry the machine's
load average, because on a shared machine timings mean little without it.

Benchmark configurations (``--config``):

- ``tiny``: the built-in tiny SD3 (0.1 M params, 64 px) with the demo's params: 16 images, 10 steps,
  CFG 4.5. Python overhead dominates: this is where per-step overheads show.
- ``small``: the CPU target, an SD3 MMDiT of 20.1 M params (4 blocks of width 384) at 256 px (32x32x16
  latents), 64 cached text tokens; compute dominates.
- ``reference``: docs/design.md §8's reference, the SD3.5-medium architecture (2.24 B params, random
  weights) at 512 px, 4 prompts x 8 samples, 10 steps, 9 trained steps, CFG 4.5, LoRA r=32, KL 0.04,
  EMA; built directly on the device (a GPU run).
- ``zimage``: the Z-Image architecture (6.2 B params) at 512 px, same recipe without CFG (Z-Image-Turbo).

``--quick`` keeps each configuration's structure at a size that runs in seconds on a CPU (CI smoke
runs; timings from it mean nothing).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # helpers.make_manifest (synthetic curated portraits)
import importlib.util  # noqa: E402

if importlib.util.find_spec("portraitgen") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

# Dense bf16 peak, TFLOP/s. docs/design.md §8 counts ~790 for the H200 (its measured 436 TFLOP/s = 55 %); the
# H100 SXM has the same tensor cores and clocks. Override with --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 790.0, "H100 NVL": 835.0 * 790 / 989, "H100 PCIe": 756.0 * 790 / 989, "H100": 790.0,
                    "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


# ---------------------------------------------------------------------------------------------- output
def machine(device: str = "cpu") -> dict[str, Any]:
    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def peak_tflops(device: str, override: float | None = None) -> float | None:
    if override:
        return override
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


class Report:
    """Collects figures: each is printed at once as a JSON line and kept for the closing table."""

    def __init__(self, bench: str, **context: Any):
        self.bench = bench
        self.context = context
        self.rows: list[dict[str, Any]] = []

    def figure(self, name: str, value: Any, unit: str = "", **extra: Any) -> dict[str, Any]:
        if isinstance(value, float):
            value = round(value, 6) if math.isfinite(value) else None
        row = {"bench": self.bench, "name": name, "value": value, "unit": unit, **extra, **self.context}
        self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        return row

    def table(self, title: str = "") -> None:
        print()
        if title:
            print(f"## {title}")
        ctx = ", ".join(f"{k}={v}" for k, v in self.context.items())
        if ctx:
            print(f"({ctx})")
        extra_keys = [k for k in dict.fromkeys(k for r in self.rows for k in r)
                      if k not in ("bench", "name", "value", "unit") and k not in self.context]
        cols = ["name", "value", "unit", *extra_keys]
        cells = [[_cell(r.get(c)) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in cells:
            print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


# ---------------------------------------------------------------------------------------------- timing
def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (synchronised only around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


# ---------------------------------------------------------------------------------------------- FLOPs
def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels; teach it the CPU flash kernel as well."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    ops = [getattr(aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu",)]
    bwd = [getattr(aten, n, None) for n in ("_scaled_dot_product_flash_attention_for_cpu_backward",)]
    try:
        for op in ops:
            if op is not None and op not in fc.flop_registry:
                fc.register_flop_formula(op)(lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
        for op in bwd:
            if op is not None and op not in fc.flop_registry:
                # backward(grad_out, query, key, value, ...): the same count as the CUDA kernels' backward.
                fc.register_flop_formula(op)(
                    lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))
    except Exception:  # an API change: attention FLOPs are then simply not counted on CPU
        pass


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- transformer work
@dataclass
class _Call:
    key: tuple
    module: torch.nn.Module
    latents: torch.Tensor
    sigma: torch.Tensor
    cond: dict[str, torch.Tensor]
    grad: bool
    reference: bool
    autocast: tuple[bool, torch.dtype]
    count: int = 0
    seconds: float | None = None
    flops: int | None = None


class TransformerWork:
    """Counts every transformer call of a training run, by shape and kind, so the same work can be
    replayed in isolation: forward without grad (rollouts, reference/KL, exemplar log-probs) or forward
    plus backward (training). Wraps the policy's ``_velocity`` (one call = one transformer forward)."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.calls: dict[tuple, _Call] = {}
        self.counting = True
        self._in_reference = False
        inner = policy._velocity
        ref_ctx = policy.reference

        def velocity(module, latents, sigma, cond):
            if self.counting:
                self._note(module, latents, sigma, cond)
            return inner(module, latents, sigma, cond)

        import contextlib

        @contextlib.contextmanager
        def reference():
            self._in_reference = True
            try:
                with ref_ctx():
                    yield
            finally:
                self._in_reference = False

        policy._velocity = velocity
        policy.reference = reference
        self._inner = inner

    def _note(self, module, latents, sigma, cond) -> None:
        grad = torch.is_grad_enabled()
        dev = latents.device.type
        ac = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ref = self._in_reference or module is getattr(self.policy, "_reference_transformer", None)
        key = (tuple(latents.shape), tuple((k, tuple(v.shape)) for k, v in sorted(cond.items())), grad, ref, ac)
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = _Call(key=key, module=module, latents=latents.detach().clone(),
                                           sigma=sigma.detach().clone(),
                                           cond={k: v.detach().clone() for k, v in cond.items()},
                                           grad=grad, reference=ref, autocast=ac)
        call.count += 1

    def reset_counts(self) -> None:
        for c in self.calls.values():
            c.count = 0

    def counts(self) -> dict[tuple, int]:
        return {k: c.count for k, c in self.calls.items()}

    def _replay(self, call: _Call) -> None:
        import contextlib

        dev = call.latents.device.type
        ac = torch.autocast(dev, dtype=call.autocast[1]) if call.autocast[0] else contextlib.nullcontext()
        ref = self.policy.reference() if call.reference and call.module is self.policy.transformer \
            else contextlib.nullcontext()
        with ref, ac:
            if call.grad:
                v = self._inner(call.module, call.latents, call.sigma, call.cond)
                v.float().square().mean().backward()
            else:
                with torch.no_grad():
                    self._inner(call.module, call.latents, call.sigma, call.cond)

    def measure(self, device: str, repeats: int = 3, flops: bool = True, warmup: int = 1) -> None:
        """Time (and count the FLOPs of) one call of every recorded kind, in isolation."""
        self.counting = False
        params = [p for p in self.policy.transformer.parameters() if p.requires_grad]
        try:
            for call in self.calls.values():
                call.seconds = timed(lambda: self._replay(call), device, repeats=repeats, warmup=warmup)
                if flops and call.flops is None:
                    call.flops = self._flops(call)
                for p in params:
                    p.grad = None
        finally:
            self.counting = True

    def _flops(self, call: _Call) -> int | None:
        # Count on the eager modules (the same math): compiled regions do not dispatch op by op.
        compiled = {m: m._compiled_call_impl for m in call.module.modules()
                    if getattr(m, "_compiled_call_impl", None) is not None}
        try:
            for m in compiled:
                m._compiled_call_impl = None
            return count_flops(lambda: self._replay(call))
        except Exception:
            return None
        finally:
            for m, impl in compiled.items():
                m._compiled_call_impl = impl

    def isolated(self, counts: dict[tuple, int]) -> tuple[float, int | None, dict[str, float]]:
        """(seconds, FLOPs, seconds by kind) of the transformer work ``counts`` in isolation."""
        total, fl, by_kind = 0.0, 0, {}
        for key, n in counts.items():
            call = self.calls[key]
            kind = "forward_backward" if call.grad else ("reference_forward" if call.reference else "forward")
            by_kind[kind] = by_kind.get(kind, 0.0) + n * (call.seconds or 0.0)
            total += n * (call.seconds or 0.0)
            fl = None if fl is None or call.flops is None else fl + n * call.flops
        return total, fl, by_kind


# ---------------------------------------------------------------------------------------------- models
def embedding_cache(path: Path, prompts: list[str], shapes: dict[str, tuple[int, ...]], fingerprint: str,
                    family: str, seed: int = 0) -> Path:
    """A prompt-embedding cache (the precompute stage's format) holding random embeddings of the given
    per-prompt shapes: real-size text encoders (T5-XXL, Qwen3-4B) never need to exist for a benchmark."""
    from safetensors.torch import save_file

    from portraitgen.integrity import write_checksum

    unique = list(dict.fromkeys(["", *prompts]))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name == "prompt_mask":
            tensors[name] = torch.ones(len(unique), *shape, dtype=torch.bool)
        else:
            tensors[name] = torch.randn(len(unique), *shape, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"prompts": json.dumps(unique), "model_fingerprint": fingerprint,
                                            "family": family})
    write_checksum(path)  # the trainer verifies the cache's sidecar before it reads it
    return path


@dataclass
class BenchConfig:
    name: str
    family: str
    resolution: int
    images: int  # per iteration (sample.global_batch_size)
    group_size: int
    steps: int
    guidance_scale: float
    trained_fraction: float
    train_batch: int  # samples per optimizer step (train.global_batch_size)
    micro_batch: int
    lora_rank: int
    kl_beta: float = 0.04
    rollout_batch: int = 0  # samples per forward pass without grad (0 = micro_batch)
    text_tokens: int = 64
    on_device: bool = False  # built in code on the device (too big to save and reload)
    build: dict[str, Any] = field(default_factory=dict)  # architecture


def config(name: str, quick: bool = False) -> BenchConfig:
    if name == "tiny":
        if quick:
            return BenchConfig("tiny", "sd3", 32, 8, 4, 3, 4.5, 0.5, 8, 4, 8)
        return BenchConfig("tiny", "sd3", 64, 16, 8, 10, 4.5, 0.5, 8, 8, 8)
    if name == "small":
        arch = dict(num_layers=4, attention_head_dim=64, num_attention_heads=6)
        if quick:
            return BenchConfig("small", "sd3", 64, 4, 4, 3, 4.5, 0.5, 4, 4, 8, text_tokens=16,
                               build=dict(num_layers=1, attention_head_dim=16, num_attention_heads=2))
        return BenchConfig("small", "sd3", 256, 4, 4, 4, 4.5, 0.5, 4, 4, 8, build=arch)
    if name == "reference":
        arch = dict(num_layers=24, attention_head_dim=64, num_attention_heads=24,
                    dual_attention_layers=tuple(range(13)))
        if quick:  # the same architecture family, 2 blocks of width 64, for CPU smoke runs
            return BenchConfig("reference", "sd3", 64, 4, 4, 3, 4.5, 0.9, 4, 2, 4, text_tokens=16, on_device=True,
                               build=dict(num_layers=2, attention_head_dim=16, num_attention_heads=4,
                                          dual_attention_layers=(0,), joint_attention_dim=64,
                                          pooled_projection_dim=64, vae_channels=(8, 8, 16, 16)))
        return BenchConfig("reference", "sd3", 512, 32, 8, 10, 4.5, 0.9, 32, 4, 32, text_tokens=77 + 128,
                           rollout_batch=8, on_device=True, build=arch)
    if name == "zimage":
        if quick:
            return BenchConfig("zimage", "zimage", 64, 4, 4, 3, 1.0, 0.9, 4, 2, 4, text_tokens=16, on_device=True,
                               build=dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                          cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64],
                                          vae_channels=(8, 8, 16, 16)))
        return BenchConfig("zimage", "zimage", 512, 16, 8, 8, 1.0, 0.9, 16, 4, 32, text_tokens=128, rollout_batch=8,
                           on_device=True)
    raise SystemExit(f"unknown --config {name!r}; expected tiny, small, reference or zimage")


def _cache_root() -> Path:
    from portraitgen.policies import cache_dir

    return cache_dir()


def _small_pipeline(cfg: BenchConfig):
    """The small SD3 pipeline: tiny text encoders (never run: embeddings are cached), a 16-channel linear
    tiny VAE, and an MMDiT large enough that its compute dominates on a CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from portraitgen.policies.tiny_text import clip_config, clip_tokenizer, t5_config, t5_tokenizer
    from portraitgen.policies.tiny_vae import linear_tiny_vae

    torch.manual_seed(0)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip_cfg = clip_config(clip_tok)
    a = cfg.build
    latent = cfg.resolution // 8
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=16, num_layers=a["num_layers"],
        attention_head_dim=a["attention_head_dim"], num_attention_heads=a["num_attention_heads"],
        caption_projection_dim=a["attention_head_dim"] * a["num_attention_heads"], joint_attention_dim=64,
        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=latent)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=linear_tiny_vae(16),
        text_encoder=CLIPTextModelWithProjection(clip_cfg), tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_cfg), tokenizer_2=clip_tok,
        text_encoder_3=T5EncoderModel(t5_config(t5_tok)), tokenizer_3=t5_tok)


def _marker_folder(cfg: BenchConfig, quick: bool) -> Path:
    """A folder standing for a model built on the device: its files are the model's fingerprint."""
    folder = _cache_root() / f"bench-{cfg.name}{'-quick' if quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"bench_config": cfg.name, "build": cfg.build,
                                                         "resolution": cfg.resolution}, default=str))
    return folder


def model_path(cfg: BenchConfig, quick: bool) -> str:
    """The ``model.path`` of a configuration (saved once under the portraitgen cache)."""
    if cfg.name == "tiny":
        return "builtin:tiny"
    if cfg.on_device:
        return str(_marker_folder(cfg, quick))
    folder = _cache_root() / f"bench-{cfg.name}{'-quick' if quick else ''}-v1"
    if not (folder / "model_index.json").is_file():
        import shutil
        import tempfile

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".bench-", dir=folder.parent))
        try:
            _small_pipeline(cfg).save_pretrained(str(tmp))
            tmp.rename(folder)
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def build_on_device(cfg: BenchConfig, device: str, dtype: torch.dtype):
    """A random-initialised real-size policy built directly on the device (no text encoders)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    a = dict(cfg.build)
    vae_channels = tuple(a.pop("vae_channels", (128, 256, 512, 512)))
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=vae_channels,
                            layers_per_block=2, latent_channels=16, norm_num_groups=min(32, vae_channels[0]),
                            sample_size=cfg.resolution, use_quant_conv=False, use_post_quant_conv=False,
                            scaling_factor=1.5305 if cfg.family == "sd3" else 0.3611,
                            shift_factor=0.0609 if cfg.family == "sd3" else 0.1159)
        if cfg.family == "sd3":
            from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

            from portraitgen.policies.sd3 import SD3Policy

            width = a["attention_head_dim"] * a["num_attention_heads"]
            transformer = SD3Transformer2DModel(
                sample_size=cfg.resolution // 8, patch_size=2, in_channels=16, out_channels=16,
                num_layers=a["num_layers"], attention_head_dim=a["attention_head_dim"],
                num_attention_heads=a["num_attention_heads"], caption_projection_dim=width,
                joint_attention_dim=a.get("joint_attention_dim", 4096),
                pooled_projection_dim=a.get("pooled_projection_dim", 2048), pos_embed_max_size=384,
                dual_attention_layers=a.get("dual_attention_layers", ()), qk_norm="rms_norm")
            pipe = StableDiffusion3Pipeline(transformer=transformer,
                                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                            tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
            cls = SD3Policy
        else:
            from diffusers import ZImagePipeline, ZImageTransformer2DModel

            from portraitgen.policies.zimage import ZImagePolicy

            transformer = ZImageTransformer2DModel(**a)
            pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
                                  vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
            cls = ZImagePolicy
    pipe.transformer.to(dtype)
    return cls(pipe, device=device)


def text_shapes(cfg: BenchConfig, policy=None) -> dict[str, tuple[int, ...]]:
    """Per-prompt shapes of the conditioning tensors of a configuration's cache."""
    if cfg.family == "sd3":
        if policy is not None:
            c = policy.transformer.config
            return {"prompt_embeds": (cfg.text_tokens, c.joint_attention_dim),
                    "pooled_projections": (c.pooled_projection_dim,)}
        return {"prompt_embeds": (cfg.text_tokens, 64), "pooled_projections": (64,)}
    c = policy.transformer.config
    return {"prompt_embeds": (cfg.text_tokens, c.cap_feat_dim), "prompt_mask": (cfg.text_tokens,)}


def params_dict(cfg: BenchConfig, path: str, embeddings: str, *, iterations: int, exemplars: int = 0,
                index: str = "", prompts_source: str = "builtin:demo", checkpoint_every: int = 1000,
                tracking: bool = False) -> dict[str, Any]:
    return {
        "seed": 0,
        "model": {"family": cfg.family, "path": path, "resolution": cfg.resolution},
        "prompts": {"source": prompts_source},
        "sample": {"num_steps": cfg.steps, "step_type": "sde", "noise_level": 0.7, "cfg": cfg.guidance_scale != 1.0,
                   "guidance_scale": cfg.guidance_scale, "global_batch_size": cfg.images,
                   "group_size": cfg.group_size},
        "train": {"iterations": iterations, "finetune": "lora",
                  "lora": {"rank": cfg.lora_rank, "alpha": 2.0 * cfg.lora_rank},
                  "lr": 1e-4, "global_batch_size": cfg.train_batch, "num_inner_epochs": 1,
                  "trained_steps": {"mode": "fraction", "fraction": cfg.trained_fraction},
                  "clip_range": 1e-4, "kl_beta": cfg.kl_beta, "ema": {"enabled": True, "decay": 0.9, "export": True},
                  "checkpoint_every": checkpoint_every, "keep_checkpoints": 1, "log_images_every": 0,
                  "prompt_embeddings": embeddings,
                  "exemplars": {"per_group": exemplars, "index": index, "rewards": ""}},
        "reward": {"components": {"brightness": 1.0}},
        "tracking": {"enabled": tracking, "uri": f"sqlite:///{_cache_root() / 'bench-mlflow.db'}"},
    }


def peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def images_at(resolution: int, batch: int):
    """``batch`` of the shipped real photos and portraits, centre-cropped and resized to ``resolution``
    (float CHW in [0, 1]), so that face rewards do their full work in a benchmark."""
    import cv2
    import numpy as np
    import torch

    from portraitgen.rewards.real_images import builtin_photos

    photos = builtin_photos()
    out = []
    for i in range(batch):
        p = photos[i % len(photos)]
        s = min(p.shape[:2])
        y0, x0 = (p.shape[0] - s) // 2, (p.shape[1] - s) // 2
        sq = cv2.resize(p[y0:y0 + s, x0:x0 + s], (resolution, resolution), interpolation=cv2.INTER_AREA)
        out.append(torch.from_numpy(np.array(sq)).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)

"""GRPO training of a flow-matching policy on Accelerate (design.md §2-§3).

One iteration reads as its phases::

    plan     -> which prompts, which steps are stochastic / trained (derived from seed and iteration)
    sample   -> each process rolls out its share of the groups, recording latents and log-probs
    score    -> rewards of the decoded images
    advantage-> rewards of *all* processes gathered, normalised within whole groups
    train    -> clipped policy-gradient (+ KL to the reference) over the trained steps
    log/save -> metrics to MLflow and metrics.jsonl, periodic checkpoints

Batch sizes in params are global. Each process samples ``sample.global_batch_size / world`` images
and one optimizer step covers ``train.global_batch_size`` samples in all, so gradient accumulation is
``train.global_batch_size / (world * micro_batch)``: the GPU count never changes what is computed.

Every random draw (prompt choice, start noise, step noise, trained steps, shuffling) comes from a
generator seeded with ``(seed, iteration, sample index, ...)``. A sample therefore does not depend on
which process or micro-batch it landed in, and a resumed run repeats exactly what an uninterrupted
one would have done.

Run it with ``portraitgen train --params params.yaml --out results/train`` or, on several processes,
``accelerate launch --num_processes N -m portraitgen train ...``.

Performance (benchmarks/iteration_breakdown.py measures all of it): every iteration is timed phase by phase
(``time/<phase>`` in metrics.jsonl, see :mod:`portraitgen.profiling`) with CUDA events, never a device
synchronisation inside the step loops - step noise is drawn up front and copied asynchronously, index
tensors live on the device, and the loss statistics stay on the device until the end of the train phase.
Prompt embeddings are cached (text encoders never run in the loop); rewards of generated images are scored
in a worker thread while the exemplars' log-probs are computed; the next iteration's exemplar data is
loaded in the background. Hardware options (never params): autocast with the frozen weights stored in
bf16/fp16, ``torch.compile`` of the transformer, activation checkpointing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import checkpointing, export, jsonl
from .advantages import group_advantages
from .config import Params, flatten, params_to_dict, reward_config_hash
from .ema import EMA
from .embeddings import EmbeddingCache
from .exemplars import ExemplarBank
from .fingerprint import fingerprint_hash, semantic_fingerprint
from .hardware import Hardware
from .images import load_image
from .integrity import IntegrityError, rerun, verify_file
from .policies import FlowPolicy, cond_select, load_policy, model_fingerprint, resolve_model_path
from .profiling import PhaseTimeline
from .prompts import load_prompts
from .rewards import RewardSet
from .sft_loss import supervised_term
from .sampling import (Trajectory, randn_per_sample, rollout, seeded_generator, step_mean, step_std,
                       stochastic_step, to_device_async)
from .logged_model import log_trained_model, training_datasets
from .tracking import Tracker

log = logging.getLogger(__name__)


class TrainingSetupError(ValueError):
    """The run cannot start: params, hardware flags and process count do not fit together."""


@dataclass
class IterationPlan:
    prompt_ids: np.ndarray  # [prompts_per_iteration] index into the prompt list
    stochastic: torch.Tensor  # [T] bool: SDE steps of this iteration's rollouts
    exemplar_rows: np.ndarray | None = None  # [prompts, group_size]: exemplar row per slot, -1 = generated


@dataclass
class LocalBatch:
    """This process's share of an iteration's samples."""

    sample_index: np.ndarray  # [n] global sample index within the iteration
    group: np.ndarray  # [n] group (prompt slot) of each sample
    prompt_ids: np.ndarray  # [n]
    latents: torch.Tensor  # [n, T+1, C, h, w]
    log_probs: torch.Tensor  # [n, T]
    stochastic: torch.Tensor  # [T]: the rollouts' SDE steps
    images: torch.Tensor  # [n, 3, H, W]
    trainable: torch.Tensor  # [n, T] bool: transitions each sample may be trained on
    exemplar_rows: np.ndarray  # [n] exemplar row of each sample, -1 for generated samples
    rewards: dict[str, np.ndarray] = field(default_factory=dict)
    advantages: np.ndarray | None = None
    mask: np.ndarray | None = None
    pending_rewards: Future | None = None  # generated samples' rewards, being scored in a worker thread


class GRPOTrainer:
    def __init__(self, params: Params, out_dir: str | Path, hardware: Hardware = Hardware(),
                 accelerator=None, policy: FlowPolicy | None = None):
        """``policy``: a ready policy on the device instead of loading ``params.model.path`` (benchmarks of
        random-initialised real-size architectures; the path then only names the model in fingerprints)."""
        from accelerate import Accelerator

        self.params = params
        self.out_dir = Path(out_dir)
        # Checkpoints live in a folder per params fingerprint: a run resumes only from checkpoints made
        # with the same training params, and changing them starts afresh without deleting anything.
        self.ckpt_dir = self.out_dir / "checkpoints" / fingerprint_hash(params)
        self.hardware = hardware
        # Without CUDA, ask Accelerate for its CPU backend explicitly: several processes started by
        # `accelerate launch --multi_gpu` / torchrun then form a gloo group instead of N lone runs.
        self.accelerator = accelerator or Accelerator(mixed_precision=hardware.mixed_precision,
                                                      cpu=not torch.cuda.is_available())
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        # Every GPU of the node's allocation has exactly one training process (portraitgen/launch.py);
        # only where CUDA exists (a CPU torch under a fake-GPU test allocation trains on the CPU).
        from .launch import GPULayoutError, check_visible_gpus

        try:
            check_visible_gpus()
        except GPULayoutError as exc:
            raise TrainingSetupError(str(exc)) from None
        self._check_layout()
        # Cheap checks first, so a bad prompt file or reward name fails before the model loads.
        self.bank: ExemplarBank | None = None
        ex = params.train.exemplars
        if params.prompts.source == "exemplars":
            if not Path(ex.index).is_file():
                raise TrainingSetupError(f"train.exemplars.index: {ex.index} not found (prompts.source is "
                                         f"'exemplars'; run `portraitgen invert` first)")
            self.prompts = sorted(set(pd.read_parquet(ex.index, columns=["caption"])["caption"]))
        else:
            self.prompts = load_prompts(params.prompts.source)
        self.rewards = RewardSet.from_config(params.reward)
        model_path = resolve_model_path(params.model.family, params.model.path)
        if not model_path.is_dir():
            raise TrainingSetupError(f"model.path: model folder not found: {model_path}")

        torch.manual_seed(params.seed)  # adapter init is the only draw from the global RNG
        embeddings = None
        if t_emb := params.train.prompt_embeddings:
            embeddings = EmbeddingCache(t_emb, model_fingerprint(params.model.family, params.model.path))
        if policy is None:
            policy = load_policy(params.model.family, params.model.path, device=self.accelerator.device,
                                 text_encoders=embeddings is None)
        self.policy: FlowPolicy = policy
        self.policy.freeze_all()
        t = params.train
        if t.finetune == "lora":
            self.policy.enable_lora(t.lora.rank, t.lora.alpha, t.lora.target_modules)
        else:
            self.policy.enable_full_finetune(keep_reference=t.kl_beta > 0)
        self._apply_hardware_options()
        self.named_trainable = {n: p for n, p in self.policy.transformer.named_parameters() if p.requires_grad}
        # One fused kernel for all (LoRA: hundreds of small) tensors on a GPU; the loop over tensors on a CPU.
        fused = self.accelerator.device.type == "cuda" and all(
            p.is_cuda and p.dtype == torch.float32 for p in self.named_trainable.values())
        self.optimizer = torch.optim.AdamW(list(self.named_trainable.values()), lr=t.lr,
                                           betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                                           eps=t.adam_eps, **({"fused": True} if fused else {}))
        warmup = max(t.warmup_iterations, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        # DDP wrapping when there are several processes; the policy's forward calls go through it.
        self.model = self.accelerator.prepare_model(self.policy.transformer)
        self.policy.denoiser = self.model
        self.ema = EMA(self.named_trainable, t.ema.decay) if t.ema.enabled else None

        res = params.model.resolution
        self.latent_shape = self.policy.latent_shape(res, res)
        self.sigmas = self.policy.sigmas(params.sample.num_steps, res, res)
        self._sigmas_dev = self.sigmas.to(self.accelerator.device)
        # Text encoders run once (here, or in the precompute stage): training only indexes these embeddings.
        if embeddings is None:
            embeddings = EmbeddingCache.from_policy(self.policy, self.prompts)
        dev = self.accelerator.device
        # Stored in the transformer's input dtype: each forward pass would cast them to it anyway.
        emb_dtype = self.policy.compute_dtype
        self.cond_cache = embeddings.lookup(self.prompts, dev, dtype=emb_dtype)
        self.uncond = embeddings.lookup([""], dev, dtype=emb_dtype) if self._cfg else None
        self.sft = supervised_term(params, self.policy, self.prompts)  # the ablation's supervised baseline
        if ex.per_group > 0:
            self.bank = ExemplarBank(ex.index, sigmas=self.sigmas,
                                     model_fingerprint=model_fingerprint(params.model.family, params.model.path))
            self._exemplar_rewards: dict[int, dict[str, float]] = {}  # computed once: the image never changes
            if ex.rewards:
                self._exemplar_rewards = self._precomputed_exemplar_rewards(ex.rewards)
            self._exemplar_images: dict[int, torch.Tensor] = {}
        if self.accelerator.device.type != "cpu":
            self.policy.offload_text_encoders()
        self.start_iteration = 0
        self.history: list[dict[str, float]] = []
        self.optimizer_steps = 0
        self.tracker: Tracker | None = None
        # Phase timing of every iteration (CUDA events, no syncs); benchmarks switch memory tracking on.
        self.timeline = PhaseTimeline(self.accelerator.device)
        # One worker for rewards scored while the device computes, one for prefetching exemplar data.
        self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="portraitgen-reward")
        self._io_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="portraitgen-prefetch")
        self._bank_lock = threading.Lock()
        self._prefetched: Future | None = None

    def _apply_hardware_options(self) -> None:
        hw = self.hardware
        if hw.mixed_precision != "no" and hw.low_precision_weights:
            self.policy.cast_frozen(torch.bfloat16 if hw.mixed_precision == "bf16" else torch.float16)
        if hw.mixed_precision != "no" and self.policy.finetune == "lora":
            self.policy.lora_input_casts(False)  # autocast casts for the matmul anyway
        if hw.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        if hw.compile:
            # Shapes are few and fixed (rollout, training and reference batches), so no dynamic shapes.
            self.policy.compile_transformer(dynamic=False)

    def _precomputed_exemplar_rewards(self, path: str) -> dict[int, dict[str, float]]:
        if not Path(path).is_file():
            raise TrainingSetupError(f"train.exemplars.rewards: {path} not found (run `portraitgen precompute`)")
        try:  # verified before it is parsed: a damaged table is named as such, with the way to re-make it
            verify_file(path, rerun("precompute", "portraitgen precompute --params params.yaml --out results/precompute"),
                        what="train.exemplars.rewards:")
        except IntegrityError as exc:
            raise TrainingSetupError(str(exc)) from None
        table = pd.read_parquet(path)
        if (table["reward_config"] != reward_config_hash(self.params)).any():
            raise TrainingSetupError(f"train.exemplars.rewards: {path} was scored with another reward config; "
                                     f"re-run `portraitgen precompute`")
        by_hash = table.drop_duplicates("content_hash").set_index("content_hash")
        names = list(self.rewards.weights) + ["total"]
        out = {}
        for row, h in enumerate(self.bank.index["content_hash"]):
            if h in by_hash.index:
                rec = by_hash.loc[h]
                values = {n: float(rec[n]) for n in names}
                masked = float(rec["masked"]) if "masked" in rec.index and pd.notna(rec["masked"]) else 0.0
                bad = [n for n, v in values.items() if not math.isfinite(v)]
                if bad and not masked:  # precompute writes finite scores (or masks them): the file is damaged
                    raise TrainingSetupError(
                        f"train.exemplars.rewards: {path}: exemplar {self.bank.exemplar_id(row)!r} has a non-finite "
                        f"{bad[0]!r} reward ({values[bad[0]]}); re-run `portraitgen precompute` (under Snakemake: "
                        f"snakemake --forcerun precompute)")
                out[row] = values | {"masked": masked}
        return out

    # ------------------------------------------------------------------ setup helpers
    @property
    def _cfg(self) -> bool:
        return self.params.sample.cfg and self.params.sample.guidance_scale != 1.0

    def _check_layout(self) -> None:
        s, t, w = self.params.sample, self.params.train, self.world
        if s.global_batch_size % w:
            raise TrainingSetupError(f"sample.global_batch_size={s.global_batch_size} is not divisible by the "
                                     f"{w} processes")
        if t.global_batch_size % w:
            raise TrainingSetupError(f"train.global_batch_size={t.global_batch_size} is not divisible by the "
                                     f"{w} processes")
        per_proc = t.global_batch_size // w
        mb = self.hardware.micro_batch_size
        if mb < 0:
            raise TrainingSetupError(f"--micro-batch-size must be >= 0, got {mb}")
        if mb == 0:  # the largest divisor of the per-process batch up to 8
            mb = max(d for d in range(1, min(per_proc, 8) + 1) if per_proc % d == 0)
        if per_proc % mb:
            raise TrainingSetupError(f"--micro-batch-size={mb} does not divide the per-process train batch "
                                     f"{per_proc} (train.global_batch_size={t.global_batch_size} / {w} processes)")
        self.micro_batch = mb
        self.accumulation = per_proc // mb
        if self.hardware.rollout_micro_batch_size < 0:
            raise TrainingSetupError(f"--rollout-batch-size must be >= 0, got {self.hardware.rollout_micro_batch_size}")
        # No activations are kept without gradients: rollouts can run larger (more efficient) batches.
        self.rollout_batch = self.hardware.rollout_micro_batch_size or mb
        self.local_samples = s.global_batch_size // w

    def _gscale(self) -> float:
        return self.params.sample.guidance_scale if self._cfg else 1.0

    def _autocast(self):
        return self.accelerator.autocast() if self.hardware.mixed_precision != "no" else contextlib.nullcontext()

    # ------------------------------------------------------------------ plan
    def plan(self, iteration: int) -> IterationPlan:
        self._iteration = iteration
        return self._make_plan(iteration)

    def _make_plan(self, iteration: int) -> IterationPlan:
        """The iteration's plan, a pure function of ``(seed, iteration)``."""
        p = self.params
        rng = np.random.default_rng([p.seed, iteration, 0])
        n_prompts = p.prompts_per_iteration
        prompt_ids = rng.choice(len(self.prompts), size=n_prompts, replace=len(self.prompts) < n_prompts)
        T = p.sample.num_steps
        stochastic = torch.ones(T, dtype=torch.bool)
        ts = p.train.trained_steps
        if ts.mode == "window":
            span = ts.window_range or T
            start = int(rng.integers(0, span - ts.window_size + 1))
            stochastic = torch.zeros(T, dtype=torch.bool)
            stochastic[start:start + ts.window_size] = True
        return IterationPlan(prompt_ids=prompt_ids, stochastic=stochastic,
                             exemplar_rows=self._plan_exemplars(iteration, prompt_ids))

    def exemplars_per_group(self, iteration: int) -> int:
        ex = self.params.train.exemplars
        if ex.schedule == "linear_decay":
            return int(round(ex.per_group * max(0.0, 1.0 - iteration / ex.decay_iterations)))
        return ex.per_group

    def _plan_exemplars(self, iteration: int, prompt_ids: np.ndarray) -> np.ndarray | None:
        """Which slots of which groups hold exemplars: the last E slots of a group, for a fraction of the
        groups. Drawn from its own stream, so plain GRPO's draws are untouched."""
        if self.bank is None:
            return None
        ex, G = self.params.train.exemplars, self.params.sample.group_size
        rng = np.random.default_rng([self.params.seed, iteration, 5])
        E = self.exemplars_per_group(iteration)
        rows = np.full((len(prompt_ids), G), -1, dtype=np.int64)
        with_exemplars = rng.random(len(prompt_ids)) < ex.group_fraction
        for g, pid in enumerate(prompt_ids):
            candidates = self.bank.rows_by_caption.get(self.prompts[pid], np.array([], dtype=np.int64))
            if E == 0 or not with_exemplars[g] or len(candidates) == 0:
                continue
            rows[g, G - E:] = rng.choice(candidates, size=E, replace=len(candidates) < E)
        return rows

    # ------------------------------------------------------------------ sample
    def _local_slots(self, plan: IterationPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(sample_index, group, prompt_ids, exemplar_rows)`` of this process's samples."""
        G = self.params.sample.group_size
        idx = np.arange(self.rank * self.local_samples, (self.rank + 1) * self.local_samples)
        group = idx // G
        ex_rows = (plan.exemplar_rows[group, idx % G] if plan.exemplar_rows is not None
                   else np.full(len(idx), -1, dtype=np.int64))
        return idx, group, plan.prompt_ids[group], ex_rows

    @torch.no_grad()
    def sample(self, iteration: int, plan: IterationPlan) -> LocalBatch:
        p = self.params
        dev, tl = self.accelerator.device, self.timeline
        idx, group, prompt_ids, ex_rows = self._local_slots(plan)
        n, T = len(idx), p.sample.num_steps
        latents = torch.empty(n, T + 1, *self.latent_shape, device=dev)
        log_probs = torch.zeros(n, T, device=dev)
        images: list[torch.Tensor | None] = [None] * n  # on the host, where rewards read them
        trainable = torch.zeros(n, T, dtype=torch.bool)
        stochastic = plan.stochastic
        gen, ex = np.flatnonzero(ex_rows < 0), np.flatnonzero(ex_rows >= 0)
        # Index tensors go to the device once; micro-batches slice them there (no copy, no wait).
        gen_dev = to_device_async(torch.as_tensor(gen), dev)
        prompts_dev = to_device_async(torch.as_tensor(prompt_ids), dev)
        ex_data = self._exemplar_data(ex_rows[ex]) if len(ex) else None  # usually prefetched already
        tl.switch("rollout")
        for lo in range(0, len(gen), self.rollout_batch):
            pos = gen[lo:lo + self.rollout_batch]
            pos_dev = gen_dev[lo:lo + len(pos)]
            gens = [seeded_generator(p.seed, iteration, int(idx[i]), 1) for i in pos]
            start = randn_per_sample(self.latent_shape, gens, dev)
            cond = cond_select(self.cond_cache, prompts_dev[pos_dev])
            with self._autocast():
                traj: Trajectory = rollout(self.policy, cond, start, self.sigmas, step_type=p.sample.step_type,
                                           noise_level=p.sample.noise_level, generators=gens,
                                           uncond=self._uncond_like(len(pos)), guidance_scale=self._gscale(),
                                           stochastic=plan.stochastic)
            stochastic = traj.stochastic
            latents.index_copy_(0, pos_dev, traj.latents)
            log_probs.index_copy_(0, pos_dev, traj.log_probs)
            trainable[pos] = traj.stochastic
            decoded = self.policy.decode(traj.final)
            # Asynchronous copy to pinned host memory; read only after `gen_done` (below).
            host = decoded.to("cpu", non_blocking=True) if decoded.is_cuda else decoded
            for i, img in zip(pos, host):
                images[i] = img
        gen_done = _record_event(dev)
        pending = None
        if len(ex) and len(gen):  # score the generated images while the device computes the exemplars
            pending = self._reward_pool.submit(self._score_generated, gen_done, [images[i] for i in gen],
                                               prompt_ids[gen], idx[gen], group[gen])
        if len(ex):
            lat, ex_trainable, ex_images = ex_data
            ex_dev = to_device_async(torch.as_tensor(ex), dev)
            lat = to_device_async(lat, dev)
            latents.index_copy_(0, ex_dev, lat)
            # Exemplars are trained where the rollouts are (window mode) and where their own path allows.
            trainable[ex] = ex_trainable & plan.stochastic
            for i, img in zip(ex, ex_images):
                images[i] = img
            tl.switch("exemplar_logp")
            # logp_old under the current rollout policy (an exemplar's first ratio is 1), at the steps it
            # will be trained on: the others are never read.
            steps = [self._steps_for(iteration, int(idx[i]), trainable[i]) for i in ex]
            log_probs.index_copy_(0, ex_dev, self._transition_log_probs(lat, prompts_dev[ex_dev], steps))
        if gen_done is not None:
            gen_done.synchronize()  # the generated images are on the host
        return LocalBatch(sample_index=idx, group=group, prompt_ids=prompt_ids, latents=latents,
                          log_probs=log_probs, stochastic=stochastic, images=torch.stack(images),
                          trainable=trainable, exemplar_rows=ex_rows, pending_rewards=pending)

    @torch.no_grad()
    def _transition_log_probs(self, latents: torch.Tensor, prompt_ids: torch.Tensor,
                              steps: list[torch.Tensor]) -> torch.Tensor:
        """Log-probs ``[E, T]`` of the transitions ``steps[e]`` of trajectories ``latents`` ``[E, T+1, ...]``
        under the current policy (0 elsewhere). (exemplar, step) pairs are batched across steps: each
        forward pass is a full micro-batch, whatever the steps of each exemplar."""
        p, dev = self.params, latents.device
        out = torch.zeros(latents.shape[0], latents.shape[1] - 1, device=dev)
        rows = [r for r, st in enumerate(steps) for _ in range(len(st))]
        if not rows:
            return out
        r_all = to_device_async(torch.tensor(rows), dev)
        s_all = to_device_async(torch.cat([st.long() for st in steps]), dev)
        sigma_max = float(self.sigmas[1])
        for lo in range(0, len(rows), self.rollout_batch):
            r, j = r_all[lo:lo + self.rollout_batch], s_all[lo:lo + self.rollout_batch]
            x, x_next = latents[r, j], latents[r, j + 1]
            sig, sig_next = self._sigmas_dev[j], self._sigmas_dev[j + 1]
            cond = cond_select(self.cond_cache, prompt_ids[r])
            with self._autocast():
                v = self.policy.predict_velocity(x, sig, cond, self._uncond_like(x.shape[0]), self._gscale())
            step = stochastic_step(x, v, sig, sig_next, p.sample.step_type, p.sample.noise_level, sigma_max,
                                   prev_sample=x_next)
            out[r, j] = step.log_prob
        return out

    def _exemplar_data(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(latents [E, T+1, ...], trainable [E, T], images)`` of exemplar rows, on the host."""
        with self._bank_lock:
            trajs = [self.bank.trajectory(int(r)) for r in rows]
            images = [self._exemplar_image(int(r)) for r in rows]
        return torch.stack([t[0] for t in trajs]), torch.stack([t[1] for t in trajs]), images

    def _prefetch(self, iteration: int) -> None:
        """Load the exemplar data of ``iteration`` in the background (shards are read once and kept)."""
        if self.bank is None or iteration >= self.params.train.iterations:
            return
        _, _, _, ex_rows = self._local_slots(self._make_plan(iteration))
        if (ex_rows >= 0).any():
            self._prefetched = self._io_pool.submit(self._exemplar_data, ex_rows[ex_rows >= 0])

    def _exemplar_image(self, row: int) -> torch.Tensor:
        """The real image an exemplar trajectory ends on (read once; it is what gets scored)."""
        if row not in self._exemplar_images:
            path = self.bank.index["image_file"].iloc[row]
            self._exemplar_images[row] = load_image(path, self.params.model.resolution)
        return self._exemplar_images[row]

    def _uncond_like(self, n: int):
        if self.uncond is None:
            return None
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.uncond.items()}

    # ------------------------------------------------------------------ score
    def _score_generated(self, done, images: list[torch.Tensor], prompt_ids: np.ndarray, sample_index: np.ndarray,
                         group: np.ndarray) -> dict[str, np.ndarray]:
        """Rewards of generated images (run in the reward worker while the device keeps computing)."""
        if done is not None:
            done.synchronize()  # their asynchronous copies to the host have landed
        meta = [{"group": int(g), "sample_index": int(i), "exemplar": False} for g, i in zip(group, sample_index)]
        return self.rewards(torch.stack(images), [self.prompts[i] for i in prompt_ids], meta)

    def score(self, batch: LocalBatch) -> None:
        """Rewards of generated images; exemplars' are computed once and reused (their image is fixed)."""
        prompts = [self.prompts[i] for i in batch.prompt_ids]
        meta = [{"group": int(g), "sample_index": int(i), "exemplar": int(r) >= 0}
                for g, i, r in zip(batch.group, batch.sample_index, batch.exemplar_rows)]
        gen = np.flatnonzero(batch.exemplar_rows < 0)
        ex = np.flatnonzero(batch.exemplar_rows >= 0)
        if len(ex) == 0:
            batch.rewards = self.rewards(batch.images, prompts, meta)
            return
        gen_scores = None
        if len(gen):  # first, so the reward worker is done before this thread scores anything
            gen_scores = (batch.pending_rewards.result() if batch.pending_rewards is not None else
                          self.rewards(batch.images[gen], [prompts[i] for i in gen], [meta[i] for i in gen]))
            batch.pending_rewards = None
        new = [i for i in ex if int(batch.exemplar_rows[i]) not in self._exemplar_rewards]
        if new:
            scored = self.rewards(batch.images[new], [prompts[i] for i in new], [meta[i] for i in new])
            for k, i in enumerate(new):
                self._exemplar_rewards[int(batch.exemplar_rows[i])] = {n: float(v[k]) for n, v in scored.items()}
        names = list(self.rewards.weights) + ["total", "masked"]
        out = {n: np.zeros(len(prompts), dtype=np.float32) for n in names}
        if gen_scores is not None:
            for n in names:
                out[n][gen] = gen_scores.get(n, 0.0)  # "masked" only where on_invalid is "mask"
        for i in ex:
            for n in names:
                out[n][i] = self._exemplar_rewards[int(batch.exemplar_rows[i])].get(n, 0.0)
        batch.rewards = out

    # ------------------------------------------------------------------ advantages
    def _gather(self, array: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(array), device=self.accelerator.device)
        return self.accelerator.gather(t).cpu().numpy()

    def compute_advantages(self, batch: LocalBatch) -> dict[str, float]:
        t = self.params.train
        all_rewards = self._gather(batch.rewards["total"].astype(np.float64))
        all_groups = self._gather(batch.group.astype(np.int64))
        all_ex = self._gather(batch.exemplar_rows.astype(np.int64))
        is_ex = all_ex >= 0
        # A masked reward (reward.on_invalid: mask) never steers training: advantage 0, out of the group stats.
        local_masked = batch.rewards.get("masked", np.zeros(len(batch.group), dtype=np.float32))
        all_masked = self._gather(np.asarray(local_masked, dtype=np.float64)) > 0
        valid = ~all_masked
        adv = group_advantages(all_rewards, all_groups, global_std=t.global_std, clip=t.adv_clip_max,
                               filter_zero_std=t.filter_zero_std, is_exemplar=is_ex,
                               exemplars_in_stats=t.exemplars.include_in_std, exemplar_cap=t.exemplars.adv_cap,
                               valid=valid)
        # Gather is rank-major, so this process's samples are one contiguous slice.
        sl = slice(self.rank * self.local_samples, (self.rank + 1) * self.local_samples)
        batch.advantages, batch.mask = adv.advantages[sl], adv.mask[sl]
        scored = all_rewards[valid] if valid.any() else all_rewards  # masked rewards are fill values
        stats = {"reward/mean": float(scored.mean()), "reward/std": float(scored.std()),
                 "reward/masked": float(all_masked.mean()),
                 "advantage/abs_mean": float(np.abs(adv.advantages).mean()),
                 "advantage/clipped_fraction": adv.clipped_fraction, "zero_std_fraction": adv.zero_std_fraction,
                 "group/std_mean": float(np.unique(adv.group_std).mean())}
        if self.bank is not None:
            stats["exemplar/count"] = float(is_ex.sum())
            stats["exemplar/per_group"] = float(self.exemplars_per_group(self._iteration))
            for kind, sel in (("exemplar", is_ex), ("generated", ~is_ex)):
                if sel.any():
                    stats[f"{kind}/reward_mean"] = float(all_rewards[sel].mean())
                    stats[f"{kind}/advantage_mean"] = float(adv.advantages[sel].mean())
                    stats[f"{kind}/advantage_abs_mean"] = float(np.abs(adv.advantages[sel]).mean())
        components = {name: self._gather(values.astype(np.float64))
                      for name, values in batch.rewards.items() if name not in ("total", "masked")}
        for name, values in components.items():
            stats[f"reward/{name}"] = float(values.mean())
        all_prompts = self._gather(batch.prompt_ids.astype(np.int64))
        self._last_gathered = (all_rewards, all_groups, adv)
        # One row per sample: what was sampled, how it scored and what advantage it got.
        self._sample_rows = [
            {"sample_index": i, "group": int(all_groups[i]), "prompt": self.prompts[int(all_prompts[i])],
             "reward": float(all_rewards[i]), **{f"reward_{k}": float(v[i]) for k, v in components.items()},
             "advantage": float(adv.advantages[i]), "trained": bool(adv.mask[i]), "masked": bool(all_masked[i]),
             "exemplar": self.bank.exemplar_id(int(all_ex[i])) if all_ex[i] >= 0 else None}
            for i in range(len(all_rewards))]
        return stats

    # ------------------------------------------------------------------ train
    def trained_steps(self, iteration: int, batch: LocalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(steps, valid)``, both ``[n, K]``: the transitions trained for each local sample.

        Samples may have different numbers of trainable transitions (an exemplar's last bridge step is
        deterministic); rows are padded to the longest and ``valid`` marks the real entries.
        """
        rows = [self._steps_for(iteration, int(i), trainable)
                for i, trainable in zip(batch.sample_index, batch.trainable)]
        counts = [len(r) for r in rows]
        K = max(counts)
        out = torch.zeros(len(rows), K, dtype=torch.long)
        valid = torch.zeros(len(rows), K, dtype=torch.bool)
        for r, steps in enumerate(rows):
            out[r, :len(steps)] = steps
            valid[r, :len(steps)] = True
        return out, valid

    def _steps_for(self, iteration: int, sample_index: int, trainable: torch.Tensor) -> torch.Tensor:
        """The transitions sample ``sample_index`` is trained on (a function of seed, iteration, sample)."""
        ts = self.params.train.trained_steps
        steps = torch.nonzero(trainable).flatten()
        if ts.mode == "fraction" and len(steps):
            k = max(1, math.ceil(ts.fraction * len(steps)))
            g = seeded_generator(self.params.seed, iteration, sample_index, 2)
            steps = steps[torch.randperm(len(steps), generator=g)[:k]].sort().values
        return steps

    def train(self, iteration: int, batch: LocalBatch) -> dict[str, float]:
        p, t = self.params, self.params.train
        dev, tl = self.accelerator.device, self.timeline
        steps, valid = self.trained_steps(iteration, batch)
        K = steps.shape[1]
        if K == 0:
            raise TrainingSetupError("no stochastic step to train: check train.trained_steps and sample.step_type")
        # Everything the step loop indexes is on the device before it starts: the loop never waits for it.
        steps, valid = to_device_async(steps, dev), to_device_async(valid, dev).float()
        sigmas = self._sigmas_dev
        sigma_max = float(self.sigmas[1])
        adv = to_device_async(torch.as_tensor(batch.advantages), dev)
        mask = to_device_async(torch.as_tensor(batch.mask), dev).float()
        is_ex = to_device_async(torch.as_tensor(batch.exemplar_rows >= 0), dev)
        prompt_ids = to_device_async(torch.as_tensor(batch.prompt_ids), dev)
        track_kinds = self.bank is not None
        stats = _DeviceStats()  # per-step statistics stay on the device until the end of the phase

        self.policy.transformer.train()
        for epoch in range(t.num_inner_epochs):
            g = seeded_generator(p.seed, iteration, self.rank, 3, epoch)
            order = to_device_async(torch.randperm(len(batch.sample_index), generator=g), dev)
            n_micro = len(order) // self.micro_batch
            for m in range(n_micro):
                b = order[m * self.micro_batch:(m + 1) * self.micro_batch]
                cond = cond_select(self.cond_cache, prompt_ids[b])
                uncond = self._uncond_like(self.micro_batch)
                sync_now = (m + 1) % self.accumulation == 0
                for k in range(K):
                    j = steps[b, k]
                    w = mask[b] * valid[b, k]  # filtered groups and padding contribute nothing
                    x, x_next = batch.latents[b, j], batch.latents[b, j + 1]
                    sig, sig_next = sigmas[j], sigmas[j + 1]
                    last = sync_now and k == K - 1
                    ctx = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
                    with ctx:
                        with self._autocast():
                            v = self.policy.predict_velocity(x, sig, cond, uncond, self._gscale())
                        if track_kinds and v.requires_grad:
                            v.register_hook(velocity_grad_logger(stats.note, is_ex[b], w))
                        out = stochastic_step(x, v, sig, sig_next, p.sample.step_type, p.sample.noise_level,
                                              sigma_max, prev_sample=x_next)
                        old_lp = batch.log_probs[b, j]
                        ratio = torch.exp(out.log_prob - old_lp)
                        a = adv[b]
                        pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - t.clip_range, 1 + t.clip_range))
                        per_sample = pg
                        kl = torch.zeros_like(pg)
                        if t.kl_beta > 0:
                            with self._autocast():
                                v_ref = self.policy.reference_velocity(x, sig, cond, uncond, self._gscale())
                            s, std = step_std(p.sample.step_type, sig, sig_next, p.sample.noise_level, sigma_max)
                            mean_ref = step_mean(p.sample.step_type, x, v_ref, sig, sig_next, s)
                            kl = ((out.mean - mean_ref) ** 2).mean(dim=tuple(range(1, x.ndim))) / (2 * std**2)
                            per_sample = pg + t.kl_beta * kl
                        loss = (per_sample * w).mean() / (self.accumulation * K)
                        self.accelerator.backward(loss)
                    with torch.no_grad():
                        stats.add("loss", loss, scale=self.accumulation * K)
                        stats.add("policy_loss", (pg * w).mean())
                        stats.add("kl", kl.mean())
                        stats.add("approx_kl", 0.5 * ((out.log_prob - old_lp) ** 2).mean())
                        stats.add("clip_fraction", ((ratio - 1).abs() > t.clip_range).float().mean())
                        stats.add("ratio_mean", ratio.mean())
                        if track_kinds:
                            for kind, sel in (("exemplar", is_ex[b]), ("generated", ~is_ex[b])):
                                ws = valid[b, k] * sel
                                stats.note(f"{kind}/ratio_mean", ratio, ws)
                                stats.note(f"{kind}/policy_loss", pg, ws * mask[b])
                                stats.note(f"{kind}/approx_kl", 0.5 * (out.log_prob - old_lp) ** 2, ws)
                if sync_now and self.sft is not None:  # real images' share of this update (sft_loss.py)
                    for key, value in self.sft.add_policy_gradient(self.policy, self.cond_cache, list(
                            self.named_trainable.values()), self.optimizer_steps).items():
                        stats.add(key, value)
                if sync_now:
                    with tl.phase("optimizer"):
                        grad_norm = self.accelerator.clip_grad_norm_(list(self.named_trainable.values()),
                                                                     t.max_grad_norm)
                        stats.add("grad_norm", grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        self.optimizer_steps += 1
                        if self.ema is not None:
                            self.ema.update(self.named_trainable)
        self.policy.transformer.eval()
        means = stats.means()  # the phase's one wait for the device
        out_stats = {f"train/{k}": v for k, v in means.items() if "/" not in k}
        out_stats.update({k: v for k, v in means.items() if "/" in k})
        out_stats["train/lr"] = float(self.scheduler.get_last_lr()[0])
        return out_stats

    # ------------------------------------------------------------------ log / checkpoint
    def _trainable_cpu(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.named_trainable.items()}

    def save_checkpoint(self, iteration: int) -> None:
        if self.is_main:
            checkpointing.save_checkpoint(
                self.ckpt_dir, iteration, trainable=self._trainable_cpu(), optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), ema=self.ema.state_dict() if self.ema else None,
                keep=self.params.train.keep_checkpoints,
                state={"fingerprint": semantic_fingerprint(self.params), "history": self.history,
                       "optimizer_steps": self.optimizer_steps,
                       "mlflow_run_id": self.tracker.run_id if self.tracker else None})
        self.accelerator.wait_for_everyone()

    def maybe_resume(self) -> str | None:
        """Load the newest checkpoint if there is one; returns its MLflow run id."""
        ckpts = checkpointing.list_checkpoints(self.ckpt_dir)
        if not ckpts:
            return None
        ck = checkpointing.load_checkpoint(ckpts[-1])
        if ck["state"]["fingerprint"] != semantic_fingerprint(self.params):  # a hash collision or a hand edit
            raise checkpointing.CheckpointError(f"{ckpts[-1]} was made with different params; move it away")
        missing = set(self.named_trainable) ^ set(ck["trainable"])
        if missing:
            raise checkpointing.CheckpointError(f"{ckpts[-1]}: weights do not match the model ({sorted(missing)[:3]})")
        with torch.no_grad():
            for n, p in self.named_trainable.items():
                p.copy_(ck["trainable"][n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        checkpointing.set_rng_state(ck["rng"])
        self.history = ck["state"]["history"]
        self.optimizer_steps = ck["state"]["optimizer_steps"]
        self.start_iteration = ck["state"]["iteration"] + 1
        log.info("resumed from %s (next iteration %d)", ckpts[-1], self.start_iteration)
        return ck["state"].get("mlflow_run_id")

    def _write_history(self) -> None:
        """Rewrite metrics.jsonl from the history (so a resumed run drops rows past its checkpoint)."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            jsonl.rewrite(self.out_dir / "metrics.jsonl", self.history)

    def _append_history(self, record: dict[str, float]) -> None:
        """One line per iteration (rewriting the whole file each time grows with the run's length)."""
        if self.is_main:
            jsonl.append(self.out_dir / "metrics.jsonl", [record])

    def _truncate_samples(self) -> None:
        """Keep only samples.jsonl rows of iterations before ``start_iteration`` (resume); a partial last
        line left by a kill or a full disk is dropped with a warning (portraitgen/jsonl.py)."""
        if self.is_main:
            jsonl.repair(self.out_dir / "samples.jsonl", keep=lambda r: r["iteration"] < self.start_iteration)

    def _append_samples(self, iteration: int) -> None:
        if self.is_main:
            jsonl.append(self.out_dir / "samples.jsonl", [{"iteration": iteration, **row} for row in self._sample_rows])

    def _log_grid(self, iteration: int, batch: LocalBatch) -> None:
        if not self.is_main or self.tracker is None or not self.tracker.enabled:
            return
        every = self.params.train.log_images_every
        if every and (iteration % every == 0 or iteration == self.params.train.iterations - 1):
            from .images import image_grid

            self.tracker.log_image(image_grid(batch.images, ncol=self.params.sample.group_size),
                                   f"samples/iteration_{iteration:05d}.png")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        p = self.params
        run_id = self.maybe_resume()
        self.tracker = Tracker(p.tracking, stage="train", active=self.is_main, run_id=run_id,
                               params=flatten(params_to_dict(p)) | self._hardware_params(),
                               tags={"portraitgen.model_family": p.model.family})
        status = "FAILED"
        tl = self.timeline
        try:
            self._write_history()
            self._truncate_samples()
            bar = tqdm(range(self.start_iteration, p.train.iterations), desc="GRPO", disable=not self.is_main,
                       initial=self.start_iteration, total=p.train.iterations)
            for it in bar:
                tl.start("data")
                plan = self.plan(it)
                batch = self.sample(it, plan)  # data -> rollout -> exemplar_logp
                tl.switch("reward")
                self.score(batch)
                tl.switch("advantage")
                stats = self.compute_advantages(batch)
                tl.switch("train_fwd_bwd")
                if batch.mask is not None and self._any_valid():
                    stats |= self.train(it, batch)  # train_fwd_bwd with optimizer spans inside
                tl.switch("log")
                self._prefetch(it + 1)
                record = {"iteration": it, **stats, **self._phase_times(tl.elapsed())}
                self.history.append(record)
                self._append_samples(it)
                self.tracker.log_metrics({k: v for k, v in record.items() if k != "iteration"}, step=it)
                self._log_grid(it, batch)
                if self.is_main:
                    bar.set_postfix(reward=f"{stats['reward/mean']:.4f}", kl=f"{stats.get('train/kl', 0):.2e}")
                last = it == p.train.iterations - 1
                if (it + 1) % p.train.checkpoint_every == 0 or last:
                    tl.switch("checkpoint")
                    self.save_checkpoint(it)
                # Logging and checkpointing end after the MLflow call: their times (and the whole wall time)
                # reach metrics.jsonl only.
                times = tl.stop()
                record.update({"time/log": times.get("log", 0.0), "time/checkpoint": times.get("checkpoint", 0.0),
                               "time/wall": times["iteration"]})
                self._append_history(record)
            summary = self.finish()
            status = "FINISHED"
            return summary
        finally:
            self.tracker.end(status)
            self._reward_pool.shutdown(wait=True)
            self._io_pool.shutdown(wait=True)

    def _hardware_params(self) -> dict[str, Any]:
        hw = self.hardware
        return {"hardware.world_size": self.world, "hardware.micro_batch": self.micro_batch,
                "hardware.rollout_batch": self.rollout_batch, "hardware.mixed_precision": hw.mixed_precision,
                "hardware.low_precision_weights": hw.low_precision_weights, "hardware.compile": hw.compile,
                "hardware.gradient_checkpointing": hw.gradient_checkpointing}

    @staticmethod
    def _phase_times(times: dict[str, float]) -> dict[str, float]:
        """``time/<phase>`` of the phases before logging, their sum ``time/iteration``, and the coarse
        ``time/sample`` (data + rollout + exemplar log-probs), ``time/score`` and ``time/train``."""
        out = {f"time/{k}": v for k, v in times.items() if k != "iteration"}
        out["time/sample"] = sum(times.get(k, 0.0) for k in ("data", "rollout", "exemplar_logp"))
        out["time/score"] = times.get("reward", 0.0)
        out["time/train"] = times.get("train_fwd_bwd", 0.0) + times.get("optimizer", 0.0)
        out["time/iteration"] = sum(v for k, v in times.items() if k != "iteration")
        return out

    def _any_valid(self) -> bool:
        _, _, adv = self._last_gathered
        return bool(adv.mask.any())

    def finish(self) -> dict[str, Any]:
        """Export the final weights and write metrics.json (main process)."""
        summary = summarize(self.history)
        if self.is_main:
            final = self.out_dir / "final"
            use_ema = self.ema is not None and self.params.train.ema.export
            ctx = self.ema.applied(self.named_trainable) if use_ema else contextlib.nullcontext()
            with ctx:
                export.export_policy(self.policy, final, base_model=self.params.model.path,
                                     family=self.params.model.family, finetune=self.params.train.finetune,
                                     lora=self.params.train.lora, ema=use_ema)
            summary["exported"] = str(final)
            summary["processes"] = self.world
            (self.out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
            if self.tracker is not None:
                self.tracker.log_dict(summary, "metrics.json")
                log_trained_model(self.tracker, summary, final, datasets=training_datasets(self.params))
        self.accelerator.wait_for_everyone()
        return summary


class _DeviceStats:
    """Training statistics accumulated as device tensors and read once, at the end of the train phase
    (a ``float()`` per step would make the host wait for the device at every step).

    ``means()`` gives exactly what averaging the per-step Python floats gave: the per-step values are
    float32 scalars, averaged on the host in float64.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = {}
        self._scale: dict[str, float] = {}
        self._notes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, key: str, value: torch.Tensor | float, scale: float = 1.0) -> None:
        value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        self._values.setdefault(key, []).append(value.float().reshape(()))
        self._scale[key] = scale

    @staticmethod
    def _host(values: list[torch.Tensor]) -> np.ndarray:
        if len({v.device for v in values}) > 1:
            values = [v.cpu() for v in values]
        return torch.stack(values).cpu().numpy()  # one copy from the device per statistic

    def note(self, key: str, values: torch.Tensor, weights: torch.Tensor) -> None:
        """A weighted mean over the samples of one step; steps whose weights sum to 0 are left out."""
        values, weights = values.detach(), weights.detach()
        self._notes.setdefault(key, []).append(((values * weights).sum() / weights.sum(), weights.sum()))

    def means(self) -> dict[str, float]:
        out = {}
        for key, vals in self._values.items():
            out[key] = float(np.mean([float(v) * self._scale[key] for v in self._host(vals)]))
        for key, pairs in self._notes.items():
            ratios = self._host([r.float() for r, _ in pairs])
            weights = self._host([w.float() for _, w in pairs])
            kept = [float(r) for r, w in zip(ratios, weights) if float(w) > 0]
            if kept:
                out[key] = float(np.mean(kept))
        return out


def velocity_grad_logger(note, is_exemplar: torch.Tensor, weights: torch.Tensor):
    """A backward hook on the predicted velocity: the gradient norm reaching each sample, logged for
    exemplars and generated samples separately (their share of the learning signal)."""

    def hook(grad: torch.Tensor) -> None:
        norms = grad.detach().flatten(1).norm(dim=1)
        note("exemplar/velocity_grad_norm", norms, weights * is_exemplar)
        note("generated/velocity_grad_norm", norms, weights * ~is_exemplar)

    return hook


def _record_event(device: torch.device):
    """A CUDA event marking the work queued so far (None on a CPU, where work is already done)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def summarize(history: list[dict[str, float]]) -> dict[str, Any]:
    """Final figures: reward at the start and end (mean of the first / last up-to-5 iterations)."""
    if not history:
        return {"iterations": 0}
    rewards = np.array([h["reward/mean"] for h in history])
    w = min(5, len(rewards))
    out = {"iterations": len(history), "reward_first": float(rewards[:w].mean()),
           "reward_last": float(rewards[-w:].mean()), "reward_gain": float(rewards[-w:].mean() - rewards[:w].mean()),
           "seconds_per_iteration": float(np.median([h["time/iteration"] for h in history]))}
    for key in ("train/kl", "train/approx_kl", "train/clip_fraction", "zero_std_fraction"):
        vals = [h[key] for h in history if key in h]
        if vals:
            out[key.replace("train/", "")] = float(vals[-1])
    return out

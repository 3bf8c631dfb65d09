"""GRPO training of a flow-matching policy on Accelerate (docs/design.md §2-§3).

One iteration reads as its phases (:meth:`GRPOTrainer.run`)::

    plan      -> which prompts, which steps are stochastic, which slots hold exemplars (seed, iteration)
    sample    -> each process rolls out its share of the groups, recording latents and log-probs
    score     -> rewards of the decoded images
    advantage -> rewards of *all* processes gathered, normalised within whole groups
    train     -> clipped policy gradient (+ KL to the reference) over the trained steps
    log/save  -> metrics to MLflow and metrics.jsonl, periodic checkpoints

Each phase hands its results on explicitly: ``plan`` returns an :class:`IterationPlan`, ``sample`` a
:class:`LocalBatch`, and ``score`` / ``compute_advantages`` fill in the batch's rewards, advantages and
log rows. The pieces live apart: the loss in :mod:`portraitgen.grpo_loss`, exemplars in
:mod:`portraitgen.exemplar_mixing`, logged figures in :mod:`portraitgen.train_metrics`, batch layout and
hardware options in :mod:`portraitgen.train_setup`.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpointing, export, jsonl
from .advantages import group_advantages
from .config import Params, flatten, params_to_dict
from .ema import EMA
from .embeddings import EmbeddingCache
from .exemplar_mixing import ExemplarMixer, exemplars_per_group, precomputed_rewards, transition_log_probs
from .exemplars import ExemplarBank
from .fingerprint import fingerprint_digest, semantic_fingerprint
from .grpo_loss import approx_kl, clipped, gaussian_kl, transition_loss
from .hardware import Hardware
from .io import atomic_write_text
from .logged_model import log_trained_model, training_datasets
from .policies import FlowPolicy, cond_select, load_policy, model_fingerprint, resolve_model_path
from .profiling import PhaseTimeline
from .rewards import RewardSet
from .sampling import (Trajectory, randn_per_sample, rollout, seeded_generator, step_mean, step_std,
                       stochastic_step, to_device_async)
from .sft_loss import supervised_term
from .stage import tracked
from .tracking import Tracker
from .train_metrics import DeviceStats, advantage_stats, phase_times, sample_rows, summarize, velocity_grad_logger
from .train_setup import (TrainingSetupError, batch_layout, hardware_params, optimizer_and_schedule,
                          trainable_parameters, training_prompts)

log = logging.getLogger(__name__)

__all__ = ["GRPOTrainer", "Hardware", "IterationPlan", "LocalBatch", "TrainingSetupError", "summarize"]


@dataclass
class IterationPlan:
    prompt_ids: np.ndarray  # [prompts_per_iteration] index into the prompt list
    stochastic: torch.Tensor  # [T] bool: SDE steps of this iteration's rollouts
    exemplar_rows: np.ndarray | None = None  # [prompts, group_size]: exemplar row per slot, -1 = generated


@dataclass
class LocalBatch:
    """This process's share of an iteration's samples, and what the later phases find about them."""

    iteration: int
    sample_index: np.ndarray  # [n] global sample index within the iteration
    group: np.ndarray  # [n] group (prompt slot) of each sample
    prompt_ids: np.ndarray  # [n]
    latents: torch.Tensor  # [n, T+1, C, h, w]
    log_probs: torch.Tensor  # [n, T]
    stochastic: torch.Tensor  # [T]: the rollouts' SDE steps
    images: torch.Tensor  # [n, 3, H, W]
    trainable: torch.Tensor  # [n, T] bool: transitions each sample may be trained on
    exemplar_rows: np.ndarray  # [n] exemplar row of each sample, -1 for generated samples
    pending_rewards: Future | None = None  # generated samples' rewards, being scored in a worker thread
    # Filled in by score():
    rewards: dict[str, np.ndarray] = field(default_factory=dict)  # reward name -> [n]
    # Filled in by compute_advantages() (from all processes' samples):
    advantages: np.ndarray | None = None  # [n]
    mask: np.ndarray | None = None  # [n] bool: trained (not filtered or masked)
    trained_anywhere: bool = False  # some sample of the iteration, on any process, is trained
    log_rows: list[dict[str, Any]] = field(default_factory=list)  # samples.jsonl rows of every sample


class GRPOTrainer:
    """One training run: the policy, its optimizer and the run's state (history, optimizer steps).

    ``run()`` is the whole run; ``iteration(it)`` one iteration, made of the phases ``plan``, ``sample``,
    ``score``, ``compute_advantages`` and ``train``, each callable alone (tests and benchmarks do).
    """

    def __init__(self, params: Params, out_dir: str | Path, hardware: Hardware = Hardware(),
                 accelerator=None, policy: FlowPolicy | None = None):
        """``policy``: a ready policy on the device instead of loading ``params.model.path`` (benchmarks of
        random-initialised real-size architectures; the path then only names the model in fingerprints)."""
        from accelerate import Accelerator

        self.params = params
        self.out_dir = Path(out_dir)
        # Checkpoints live in a folder per params fingerprint: a run resumes only from checkpoints made
        # with the same training params, and changing them starts afresh without deleting anything.
        # Computed once: it hashes the model's weights and the exemplar index, which a run does not change.
        self.fingerprint = semantic_fingerprint(params)
        self.ckpt_dir = self.out_dir / "checkpoints" / fingerprint_digest(self.fingerprint)
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
        self.layout = batch_layout(params, hardware, self.world)
        self.micro_batch, self.accumulation = self.layout.micro_batch, self.layout.accumulation
        self.rollout_batch, self.local_samples = self.layout.rollout_batch, self.layout.local_samples
        # Cheap checks first, so a bad prompt file or reward name fails before the model loads.
        self.prompts = training_prompts(params)
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
        t = params.train
        self.named_trainable = trainable_parameters(self.policy, t, hardware)
        self.optimizer, self.scheduler = optimizer_and_schedule(t, list(self.named_trainable.values()),
                                                                self.accelerator.device)
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
        self.bank: ExemplarBank | None = None
        self.exemplars: ExemplarMixer | None = None
        ex = t.exemplars
        if ex.per_group > 0:
            self.bank = ExemplarBank(ex.index, sigmas=self.sigmas,
                                     model_fingerprint=model_fingerprint(params.model.family, params.model.path))
            known = (precomputed_rewards(ex.rewards, self.bank, params, list(self.rewards.weights) + ["total"])
                     if ex.rewards else None)
            self.exemplars = ExemplarMixer(ex, self.bank, seed=params.seed, group_size=params.sample.group_size,
                                           resolution=res, prompts=self.prompts, precomputed_rewards=known)
        if self.accelerator.device.type != "cpu":
            self.policy.offload_text_encoders()
        self.start_iteration = 0
        self.history: list[dict[str, float]] = []
        self.optimizer_steps = 0
        self.tracker: Tracker | None = None  # the run's MLflow run, opened by run()
        # Phase timing of every iteration (CUDA events, no syncs); benchmarks switch memory tracking on.
        self.timeline = PhaseTimeline(self.accelerator.device)
        # A worker scores the generated images while the device computes the exemplars' log-probs.
        self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="portraitgen-reward")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Resume from the newest checkpoint if there is one, run the remaining iterations, export."""
        p = self.params
        run_id = self.maybe_resume()
        run_params = flatten(params_to_dict(p)) | hardware_params(self.hardware, self.layout, self.world)
        try:
            with tracked(p.tracking, "train", active=self.is_main, run_id=run_id, params=run_params,
                         tags={"portraitgen.model_family": p.model.family}) as self.tracker:
                self._write_history()
                self._truncate_samples()
                bar = tqdm(range(self.start_iteration, p.train.iterations), desc="GRPO", disable=not self.is_main,
                           initial=self.start_iteration, total=p.train.iterations)
                for it in bar:
                    stats = self.iteration(it)
                    if self.is_main:
                        bar.set_postfix(reward=f"{stats['reward/mean']:.4f}", kl=f"{stats.get('train/kl', 0):.2e}")
                return self.finish()
        finally:
            self._reward_pool.shutdown(wait=True)
            if self.exemplars is not None:
                self.exemplars.close()

    def iteration(self, it: int) -> dict[str, float]:
        """One GRPO iteration, phase by phase (each timed); returns its logged statistics."""
        tl = self.timeline
        tl.start("data")
        plan = self.plan(it)
        batch = self.sample(it, plan)  # data -> rollout -> exemplar_logp
        tl.switch("reward")
        self.score(batch)
        tl.switch("advantage")
        stats = self.compute_advantages(batch)
        tl.switch("train_fwd_bwd")
        if batch.trained_anywhere:
            stats |= self.train(it, batch)  # train_fwd_bwd with optimizer spans inside
        tl.switch("log")
        self._prefetch(it + 1)
        record = self._log(it, batch, stats, tl.elapsed())
        if (it + 1) % self.params.train.checkpoint_every == 0 or it == self.params.train.iterations - 1:
            tl.switch("checkpoint")
            self.save_checkpoint(it)
        # Logging and checkpointing end after the MLflow call: their times (and the whole wall time) reach
        # metrics.jsonl only.
        times = tl.stop()
        record.update({"time/log": times.get("log", 0.0), "time/checkpoint": times.get("checkpoint", 0.0),
                       "time/wall": times["iteration"]})
        self._append_history(record)
        return stats

    # ------------------------------------------------------------------ plan
    def plan(self, iteration: int) -> IterationPlan:
        """The iteration's plan, a pure function of ``(seed, iteration)``."""
        return self._make_plan(iteration)

    def _make_plan(self, iteration: int) -> IterationPlan:
        # (Apart from plan(), which benchmarks wrap to mark iteration boundaries: prefetching plans too.)
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
        rows = self.exemplars.plan(iteration, prompt_ids) if self.exemplars is not None else None
        return IterationPlan(prompt_ids=prompt_ids, stochastic=stochastic, exemplar_rows=rows)

    def exemplars_per_group(self, iteration: int) -> int:
        return exemplars_per_group(self.params.train.exemplars, iteration)

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
        ex_data = self.exemplars.data(ex_rows[ex]) if len(ex) else None  # usually prefetched already
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
        return LocalBatch(iteration=iteration, sample_index=idx, group=group, prompt_ids=prompt_ids,
                          latents=latents, log_probs=log_probs, stochastic=stochastic, images=torch.stack(images),
                          trainable=trainable, exemplar_rows=ex_rows, pending_rewards=pending)

    def _transition_log_probs(self, latents: torch.Tensor, prompt_ids: torch.Tensor,
                              steps: list[torch.Tensor]) -> torch.Tensor:
        """Log-probs ``[E, T]`` of the transitions ``steps[e]`` of ``latents`` under the current policy."""
        s = self.params.sample
        return transition_log_probs(self._velocity, latents, prompt_ids, steps, self._sigmas_dev, float(self.sigmas[1]),
                                    step_type=s.step_type, noise_level=s.noise_level, batch_size=self.rollout_batch)

    def _prefetch(self, iteration: int) -> None:
        """Load the exemplar data of ``iteration`` in the background (shards are read once and kept)."""
        if self.exemplars is None or iteration >= self.params.train.iterations:
            return
        _, _, _, ex_rows = self._local_slots(self._make_plan(iteration))
        self.exemplars.prefetch(ex_rows[ex_rows >= 0])

    # ------------------------------------------------------------------ score
    def _score_generated(self, done, images: list[torch.Tensor], prompt_ids: np.ndarray, sample_index: np.ndarray,
                         group: np.ndarray) -> dict[str, np.ndarray]:
        """Rewards of generated images (run in the reward worker while the device keeps computing)."""
        if done is not None:
            done.synchronize()  # their asynchronous copies to the host have landed
        meta = [{"group": int(g), "sample_index": int(i), "exemplar": False} for g, i in zip(group, sample_index)]
        return self.rewards(torch.stack(images), [self.prompts[i] for i in prompt_ids], meta)

    def score(self, batch: LocalBatch) -> dict[str, np.ndarray]:
        """``batch.rewards``: rewards of the generated images; exemplars' are computed once and reused
        (their image is fixed)."""
        prompts = [self.prompts[i] for i in batch.prompt_ids]
        meta = [{"group": int(g), "sample_index": int(i), "exemplar": int(r) >= 0}
                for g, i, r in zip(batch.group, batch.sample_index, batch.exemplar_rows)]
        gen = np.flatnonzero(batch.exemplar_rows < 0)
        ex = np.flatnonzero(batch.exemplar_rows >= 0)
        if len(ex) == 0:
            batch.rewards = self.rewards(batch.images, prompts, meta)
            return batch.rewards
        gen_scores = None
        if len(gen):  # first, so the reward worker is done before this thread scores anything
            gen_scores = (batch.pending_rewards.result() if batch.pending_rewards is not None else
                          self.rewards(batch.images[gen], [prompts[i] for i in gen], [meta[i] for i in gen]))
            batch.pending_rewards = None

        def score_new(positions: list[int]) -> dict[str, np.ndarray]:
            at = [int(ex[k]) for k in positions]
            return self.rewards(batch.images[at], [prompts[i] for i in at], [meta[i] for i in at])

        ex_scores = self.exemplars.rewards(batch.exemplar_rows[ex], score_new)
        names = list(self.rewards.weights) + ["total", "masked"]
        out = {n: np.zeros(len(prompts), dtype=np.float32) for n in names}
        if gen_scores is not None:
            for n in names:
                out[n][gen] = gen_scores.get(n, 0.0)  # "masked" only where on_invalid is "mask"
        for i, scores in zip(ex, ex_scores):
            for n in names:
                out[n][i] = scores.get(n, 0.0)
        batch.rewards = out
        return out

    # ------------------------------------------------------------------ advantages
    def _gather(self, array: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(array), device=self.accelerator.device)
        return self.accelerator.gather(t).cpu().numpy()

    def compute_advantages(self, batch: LocalBatch) -> dict[str, float]:
        """Group-normalised advantages from every process's rewards: this process's share goes to
        ``batch.advantages`` / ``batch.mask``, the iteration's log rows to ``batch.log_rows``; returns the
        iteration's reward and advantage figures."""
        t = self.params.train
        all_rewards = self._gather(batch.rewards["total"].astype(np.float64))
        all_groups = self._gather(batch.group.astype(np.int64))
        all_ex = self._gather(batch.exemplar_rows.astype(np.int64))
        is_ex = all_ex >= 0
        # A masked reward (reward.on_invalid: mask) never steers training: advantage 0, out of the group stats.
        local_masked = batch.rewards.get("masked", np.zeros(len(batch.group), dtype=np.float32))
        all_masked = self._gather(np.asarray(local_masked, dtype=np.float64)) > 0
        adv = group_advantages(all_rewards, all_groups, global_std=t.global_std, clip=t.adv_clip_max,
                               filter_zero_std=t.filter_zero_std, is_exemplar=is_ex,
                               exemplars_in_stats=t.exemplars.include_in_std, exemplar_cap=t.exemplars.adv_cap,
                               valid=~all_masked)
        # Gather is rank-major, so this process's samples are one contiguous slice.
        sl = slice(self.rank * self.local_samples, (self.rank + 1) * self.local_samples)
        batch.advantages, batch.mask = adv.advantages[sl], adv.mask[sl]
        batch.trained_anywhere = bool(adv.mask.any())
        components = {name: self._gather(values.astype(np.float64))
                      for name, values in batch.rewards.items() if name not in ("total", "masked")}
        all_prompts = self._gather(batch.prompt_ids.astype(np.int64))
        exemplar_ids = [self.bank.exemplar_id(int(e)) if e >= 0 else None for e in all_ex]
        batch.log_rows = sample_rows(all_groups, [self.prompts[int(i)] for i in all_prompts], all_rewards, components,
                                     adv, all_masked, exemplar_ids)
        return advantage_stats(all_rewards, adv, all_masked, components, is_ex if self.bank is not None else None,
                               self.exemplars_per_group(batch.iteration))

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
        """``train.num_inner_epochs`` passes over the batch in shuffled micro-batches, one optimizer step
        per ``train.global_batch_size`` samples; returns the phase's loss statistics."""
        p, t = self.params, self.params.train
        dev = self.accelerator.device
        steps, valid = self.trained_steps(iteration, batch)
        if steps.shape[1] == 0:
            raise TrainingSetupError("no stochastic step to train: check train.trained_steps and sample.step_type")
        # Everything the step loop indexes is on the device before it starts: the loop never waits for it.
        on_dev = _TrainInputs(steps=to_device_async(steps, dev), valid=to_device_async(valid, dev).float(),
                              advantages=to_device_async(torch.as_tensor(batch.advantages), dev),
                              mask=to_device_async(torch.as_tensor(batch.mask), dev).float(),
                              is_exemplar=to_device_async(torch.as_tensor(batch.exemplar_rows >= 0), dev),
                              prompt_ids=to_device_async(torch.as_tensor(batch.prompt_ids), dev))
        stats = DeviceStats()  # per-step statistics stay on the device until the end of the phase
        self.policy.transformer.train()
        for epoch in range(t.num_inner_epochs):
            g = seeded_generator(p.seed, iteration, self.rank, 3, epoch)
            order = to_device_async(torch.randperm(len(batch.sample_index), generator=g), dev)
            for m in range(len(order) // self.micro_batch):
                sync_now = (m + 1) % self.accumulation == 0
                self._accumulate_gradients(batch, on_dev, order[m * self.micro_batch:(m + 1) * self.micro_batch],
                                           sync_now, stats)
                if sync_now:
                    self._optimizer_step(stats)
        self.policy.transformer.eval()
        return stats.train_phase_stats(lr=float(self.scheduler.get_last_lr()[0]))

    def _accumulate_gradients(self, batch: LocalBatch, on_dev: _TrainInputs, b: torch.Tensor, sync_now: bool,
                              stats: DeviceStats) -> None:
        """Backward of the GRPO loss of micro-batch ``b`` (sample positions) over its trained steps. The
        gradients are all-reduced only on the last backward before an optimizer step."""
        s, t = self.params.sample, self.params.train
        sigmas, sigma_max = self._sigmas_dev, float(self.sigmas[1])
        K = on_dev.steps.shape[1]
        scale = self.accumulation * K  # the optimizer step's loss is the mean over its samples and steps
        cond = cond_select(self.cond_cache, on_dev.prompt_ids[b])
        uncond = self._uncond_like(self.micro_batch)
        is_ex = on_dev.is_exemplar[b]
        for k in range(K):
            j = on_dev.steps[b, k]
            w = on_dev.mask[b] * on_dev.valid[b, k]  # filtered groups and padding contribute nothing
            x, x_next = batch.latents[b, j], batch.latents[b, j + 1]
            sig, sig_next = sigmas[j], sigmas[j + 1]
            last = sync_now and k == K - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                with self._autocast():
                    v = self.policy.predict_velocity(x, sig, cond, uncond, self._gscale())
                if self.bank is not None and v.requires_grad:
                    v.register_hook(velocity_grad_logger(stats.note, is_ex, w))
                out = stochastic_step(x, v, sig, sig_next, s.step_type, s.noise_level, sigma_max, prev_sample=x_next)
                kl = None
                if t.kl_beta > 0:
                    with self._autocast():
                        v_ref = self.policy.reference_velocity(x, sig, cond, uncond, self._gscale())
                    s_t, std = step_std(s.step_type, sig, sig_next, s.noise_level, sigma_max)
                    kl = gaussian_kl(out.mean, step_mean(s.step_type, x, v_ref, sig, sig_next, s_t), std)
                old_lp = batch.log_probs[b, j]
                terms = transition_loss(out.log_prob, old_lp, on_dev.advantages[b], clip_range=t.clip_range, kl=kl,
                                        kl_beta=t.kl_beta)
                loss = (terms.per_sample * w).mean() / scale
                self.accelerator.backward(loss)
            with torch.no_grad():
                stats.add("loss", loss, scale=scale)
                stats.add("policy_loss", (terms.policy * w).mean())
                stats.add("kl", terms.kl.mean())
                stats.add("approx_kl", 0.5 * ((out.log_prob - old_lp) ** 2).mean())
                stats.add("clip_fraction", clipped(terms.ratio, t.clip_range).mean())
                stats.add("ratio_mean", terms.ratio.mean())
                if self.bank is not None:
                    for kind, sel in (("exemplar", is_ex), ("generated", ~is_ex)):
                        ws = on_dev.valid[b, k] * sel
                        stats.note(f"{kind}/ratio_mean", terms.ratio, ws)
                        stats.note(f"{kind}/policy_loss", terms.policy, ws * on_dev.mask[b])
                        stats.note(f"{kind}/approx_kl", approx_kl(out.log_prob, old_lp), ws)

    def _optimizer_step(self, stats: DeviceStats) -> None:
        params = list(self.named_trainable.values())
        if self.sft is not None:  # real images' share of this update (sft_loss.py)
            for key, value in self.sft.add_policy_gradient(self.policy, self.cond_cache, params,
                                                           self.optimizer_steps).items():
                stats.add(key, value)
        with self.timeline.phase("optimizer"):
            stats.add("grad_norm", self.accelerator.clip_grad_norm_(params, self.params.train.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
            if self.ema is not None:
                self.ema.update(self.named_trainable)

    # ------------------------------------------------------------------ policy calls
    @property
    def _cfg(self) -> bool:
        return self.params.sample.cfg and self.params.sample.guidance_scale != 1.0

    def _gscale(self) -> float:
        return self.params.sample.guidance_scale if self._cfg else 1.0

    def _autocast(self):
        return self.accelerator.autocast() if self.hardware.mixed_precision != "no" else contextlib.nullcontext()

    def _uncond_like(self, n: int):
        if self.uncond is None:
            return None
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.uncond.items()}

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The policy's velocity for prompts ``prompt_ids`` (CFG and autocast as configured)."""
        cond = cond_select(self.cond_cache, prompt_ids)
        with self._autocast():
            return self.policy.predict_velocity(x, sigma, cond, self._uncond_like(x.shape[0]), self._gscale())

    # ------------------------------------------------------------------ log / checkpoint
    def _log(self, iteration: int, batch: LocalBatch, stats: dict[str, float],
             times: dict[str, float]) -> dict[str, float]:
        """The iteration's record in the history, samples.jsonl and MLflow (metrics.jsonl gets it once the
        iteration's times are complete)."""
        record = {"iteration": iteration, **stats, **phase_times(times)}
        self.history.append(record)
        if self.is_main:
            jsonl.append(self.out_dir / "samples.jsonl", [{"iteration": iteration, **row} for row in batch.log_rows])
        self.tracker.log_metrics({k: v for k, v in record.items() if k != "iteration"}, step=iteration)
        self._log_grid(iteration, batch)
        return record

    def _log_grid(self, iteration: int, batch: LocalBatch) -> None:
        if not self.is_main or self.tracker is None or not self.tracker.enabled:
            return
        every = self.params.train.log_images_every
        if every and (iteration % every == 0 or iteration == self.params.train.iterations - 1):
            from .images import image_grid

            self.tracker.log_image(image_grid(batch.images, ncol=self.params.sample.group_size),
                                   f"samples/iteration_{iteration:05d}.png")

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

    def save_checkpoint(self, iteration: int) -> None:
        if self.is_main:
            checkpointing.save_checkpoint(
                self.ckpt_dir, iteration, trainable={n: p.detach().cpu() for n, p in self.named_trainable.items()},
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                ema=self.ema.state_dict() if self.ema else None, keep=self.params.train.keep_checkpoints,
                state={"fingerprint": self.fingerprint, "history": self.history,
                       "optimizer_steps": self.optimizer_steps,
                       "mlflow_run_id": self.tracker.run_id if self.tracker else None})
        self.accelerator.wait_for_everyone()

    def maybe_resume(self) -> str | None:
        """Load the newest checkpoint if there is one; returns its MLflow run id."""
        ckpts = checkpointing.list_checkpoints(self.ckpt_dir)
        if not ckpts:
            return None
        ck = checkpointing.load_checkpoint(ckpts[-1])
        if ck["state"]["fingerprint"] != self.fingerprint:  # a hash collision or a hand edit
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
            atomic_write_text(self.out_dir / "metrics.json", json.dumps(summary, indent=2))
            if self.tracker is not None:
                self.tracker.log_dict(summary, "metrics.json")
                log_trained_model(self.tracker, summary, final, datasets=training_datasets(self.params))
        self.accelerator.wait_for_everyone()
        return summary


@dataclass(frozen=True)
class _TrainInputs:
    """What the train phase's step loop indexes, on the device (``[n, K]`` / ``[n]``)."""

    steps: torch.Tensor  # trained transitions of each sample
    valid: torch.Tensor  # 1 for a real entry of ``steps``, 0 for padding
    advantages: torch.Tensor
    mask: torch.Tensor  # 1 for a trained sample
    is_exemplar: torch.Tensor
    prompt_ids: torch.Tensor


def _record_event(device: torch.device):
    """A CUDA event marking the work queued so far (None on a CPU, where work is already done)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event

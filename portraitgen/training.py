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
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import checkpointing, export
from .advantages import group_advantages
from .config import Params, flatten, params_to_dict
from .ema import EMA
from .embeddings import EmbeddingCache
from .exemplars import ExemplarBank
from .images import load_image
from .policies import FlowPolicy, cond_select, load_policy, model_fingerprint, resolve_model_path
from .prompts import load_prompts
from .rewards import RewardSet
from .sampling import Trajectory, randn_per_sample, rollout, step_mean, step_std, stochastic_step
from .tracking import Tracker

log = logging.getLogger(__name__)

# Params that may change between a run and its resumption without changing what was computed so far.
RESUMABLE_KEYS = ("train.iterations", "train.checkpoint_every", "train.keep_checkpoints", "train.log_images_every",
                  "tracking.")


class TrainingSetupError(ValueError):
    """The run cannot start: params, hardware flags and process count do not fit together."""


@dataclass(frozen=True)
class Hardware:
    """How the work is laid out on the machine. Never changes results, so it is not in params."""

    micro_batch_size: int = 0  # samples per forward pass per process; 0 = as large as possible, up to 8
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" autocast for the transformer (step math stays fp32)


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of ``key`` (independent streams for different keys)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


def semantic_fingerprint(params: Params) -> dict[str, Any]:
    """The params that determine what training computes (JSON-normalised: tuples become lists)."""
    flat = flatten(params_to_dict(params))
    kept = {k: v for k, v in flat.items() if not any(k == r or k.startswith(r) for r in RESUMABLE_KEYS)}
    return json.loads(json.dumps(kept, sort_keys=True))


def fingerprint_hash(params: Params) -> str:
    return hashlib.sha256(json.dumps(semantic_fingerprint(params), sort_keys=True).encode()).hexdigest()[:12]


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


class GRPOTrainer:
    def __init__(self, params: Params, out_dir: str | Path, hardware: Hardware = Hardware(),
                 accelerator=None):
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
        self.policy: FlowPolicy = load_policy(params.model.family, params.model.path, device=self.accelerator.device,
                                              text_encoders=embeddings is None)
        self.policy.freeze_all()
        t = params.train
        if t.finetune == "lora":
            self.policy.enable_lora(t.lora.rank, t.lora.alpha, t.lora.target_modules)
        else:
            self.policy.enable_full_finetune(keep_reference=t.kl_beta > 0)
        self.named_trainable = {n: p for n, p in self.policy.transformer.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.named_trainable.values()), lr=t.lr,
                                           betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                                           eps=t.adam_eps)
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
        # Text encoders run once (here, or in the precompute stage): training only indexes these embeddings.
        if embeddings is None:
            embeddings = EmbeddingCache.from_policy(self.policy, self.prompts)
        dev = self.accelerator.device
        self.cond_cache = embeddings.lookup(self.prompts, dev)
        self.uncond = embeddings.lookup([""], dev) if self._cfg else None
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

    def _precomputed_exemplar_rewards(self, path: str) -> dict[int, dict[str, float]]:
        from .precompute import reward_config_hash

        if not Path(path).is_file():
            raise TrainingSetupError(f"train.exemplars.rewards: {path} not found (run `portraitgen precompute`)")
        table = pd.read_parquet(path)
        if (table["reward_config"] != reward_config_hash(self.params)).any():
            raise TrainingSetupError(f"train.exemplars.rewards: {path} was scored with another reward config; "
                                     f"re-run `portraitgen precompute`")
        by_hash = table.drop_duplicates("content_hash").set_index("content_hash")
        names = list(self.rewards.weights) + ["total"]
        out = {}
        for row, h in enumerate(self.bank.index["content_hash"]):
            if h in by_hash.index:
                out[row] = {n: float(by_hash.loc[h, n]) for n in names}
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
        self.local_samples = s.global_batch_size // w

    def _gscale(self) -> float:
        return self.params.sample.guidance_scale if self._cfg else 1.0

    def _autocast(self):
        return self.accelerator.autocast() if self.hardware.mixed_precision != "no" else contextlib.nullcontext()

    # ------------------------------------------------------------------ plan
    def plan(self, iteration: int) -> IterationPlan:
        p = self.params
        self._iteration = iteration
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
    @torch.no_grad()
    def sample(self, iteration: int, plan: IterationPlan) -> LocalBatch:
        p, G = self.params, self.params.sample.group_size
        idx = np.arange(self.rank * self.local_samples, (self.rank + 1) * self.local_samples)
        group = idx // G
        prompt_ids = plan.prompt_ids[group]
        ex_rows = (plan.exemplar_rows[group, idx % G] if plan.exemplar_rows is not None
                   else np.full(len(idx), -1, dtype=np.int64))
        n, T = len(idx), p.sample.num_steps
        latents = torch.empty(n, T + 1, *self.latent_shape, device=self.accelerator.device)
        log_probs = torch.zeros(n, T, device=self.accelerator.device)
        images: list[torch.Tensor | None] = [None] * n
        trainable = torch.zeros(n, T, dtype=torch.bool)
        stochastic = plan.stochastic
        gen = np.flatnonzero(ex_rows < 0)
        for lo in range(0, len(gen), self.micro_batch):
            pos = gen[lo:lo + self.micro_batch]
            gens = [seeded_generator(p.seed, iteration, int(idx[i]), 1) for i in pos]
            start = randn_per_sample(self.latent_shape, gens, self.accelerator.device)
            cond = cond_select(self.cond_cache, prompt_ids[pos])
            with self._autocast():
                traj: Trajectory = rollout(self.policy, cond, start, self.sigmas, step_type=p.sample.step_type,
                                           noise_level=p.sample.noise_level, generators=gens,
                                           uncond=self._uncond_like(len(pos)), guidance_scale=self._gscale(),
                                           stochastic=plan.stochastic)
            stochastic = traj.stochastic
            latents[pos], log_probs[pos] = traj.latents, traj.log_probs
            trainable[pos] = traj.stochastic
            for i, img in zip(pos, self.policy.decode(traj.final)):
                images[i] = img
        ex = np.flatnonzero(ex_rows >= 0)
        for lo in range(0, len(ex), self.micro_batch):
            pos = ex[lo:lo + self.micro_batch]
            trajs = [self.bank.trajectory(int(ex_rows[i])) for i in pos]
            lat = torch.stack([t[0] for t in trajs]).to(self.accelerator.device)
            # Exemplars are trained where the rollouts are (window mode) and where their own path allows.
            trainable[pos] = torch.stack([t[1] for t in trajs]) & plan.stochastic
            latents[pos] = lat
            # logp_old under the current rollout policy, so an exemplar's first ratio is exactly 1.
            log_probs[pos] = self._transition_log_probs(lat, prompt_ids[pos], trainable[pos])
            for i in pos:
                images[i] = self._exemplar_image(int(ex_rows[i]))
        return LocalBatch(sample_index=idx, group=group, prompt_ids=prompt_ids, latents=latents,
                          log_probs=log_probs, stochastic=stochastic, images=torch.stack(images),
                          trainable=trainable, exemplar_rows=ex_rows)

    @torch.no_grad()
    def _transition_log_probs(self, latents: torch.Tensor, prompt_ids: np.ndarray,
                              trainable: torch.Tensor) -> torch.Tensor:
        p = self.params
        cond = cond_select(self.cond_cache, prompt_ids)
        out = torch.zeros(latents.shape[0], latents.shape[1] - 1, device=latents.device)
        sigma_max = float(self.sigmas[1])
        for i in range(latents.shape[1] - 1):
            if not trainable[:, i].any():
                continue
            with self._autocast():
                v = self.policy.predict_velocity(latents[:, i], float(self.sigmas[i]), cond,
                                                 self._uncond_like(len(prompt_ids)), self._gscale())
            step = stochastic_step(latents[:, i], v, float(self.sigmas[i]), float(self.sigmas[i + 1]),
                                   p.sample.step_type, p.sample.noise_level, sigma_max, prev_sample=latents[:, i + 1])
            out[:, i] = torch.where(trainable[:, i].to(out.device), step.log_prob, torch.zeros_like(step.log_prob))
        return out

    def _exemplar_image(self, row: int) -> torch.Tensor:
        """The real image an exemplar trajectory ends on (read once; it is what gets scored)."""
        if row not in self._exemplar_images:
            path = self.bank.index["image_file"].iloc[row]
            self._exemplar_images[row] = load_image(path, self.params.model.resolution).to(self.accelerator.device)
        return self._exemplar_images[row]

    def _uncond_like(self, n: int):
        if self.uncond is None:
            return None
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.uncond.items()}

    # ------------------------------------------------------------------ score
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
        new = [i for i in ex if int(batch.exemplar_rows[i]) not in self._exemplar_rewards]
        if new:
            scored = self.rewards(batch.images[new], [prompts[i] for i in new], [meta[i] for i in new])
            for k, i in enumerate(new):
                self._exemplar_rewards[int(batch.exemplar_rows[i])] = {n: float(v[k]) for n, v in scored.items()}
        names = list(self.rewards.weights) + ["total"]
        out = {n: np.zeros(len(prompts), dtype=np.float32) for n in names}
        if len(gen):
            scored = self.rewards(batch.images[gen], [prompts[i] for i in gen], [meta[i] for i in gen])
            for n in names:
                out[n][gen] = scored[n]
        for i in ex:
            for n in names:
                out[n][i] = self._exemplar_rewards[int(batch.exemplar_rows[i])][n]
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
        adv = group_advantages(all_rewards, all_groups, global_std=t.global_std, clip=t.adv_clip_max,
                               filter_zero_std=t.filter_zero_std, is_exemplar=is_ex,
                               exemplars_in_stats=t.exemplars.include_in_std, exemplar_cap=t.exemplars.adv_cap)
        # Gather is rank-major, so this process's samples are one contiguous slice.
        sl = slice(self.rank * self.local_samples, (self.rank + 1) * self.local_samples)
        batch.advantages, batch.mask = adv.advantages[sl], adv.mask[sl]
        stats = {"reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std()),
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
                      for name, values in batch.rewards.items() if name != "total"}
        for name, values in components.items():
            stats[f"reward/{name}"] = float(values.mean())
        all_prompts = self._gather(batch.prompt_ids.astype(np.int64))
        self._last_gathered = (all_rewards, all_groups, adv)
        # One row per sample: what was sampled, how it scored and what advantage it got.
        self._sample_rows = [
            {"sample_index": i, "group": int(all_groups[i]), "prompt": self.prompts[int(all_prompts[i])],
             "reward": float(all_rewards[i]), **{f"reward_{k}": float(v[i]) for k, v in components.items()},
             "advantage": float(adv.advantages[i]), "trained": bool(adv.mask[i]),
             "exemplar": self.bank.exemplar_id(int(all_ex[i])) if all_ex[i] >= 0 else None}
            for i in range(len(all_rewards))]
        return stats

    # ------------------------------------------------------------------ train
    def trained_steps(self, iteration: int, batch: LocalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(steps, valid)``, both ``[n, K]``: the transitions trained for each local sample.

        Samples may have different numbers of trainable transitions (an exemplar's last bridge step is
        deterministic); rows are padded to the longest and ``valid`` marks the real entries.
        """
        ts = self.params.train.trained_steps
        rows, counts = [], []
        for i, trainable in zip(batch.sample_index, batch.trainable):
            steps = torch.nonzero(trainable).flatten()
            if ts.mode == "fraction" and len(steps):
                k = max(1, math.ceil(ts.fraction * len(steps)))
                g = seeded_generator(self.params.seed, iteration, int(i), 2)
                steps = steps[torch.randperm(len(steps), generator=g)[:k]].sort().values
            rows.append(steps)
            counts.append(len(steps))
        K = max(counts)
        out = torch.zeros(len(rows), K, dtype=torch.long)
        valid = torch.zeros(len(rows), K, dtype=torch.bool)
        for r, steps in enumerate(rows):
            out[r, :len(steps)] = steps
            valid[r, :len(steps)] = True
        return out, valid

    def train(self, iteration: int, batch: LocalBatch) -> dict[str, float]:
        p, t = self.params, self.params.train
        dev = self.accelerator.device
        steps, valid = self.trained_steps(iteration, batch)
        steps, valid = steps.to(dev), valid.to(dev, torch.float32)
        K = steps.shape[1]
        if K == 0:
            raise TrainingSetupError("no stochastic step to train: check train.trained_steps and sample.step_type")
        sigmas = self.sigmas.to(dev)
        sigma_max = float(self.sigmas[1])
        adv = torch.as_tensor(batch.advantages, device=dev)
        mask = torch.as_tensor(batch.mask, device=dev, dtype=torch.float32)
        is_ex = torch.as_tensor(batch.exemplar_rows >= 0, device=dev)
        track_kinds = self.bank is not None
        acc: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "kl", "approx_kl", "clip_fraction",
                                                       "ratio_mean", "grad_norm")}
        kinds: dict[str, list[float]] = {}

        def note(key: str, values: torch.Tensor, weights: torch.Tensor) -> None:
            if float(weights.sum()) > 0:
                kinds.setdefault(key, []).append(float((values * weights).sum() / weights.sum()))

        self.policy.transformer.train()
        for epoch in range(t.num_inner_epochs):
            g = seeded_generator(p.seed, iteration, self.rank, 3, epoch)
            order = torch.randperm(len(batch.sample_index), generator=g).to(dev)
            n_micro = len(order) // self.micro_batch
            for m in range(n_micro):
                b = order[m * self.micro_batch:(m + 1) * self.micro_batch]
                cond = cond_select(self.cond_cache, torch.as_tensor(batch.prompt_ids)[b.cpu()])
                uncond = self._uncond_like(len(b))
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
                            v.register_hook(velocity_grad_logger(note, is_ex[b], w))
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
                        acc["loss"].append(float(loss) * self.accumulation * K)
                        acc["policy_loss"].append(float((pg * w).mean()))
                        acc["kl"].append(float(kl.mean()))
                        acc["approx_kl"].append(float(0.5 * ((out.log_prob - old_lp) ** 2).mean()))
                        acc["clip_fraction"].append(float(((ratio - 1).abs() > t.clip_range).float().mean()))
                        acc["ratio_mean"].append(float(ratio.mean()))
                        if track_kinds:
                            for kind, sel in (("exemplar", is_ex[b]), ("generated", ~is_ex[b])):
                                ws = valid[b, k] * sel
                                note(f"{kind}/ratio_mean", ratio, ws)
                                note(f"{kind}/policy_loss", pg, ws * mask[b])
                                note(f"{kind}/approx_kl", 0.5 * (out.log_prob - old_lp) ** 2, ws)
                if sync_now:
                    grad_norm = self.accelerator.clip_grad_norm_(list(self.named_trainable.values()),
                                                                 t.max_grad_norm)
                    acc["grad_norm"].append(float(grad_norm))
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.optimizer_steps += 1
                    if self.ema is not None:
                        self.ema.update(self.named_trainable)
        self.policy.transformer.eval()
        stats = {f"train/{k}": float(np.mean(v)) for k, v in acc.items() if v}
        stats.update({k: float(np.mean(v)) for k, v in kinds.items()})
        stats["train/lr"] = float(self.scheduler.get_last_lr()[0])
        return stats

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
            _atomic_write(self.out_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))

    def _truncate_samples(self) -> None:
        """Keep only samples.jsonl rows of iterations before ``start_iteration`` (resume)."""
        path = self.out_dir / "samples.jsonl"
        if self.is_main and path.is_file():
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["iteration"] < self.start_iteration]
            _atomic_write(path, "".join(ln + "\n" for ln in keep))

    def _append_samples(self, iteration: int) -> None:
        if self.is_main:
            with open(self.out_dir / "samples.jsonl", "a") as f:
                for row in self._sample_rows:
                    f.write(json.dumps({"iteration": iteration, **row}) + "\n")

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
                               params=flatten(params_to_dict(p)) | {"hardware.world_size": self.world,
                                                                    "hardware.micro_batch": self.micro_batch},
                               tags={"portraitgen.model_family": p.model.family})
        status = "FAILED"
        try:
            self._write_history()
            self._truncate_samples()
            bar = tqdm(range(self.start_iteration, p.train.iterations), desc="GRPO", disable=not self.is_main,
                       initial=self.start_iteration, total=p.train.iterations)
            for it in bar:
                times: dict[str, float] = {}
                t0 = time.perf_counter()
                plan = self.plan(it)
                batch = self.sample(it, plan)
                times["time/sample"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                self.score(batch)
                times["time/score"] = time.perf_counter() - t1
                stats = self.compute_advantages(batch)
                t2 = time.perf_counter()
                if batch.mask is not None and self._any_valid():
                    stats |= self.train(it, batch)
                times["time/train"] = time.perf_counter() - t2
                times["time/iteration"] = time.perf_counter() - t0
                record = {"iteration": it, **stats, **times}
                self.history.append(record)
                self._write_history()
                self._append_samples(it)
                self.tracker.log_metrics({k: v for k, v in record.items() if k != "iteration"}, step=it)
                self._log_grid(it, batch)
                if self.is_main:
                    bar.set_postfix(reward=f"{stats['reward/mean']:.4f}", kl=f"{stats.get('train/kl', 0):.2e}")
                last = it == p.train.iterations - 1
                if (it + 1) % p.train.checkpoint_every == 0 or last:
                    self.save_checkpoint(it)
            summary = self.finish()
            status = "FINISHED"
            return summary
        finally:
            self.tracker.end(status)

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
        self.accelerator.wait_for_everyone()
        return summary


def velocity_grad_logger(note, is_exemplar: torch.Tensor, weights: torch.Tensor):
    """A backward hook on the predicted velocity: the gradient norm reaching each sample, logged for
    exemplars and generated samples separately (their share of the learning signal)."""

    def hook(grad: torch.Tensor) -> None:
        norms = grad.detach().flatten(1).norm(dim=1)
        note("exemplar/velocity_grad_norm", norms, weights * is_exemplar)
        note("generated/velocity_grad_norm", norms, weights * ~is_exemplar)

    return hook


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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

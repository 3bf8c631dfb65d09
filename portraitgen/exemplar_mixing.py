"""Real exemplars mixed into GRPO groups (docs/design.md §4).

An exemplar is a real image inverted into a trajectory of the sampler (the invert stage). Mixed into a
group of generated samples for the same prompt, it is scored like them and trained on like them: its
advantage says how it compares with what the policy generates now. This module holds everything about
exemplars in training:

- planning: which slots of which groups hold exemplars (the last ``E`` slots, for a fraction of the
  groups; ``E`` constant or decaying over iterations), drawn from a stream of its own;
- data: their trajectories (from the :class:`~portraitgen.exemplars.ExemplarBank`) and real images,
  loaded in the background one iteration ahead;
- log-probabilities of their stored transitions under the current policy (the ``logp_old`` of the ratio);
- rewards: precomputed by the precompute stage, or scored once in the loop and reused (the image never
  changes).
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .config import ExemplarConfig, Params, reward_config_hash
from .exemplars import ExemplarBank
from .images import load_image
from .integrity import IntegrityError, rerun, verify_file
from .sampling import stochastic_step, to_device_async
from .train_setup import TrainingSetupError

RewardRow = dict[str, float]  # reward name (components, "total", "masked") -> value
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma, prompt ids) -> v


def exemplars_per_group(cfg: ExemplarConfig, iteration: int) -> int:
    """``E``, the exemplar slots of a group that holds exemplars at ``iteration``."""
    if cfg.schedule == "linear_decay":
        return int(round(cfg.per_group * max(0.0, 1.0 - iteration / cfg.decay_iterations)))
    return cfg.per_group


class ExemplarMixer:
    """The exemplars of one training run: their plan, data and rewards."""

    def __init__(self, cfg: ExemplarConfig, bank: ExemplarBank, *, seed: int, group_size: int, resolution: int,
                 prompts: Sequence[str], precomputed_rewards: dict[int, RewardRow] | None = None):
        self.cfg, self.bank = cfg, bank
        self.seed, self.group_size, self.resolution = seed, group_size, resolution
        self.prompts = list(prompts)
        self._rewards: dict[int, RewardRow] = dict(precomputed_rewards or {})  # by bank row; the image is fixed
        self._images: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()  # the bank and image caches are filled by the prefetch thread too
        self._prefetch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="portraitgen-prefetch")

    # ------------------------------------------------------------------ plan
    def per_group(self, iteration: int) -> int:
        return exemplars_per_group(self.cfg, iteration)

    def plan(self, iteration: int, prompt_ids: np.ndarray) -> np.ndarray:
        """``[prompts, group_size]``: the exemplar row of each slot, -1 for a generated sample. Drawn from
        its own stream ``(seed, iteration, 5)``, so plain GRPO's draws are untouched."""
        G = self.group_size
        rng = np.random.default_rng([self.seed, iteration, 5])
        E = self.per_group(iteration)
        rows = np.full((len(prompt_ids), G), -1, dtype=np.int64)
        with_exemplars = rng.random(len(prompt_ids)) < self.cfg.group_fraction
        for g, pid in enumerate(prompt_ids):
            candidates = self.bank.rows_by_caption.get(self.prompts[pid], np.array([], dtype=np.int64))
            if E == 0 or not with_exemplars[g] or len(candidates) == 0:
                continue
            rows[g, G - E:] = rng.choice(candidates, size=E, replace=len(candidates) < E)
        return rows

    # ------------------------------------------------------------------ data
    def data(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(latents [E, T+1, ...], trainable [E, T], images)`` of exemplar rows, on the host."""
        with self._lock:
            trajs = [self.bank.trajectory(int(r)) for r in rows]
            images = [self._image(int(r)) for r in rows]
        return torch.stack([t[0] for t in trajs]), torch.stack([t[1] for t in trajs]), images

    def prefetch(self, rows: np.ndarray) -> None:
        """Load these rows' data in the background (shards and images are read once and kept)."""
        if len(rows):
            self._prefetch_pool.submit(self.data, rows)

    def _image(self, row: int) -> torch.Tensor:
        """The real image an exemplar trajectory ends on (read once; it is what gets scored)."""
        if row not in self._images:
            self._images[row] = load_image(self.bank.index["image_file"].iloc[row], self.resolution)
        return self._images[row]

    def close(self) -> None:
        self._prefetch_pool.shutdown(wait=True)

    # ------------------------------------------------------------------ rewards
    def rewards(self, rows: Sequence[int], score: Callable[[list[int]], dict[str, np.ndarray]]) -> list[RewardRow]:
        """The rewards of exemplar ``rows``, one dict per row. Rows never scored before are scored together
        by ``score(positions)`` (positions into ``rows``) and remembered."""
        new = [k for k, r in enumerate(rows) if int(r) not in self._rewards]
        if new:
            scored = score(new)
            for j, k in enumerate(new):
                self._rewards[int(rows[k])] = {n: float(v[j]) for n, v in scored.items()}
        return [self._rewards[int(r)] for r in rows]


@torch.no_grad()
def transition_log_probs(velocity: Velocity, latents: torch.Tensor, prompt_ids: torch.Tensor,
                         steps: list[torch.Tensor], sigmas: torch.Tensor, sigma_max: float, *, step_type: str,
                         noise_level: float, batch_size: int) -> torch.Tensor:
    """Log-probs ``[E, T]`` of the transitions ``steps[e]`` of trajectories ``latents`` ``[E, T+1, ...]``
    under the current policy (0 elsewhere). (exemplar, step) pairs are batched across steps: each forward
    pass is a full batch of ``batch_size``, whatever the steps of each exemplar. ``sigmas`` is the schedule
    on the latents' device."""
    dev = latents.device
    out = torch.zeros(latents.shape[0], latents.shape[1] - 1, device=dev)
    rows = [r for r, st in enumerate(steps) for _ in range(len(st))]
    if not rows:
        return out
    r_all = to_device_async(torch.tensor(rows), dev)
    s_all = to_device_async(torch.cat([st.long() for st in steps]), dev)
    for lo in range(0, len(rows), batch_size):
        r, j = r_all[lo:lo + batch_size], s_all[lo:lo + batch_size]
        x, x_next = latents[r, j], latents[r, j + 1]
        sig, sig_next = sigmas[j], sigmas[j + 1]
        v = velocity(x, sig, prompt_ids[r])
        step = stochastic_step(x, v, sig, sig_next, step_type, noise_level, sigma_max, prev_sample=x_next)
        out[r, j] = step.log_prob
    return out


def precomputed_rewards(path: str, bank: ExemplarBank, params: Params, names: Sequence[str]) -> dict[int, RewardRow]:
    """The exemplar rewards the precompute stage wrote (``train.exemplars.rewards``), by bank row, checked
    against the reward config of this run. ``names``: the reward components and ``total``."""
    if not Path(path).is_file():
        raise TrainingSetupError(f"train.exemplars.rewards: {path} not found (run `portraitgen precompute`)")
    try:  # verified before it is parsed: a damaged table is named as such, with the way to re-make it
        verify_file(path, rerun("precompute", "portraitgen precompute --params params.yaml --out results/precompute"),
                    what="train.exemplars.rewards:")
    except IntegrityError as exc:
        raise TrainingSetupError(str(exc)) from None
    table = pd.read_parquet(path)
    if (table["reward_config"] != reward_config_hash(params)).any():
        raise TrainingSetupError(f"train.exemplars.rewards: {path} was scored with another reward config; "
                                 f"re-run `portraitgen precompute`")
    by_hash = table.drop_duplicates("content_hash").set_index("content_hash")
    out = {}
    for row, h in enumerate(bank.index["content_hash"]):
        if h in by_hash.index:
            rec = by_hash.loc[h]
            values = {n: float(rec[n]) for n in names}
            masked = float(rec["masked"]) if "masked" in rec.index and pd.notna(rec["masked"]) else 0.0
            bad = [n for n, v in values.items() if not math.isfinite(v)]
            if bad and not masked:  # precompute writes finite scores (or masks them): the file is damaged
                raise TrainingSetupError(
                    f"train.exemplars.rewards: {path}: exemplar {bank.exemplar_id(row)!r} has a non-finite "
                    f"{bad[0]!r} reward ({values[bad[0]]}); re-run `portraitgen precompute` (under Snakemake: "
                    f"snakemake --forcerun precompute)")
            out[row] = values | {"masked": masked}
    return out

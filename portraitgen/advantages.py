"""Group-relative advantages (docs/design.md §3).

Each prompt is sampled ``group_size`` times; a sample's advantage is its reward standardised within its
group (or by the std of the whole batch with ``global_std``), clamped to +-``clip``. A group whose rewards
are all equal carries no learning signal: with ``filter_zero_std`` its samples are excluded from the
update (mask False) and the fraction of such groups is reported.

A sample whose reward is invalid (``valid`` False: a reward masked it, see ``reward.on_invalid: mask``)
never steers training: it is left out of its group's mean and std (and of the batch std), gets
advantage 0 and mask False. Its reward may be anything, NaN included.

The statistics are always computed over *whole groups*: the trainer gathers every process's rewards
before calling this, so the result is the same for any number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STD_EPS = 1e-4  # added to the std, as in Flow-GRPO; also the threshold below which a group is "zero-std"
ZERO_STD = 1e-6


@dataclass
class Advantages:
    advantages: np.ndarray  # [N] float32, clamped
    mask: np.ndarray  # [N] bool: samples that take part in the update
    group_mean: np.ndarray  # [N] the mean of each sample's group
    group_std: np.ndarray  # [N] the std of each sample's group
    zero_std_fraction: float  # fraction of groups whose rewards are all equal
    clipped_fraction: float  # fraction of samples whose advantage hit the clamp


def group_advantages(rewards: np.ndarray, group_ids: np.ndarray, *, global_std: bool = False, clip: float = 5.0,
                     filter_zero_std: bool = True, is_exemplar: np.ndarray | None = None,
                     exemplars_in_stats: bool = True, exemplar_cap: float | None = None,
                     valid: np.ndarray | None = None) -> Advantages:
    """Advantages of ``rewards`` standardised within the groups ``group_ids``.

    Exemplars (``is_exemplar``) are members of their group like generated samples; with
    ``exemplars_in_stats=False`` the group's mean and std come from its generated samples only (the
    exemplar is then measured against what the policy currently produces), and ``exemplar_cap`` caps
    their advantage from above so a real image far better than every sample cannot dominate the update.
    ``valid`` (default: all) marks the samples whose reward may be used; the others are excluded from
    the statistics and the update.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape} and group ids {group_ids.shape} must be equal 1-D shapes")
    valid = np.ones(rewards.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if valid.shape != rewards.shape:
        raise ValueError(f"valid {valid.shape} and rewards {rewards.shape} must be equal shapes")
    if not np.isfinite(rewards[valid]).all():
        raise ValueError(f"{int((~np.isfinite(rewards[valid])).sum())} non-finite rewards not marked invalid; "
                         f"refusing to compute advantages")
    rewards = np.where(valid, rewards, 0.0)  # invalid entries take part in no statistic below
    is_exemplar = np.zeros(rewards.shape, dtype=bool) if is_exemplar is None else np.asarray(is_exemplar, bool)
    in_stats = (np.ones_like(is_exemplar) if exemplars_in_stats else ~is_exemplar) & valid
    mean = np.zeros_like(rewards)
    std = np.zeros_like(rewards)
    uniq = np.unique(group_ids)
    zero_groups = 0
    for g in uniq:
        m = group_ids == g
        ref = rewards[m & in_stats]
        # A group without a valid reference reward has no signal: mean 0, std 0 (filtered as zero-std).
        mean[m] = ref.mean() if len(ref) else 0.0
        std[m] = ref.std() if len(ref) else 0.0
        zero_groups += bool(std[m][0] < ZERO_STD)
    denom = ((rewards[in_stats].std() if in_stats.any() else 0.0) if global_std else std) + STD_EPS
    adv = (rewards - mean) / denom
    clipped = np.abs(adv) > clip
    adv = np.clip(adv, -clip, clip)
    if exemplar_cap is not None:
        adv = np.where(is_exemplar, np.minimum(adv, exemplar_cap), adv)
    mask = valid.copy()
    if filter_zero_std:
        mask &= std >= ZERO_STD
    adv = np.where(mask, adv, 0.0)
    return Advantages(advantages=adv.astype(np.float32), mask=mask, group_mean=mean, group_std=std,
                      zero_std_fraction=zero_groups / max(len(uniq), 1),
                      clipped_fraction=float((clipped & valid).mean()))

"""What training logs (portraitgen/train_metrics.py), against values computed by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from portraitgen.advantages import group_advantages
from portraitgen.train_metrics import DeviceStats, advantage_stats, phase_times, sample_rows, summarize


def test_device_stats_average_per_step_values_and_weighted_notes():
    stats = DeviceStats()
    for v in (1.0, 2.0, 4.0):
        stats.add("loss", torch.tensor(v), scale=2.0)
    stats.note("exemplar/ratio_mean", torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0]))  # step mean 1
    stats.note("exemplar/ratio_mean", torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]))  # step mean 3
    stats.note("exemplar/ratio_mean", torch.tensor([9.0, 9.0]), torch.tensor([0.0, 0.0]))  # no weight: left out
    stats.note("generated/ratio_mean", torch.tensor([5.0]), torch.tensor([0.0]))  # never weighted: not logged
    out = stats.train_phase_stats(lr=1e-4)
    assert out == {"train/loss": pytest.approx(2 * 7 / 3), "exemplar/ratio_mean": pytest.approx(2.0),
                   "train/lr": 1e-4}


def test_advantage_stats_and_rows_by_hand():
    rewards = np.array([1.0, 3.0, 2.0, 2.0, 0.0, 5.0])
    groups = np.array([0, 0, 0, 1, 1, 1])
    masked = np.array([False, False, False, False, False, True])
    is_ex = np.array([False, False, True, False, False, False])
    adv = group_advantages(rewards, groups, valid=~masked)
    comps = {"brightness": rewards / 10}
    stats = advantage_stats(rewards, adv, masked, comps, is_ex, exemplars_per_group=1)
    assert stats["reward/mean"] == pytest.approx(8 / 5) and stats["reward/masked"] == pytest.approx(1 / 6)
    assert stats["exemplar/count"] == 1 and stats["exemplar/per_group"] == 1
    assert stats["exemplar/reward_mean"] == 2.0 and stats["generated/reward_mean"] == pytest.approx(11 / 5)
    assert stats["reward/brightness"] == pytest.approx(rewards.mean() / 10)
    assert "exemplar/count" not in advantage_stats(rewards, adv, masked, comps, None, None)
    rows = sample_rows(groups, ["p"] * 6, rewards, comps, adv, masked, [None, None, "ex7", None, None, None])
    assert rows[2] == {"sample_index": 2, "group": 0, "prompt": "p", "reward": 2.0, "reward_brightness": 0.2,
                       "advantage": float(adv.advantages[2]), "trained": bool(adv.mask[2]), "masked": False,
                       "exemplar": "ex7"}
    assert rows[5]["masked"] and not rows[5]["trained"] and rows[5]["advantage"] == 0.0


def test_phase_times_and_the_summary():
    t = phase_times({"data": 1.0, "rollout": 2.0, "exemplar_logp": 0.5, "reward": 1.5, "train_fwd_bwd": 3.0,
                     "optimizer": 0.25, "iteration": 99.0})
    assert (t["time/sample"], t["time/score"], t["time/train"], t["time/iteration"]) == (3.5, 1.5, 3.25, 8.25)
    assert "time/iteration" in t and t["time/data"] == 1.0
    history = [{"reward/mean": float(i), "time/iteration": 1.0 + i, "train/kl": 0.1 * i} for i in range(8)]
    s = summarize(history)
    assert (s["reward_first"], s["reward_last"], s["reward_gain"]) == (2.0, 5.0, 3.0)  # first / last 5
    assert s["kl"] == pytest.approx(0.7) and s["seconds_per_iteration"] == 4.5 and s["iterations"] == 8
    assert summarize([]) == {"iterations": 0}

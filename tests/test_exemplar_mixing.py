"""Exemplar mixing (portraitgen/exemplar_mixing.py) on its own: the plan of exemplar slots, the schedule of
E, and rewards scored once per exemplar. (Trajectories and log-probs are checked through the trainer in
test_exemplar_training.py and test_performance_options.py.)"""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from portraitgen.config import ExemplarConfig
from portraitgen.exemplar_mixing import ExemplarMixer, exemplars_per_group

PROMPTS = ["a woman", "an old man", "a child"]  # "a child" has no exemplar
BANK = SimpleNamespace(rows_by_caption={"a woman": np.array([0, 1, 2]), "an old man": np.array([3])})


def _mixer(seed=0, **cfg):
    return ExemplarMixer(replace(ExemplarConfig(), **{"per_group": 2, **cfg}), BANK, seed=seed, group_size=4,
                         resolution=16, prompts=PROMPTS)


def test_the_schedule_of_exemplars_per_group():
    assert [exemplars_per_group(ExemplarConfig(per_group=2), i) for i in (0, 5, 100)] == [2, 2, 2]
    decay = ExemplarConfig(per_group=4, schedule="linear_decay", decay_iterations=8)
    assert [exemplars_per_group(decay, i) for i in (0, 2, 4, 6, 8, 20)] == [4, 3, 2, 1, 0, 0]


def test_exemplars_take_the_last_slots_of_groups_with_their_caption():
    mixer = _mixer()
    prompt_ids = np.array([0, 1, 2, 0])
    rows = mixer.plan(3, prompt_ids)
    assert rows.shape == (4, 4) and (rows[:, :2] == -1).all()  # the first G - E slots are generated
    assert set(rows[0, 2:]) <= {0, 1, 2} and set(rows[3, 2:]) <= {0, 1, 2}
    assert (rows[1, 2:] == 3).all()  # one candidate, drawn twice
    assert (rows[2] == -1).all()  # no exemplar for this caption: a plain group
    np.testing.assert_array_equal(rows, _mixer().plan(3, prompt_ids))  # a function of (seed, iteration)
    draws = [tuple(_mixer(seed=s).plan(3, prompt_ids)[0, 2:]) for s in range(20)]
    assert len(set(draws)) > 1  # ... that the seed changes
    assert (_mixer(group_fraction=0.0).plan(3, prompt_ids) == -1).all()
    assert (_mixer(schedule="linear_decay", decay_iterations=2).plan(3, prompt_ids) == -1).all()  # E = 0


def test_an_exemplar_is_scored_once_and_its_rewards_reused():
    mixer = _mixer()
    calls = []

    def score(positions):
        calls.append(list(positions))
        return {"total": np.array([10.0 + p for p in positions]), "brightness": np.array([0.5] * len(positions))}

    first = mixer.rewards(np.array([3, 1, 3]), score)
    assert calls == [[0, 1, 2]] and [r["total"] for r in first] == [12.0, 11.0, 12.0]  # the last score of row 3
    again = mixer.rewards(np.array([1, 3, 0]), score)
    assert calls == [[0, 1, 2], [2]]  # only row 0 is new
    assert [r["total"] for r in again] == [11.0, 12.0, 12.0] and again[0]["brightness"] == 0.5
    known = ExemplarMixer(ExemplarConfig(per_group=1), BANK, seed=0, group_size=4, resolution=16, prompts=PROMPTS,
                          precomputed_rewards={5: {"total": 1.0, "masked": 0.0}})
    assert known.rewards(np.array([5]), score) == [{"total": 1.0, "masked": 0.0}] and len(calls) == 2

"""Exemplar-driven groups: real trajectories inside GRPO groups (docs/design.md §4)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from portraitgen.advantages import group_advantages
from portraitgen.config import ConfigError, params_from_dict
from portraitgen.invert import run_invert
from portraitgen.training import GRPOTrainer

from helpers import fast_params, make_manifest

CAPTIONS = ["a portrait photo of a smiling woman", "a portrait photo of a smiling woman",
            "a headshot of an old man", "a headshot of an old man"]


@pytest.fixture(scope="module")
def exemplar_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("exemplars")
    manifest = make_manifest(root / "curate", n=4, size=32, captions=CAPTIONS)
    p = params_from_dict(fast_params(**{"invert.manifest": str(manifest), "invert.diagnostic_samples": 2}))
    run_invert(p, root / "invert")
    return root / "invert" / "index.parquet"


def _params(index, **overrides):
    return params_from_dict(fast_params(**{"prompts.source": "exemplars", "train.exemplars.index": str(index),
                                           "train.iterations": 2, **overrides}))


def test_exemplars_join_their_caption_groups_and_carry_signal(exemplar_index, tmp_path):
    trainer = GRPOTrainer(_params(exemplar_index, **{"train.exemplars.per_group": 1}), tmp_path / "out")
    assert trainer.prompts == sorted(set(CAPTIONS))
    plan = trainer.plan(0)
    assert (plan.exemplar_rows[:, -1] >= 0).all() and (plan.exemplar_rows[:, :-1] == -1).all()
    for g, pid in enumerate(plan.prompt_ids):  # each group's exemplar has the group's caption
        assert trainer.bank.index["caption"][plan.exemplar_rows[g, -1]] == trainer.prompts[pid]
    batch = trainer.sample(0, plan)
    ex = np.flatnonzero(batch.exemplar_rows >= 0)
    row = int(batch.exemplar_rows[ex[0]])
    latents, trainable = trainer.bank.trajectory(row)
    assert torch.equal(batch.latents[ex[0]], latents) and not batch.trainable[ex[0], -1]  # bridge: last step fixed
    trainer.run()
    first = trainer.history[0]
    assert first["exemplar/count"] == 2 and first["exemplar/per_group"] == 1
    assert first["exemplar/advantage_abs_mean"] > 0
    assert first["exemplar/velocity_grad_norm"] > 0 and first["generated/velocity_grad_norm"] > 0
    assert first["exemplar/ratio_mean"] == pytest.approx(1.0, abs=0.05)  # logp_old from the rollout policy
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    ex_rows = [r for r in rows if r["exemplar"]]
    assert len(ex_rows) == 4 and all(r["sample_index"] % 4 == 3 for r in ex_rows)
    # The exemplar's reward is computed once: the same exemplar scores the same in every iteration.
    by_ex = {}
    for r in ex_rows:
        by_ex.setdefault(r["exemplar"], set()).add(round(r["reward"], 6))
    assert all(len(v) == 1 for v in by_ex.values())


def test_e_zero_is_plain_grpo_exactly(exemplar_index, tmp_path):
    plain = GRPOTrainer(_params(exemplar_index), tmp_path / "plain")
    plain.run()
    # Exemplar machinery on (index loaded, groups planned) but no group receives one.
    off = GRPOTrainer(_params(exemplar_index, **{"train.exemplars.per_group": 2, "train.exemplars.group_fraction": 0.0}),
                      tmp_path / "off")
    off.run()
    for a, b in zip(plain.history, off.history):
        for k, v in a.items():
            if not k.startswith("time/"):
                assert b[k] == v, k
        assert b["exemplar/count"] == 0
    wa = load_file(str(tmp_path / "plain" / "final" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(tmp_path / "off" / "final" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_linear_decay_schedule(exemplar_index, tmp_path):
    trainer = GRPOTrainer(_params(exemplar_index, **{"train.exemplars.per_group": 2,
                                                     "train.exemplars.schedule": "linear_decay",
                                                     "train.exemplars.decay_iterations": 4}), tmp_path / "o")
    assert [trainer.exemplars_per_group(i) for i in range(6)] == [2, 2, 1, 0, 0, 0]  # round(2 * (1 - i/4))


def test_exemplar_switches_in_the_advantages():
    r = np.array([0.0, 1.0, 2.0, 10.0])
    g = np.zeros(4, dtype=int)
    ex = np.array([False, False, False, True])
    inside = group_advantages(r, g, is_exemplar=ex, clip=100)
    outside = group_advantages(r, g, is_exemplar=ex, exemplars_in_stats=False, clip=100)
    assert inside.group_mean[0] == pytest.approx(3.25) and outside.group_mean[0] == pytest.approx(1.0)
    assert outside.advantages[3] == pytest.approx((10 - 1) / (np.std([0, 1, 2]) + 1e-4), rel=1e-4)
    capped = group_advantages(r, g, is_exemplar=ex, exemplars_in_stats=False, clip=100, exemplar_cap=2.0)
    assert capped.advantages[3] == pytest.approx(2.0) and capped.advantages[0] == outside.advantages[0]


def test_exemplars_need_exemplar_captions():
    with pytest.raises(ConfigError, match="'prompts.source'.*expected 'exemplars'"):
        params_from_dict(fast_params(**{"train.exemplars.per_group": 1}))
    with pytest.raises(ConfigError, match="'train.exemplars.per_group'"):
        params_from_dict(fast_params(**{"prompts.source": "exemplars", "train.exemplars.per_group": 4}))

"""Invalid rewards never steer training (issue 15, item 4): a masked sample gets advantage 0 and is
left out of its group's statistics; non-finite pixels are invalid for every reward, checked before any
reward sees the image; ``reward/masked`` is logged with and without exemplars."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from portraitgen.advantages import STD_EPS, group_advantages
from portraitgen.config import params_from_dict
from portraitgen.integrity import write_checksum
from portraitgen.rewards import RewardError, RewardSet, register_reward
from portraitgen.rewards.simple import to_uint8_hwc
from portraitgen.training import GRPOTrainer, TrainingSetupError

from helpers import fast_params


@register_reward("test_faults_nan_on_odd")
def _nan_on_odd():
    """Brightness, NaN for odd sample indices (an image the reward cannot score)."""

    def score(images, prompts, meta):
        out = images.float().mean(dim=(1, 2, 3)).numpy().astype(np.float64)
        odd = np.array([m.get("sample_index", 0) % 2 == 1 for m in meta])
        return np.where(odd, np.nan, out)

    return score


SEEN: list[torch.Tensor] = []


@register_reward("test_faults_recording")
def _recording():
    def score(images, prompts, meta):
        SEEN.append(images.clone())
        return images.float().mean(dim=(1, 2, 3)).numpy()

    return score


def test_masked_samples_get_zero_advantage_and_leave_the_group_statistics():
    r = np.array([1.0, 2.0, 3.0, 100.0, 5.0, 5.0, 7.0, np.nan])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    valid = np.array([True, True, True, False, True, True, True, False])
    adv = group_advantages(r, g, clip=100.0, valid=valid)
    # Group 0 is standardised over 1, 2, 3 only: the masked 100 moves neither its mean nor its std.
    np.testing.assert_allclose(adv.advantages[:3], (np.array([1, 2, 3]) - 2) / (np.std([1, 2, 3]) + STD_EPS),
                               rtol=1e-5)
    assert adv.group_mean[0] == pytest.approx(2.0) and adv.group_std[4] == pytest.approx(np.std([5, 5, 7]))
    assert adv.advantages[3] == 0 and adv.advantages[7] == 0
    assert adv.mask.tolist() == [True, True, True, False, True, True, True, False]
    # Without zero-std filtering a masked sample is still out of the update.
    assert not group_advantages(r, g, filter_zero_std=False, valid=valid).mask[[3, 7]].any()
    # A group with no valid sample carries no signal.
    none = group_advantages(np.array([np.nan, np.nan, 1.0, 2.0]), np.array([0, 0, 1, 1]),
                            valid=np.array([False, False, True, True]))
    assert none.mask.tolist() == [False, False, True, True] and none.zero_std_fraction == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-finite rewards not marked invalid"):
        group_advantages(r, g)


def test_non_finite_pixels_are_invalid_for_every_reward_before_any_reward_sees_them():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[1, 0, 3, 3] = float("nan")
    SEEN.clear()
    with pytest.raises(RewardError, match=r"images \[1\] have non-finite pixels"):
        RewardSet({"test_faults_recording": 1.0, "jpeg_compressibility": 1.0})(images, ["p"] * 3)
    assert not SEEN  # refused before any reward ran
    rs = RewardSet({"test_faults_recording": 1.0, "jpeg_compressibility": 1.0}, on_invalid="mask")
    out = rs(images, ["p"] * 3)
    assert len(SEEN) == 1 and SEEN[0].shape[0] == 2 and torch.isfinite(SEEN[0]).all()
    np.testing.assert_array_equal(out["masked"], [0, 1, 0])
    assert rs.invalid_counts == {"test_faults_recording": 1, "jpeg_compressibility": 1}
    assert np.isfinite(out["total"]).all()
    # Converting a NaN image to 8 bits (what every classic reward does) is an error, not a black image.
    with pytest.raises(ValueError, match=r"images \[1\] have non-finite pixels"):
        to_uint8_hwc(images)


def _plain_params(**overrides):
    return params_from_dict(fast_params(**{"reward.components": {"test_faults_nan_on_odd": 1.0},
                                           "reward.on_invalid": "mask", "train.iterations": 1, **overrides}))


def _check_masked(stats, trainer, batch):
    odd = batch.sample_index % 2 == 1
    assert stats["reward/masked"] == pytest.approx(odd.mean())
    assert (batch.advantages[odd] == 0).all() and not batch.mask[odd].any()
    rows = batch.log_rows  # every sample's samples.jsonl row
    assert all(r["masked"] == (r["sample_index"] % 2 == 1) for r in rows)
    assert all(not r["trained"] for r in rows if r["masked"])
    return odd


def test_trainer_never_trains_on_a_masked_sample(tmp_path):
    trainer = GRPOTrainer(_plain_params(), tmp_path / "out")
    plan = trainer.plan(0)
    batch = trainer.sample(0, plan)
    trainer.score(batch)
    stats = trainer.compute_advantages(batch)
    odd = _check_masked(stats, trainer, batch)
    # The advantages of the valid samples are standardised among the valid samples of their group only.
    total = batch.rewards["total"].astype(np.float64)
    for g in np.unique(batch.group):
        sel = (batch.group == g) & ~odd
        z = (total[sel] - total[sel].mean()) / (total[sel].std() + STD_EPS)
        np.testing.assert_allclose(batch.advantages[sel], np.clip(z, -5, 5), rtol=1e-4, atol=1e-5)
    assert stats["reward/mean"] == pytest.approx(total[~odd].mean(), rel=1e-6)


def _exemplar_params(index, **overrides):
    return _plain_params(**{"prompts.source": "exemplars", "train.exemplars.index": str(index),
                            "train.exemplars.per_group": 1, **overrides})


def test_masked_rewards_are_logged_and_excluded_with_exemplars(exemplar_index, tmp_path):
    trainer = GRPOTrainer(_exemplar_params(exemplar_index), tmp_path / "out")
    batch = trainer.sample(0, trainer.plan(0))
    trainer.score(batch)
    assert "masked" in batch.rewards
    stats = trainer.compute_advantages(batch)
    _check_masked(stats, trainer, batch)  # exemplars sit in the last (odd) slot: they are masked too


def test_a_non_finite_precomputed_exemplar_reward_names_the_file_and_the_exemplar(exemplar_index, tmp_path):
    from portraitgen.precompute import reward_config_hash

    params = _exemplar_params(exemplar_index, **{"reward.components": {"brightness": 1.0},
                                                 "reward.on_invalid": "error"})
    index = pd.read_parquet(exemplar_index)
    table = pd.DataFrame({"id": index["id"], "content_hash": index["content_hash"], "caption": index["caption"],
                          "reward_config": reward_config_hash(params), "brightness": 0.5, "total": 0.5})
    table.loc[2, "brightness"] = math.nan
    path = tmp_path / "exemplar_rewards.parquet"
    table.to_parquet(path, index=False)
    write_checksum(path)  # a table as precompute writes it, but for the NaN
    params = _exemplar_params(exemplar_index, **{"reward.components": {"brightness": 1.0},
                                                 "reward.on_invalid": "error", "train.exemplars.rewards": str(path)})
    with pytest.raises(TrainingSetupError, match=rf"{path}: exemplar '{index['id'][2]}' has a non-finite "
                                                 r"'brightness' reward .*--forcerun precompute"):
        GRPOTrainer(params, tmp_path / "out")


def test_a_nan_image_is_never_saved_as_black():
    from portraitgen.images import image_grid, to_pil

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite pixel values"):
        to_pil(images[1])
    grid = np.asarray(image_grid(images, ncol=2, pad=0))
    assert (grid[2, 8 + 2] == [255, 0, 255]).all()  # the NaN pixel is magenta, not black
    assert np.array_equal(grid[:, :8], np.asarray(to_pil(images[0])))

"""Group advantages and the reward registry."""
import numpy as np
import pytest
import torch

from portraitgen.advantages import STD_EPS, group_advantages
from portraitgen.rewards import RewardError, RewardSet, available_rewards, build_reward, register_reward


def test_advantages_are_standardised_within_groups():
    r = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    g = np.array([0, 0, 0, 1, 1, 1])
    adv = group_advantages(r, g, clip=5.0)
    z = (np.array([1, 2, 3]) - 2) / (np.std([1, 2, 3]) + STD_EPS)
    np.testing.assert_allclose(adv.advantages[:3], z, rtol=1e-5)
    # Group 1 is group 0 scaled by 10: the normalisation removes the scale (up to eps).
    np.testing.assert_allclose(adv.advantages[3:], adv.advantages[:3], rtol=1e-3)
    assert adv.mask.all() and adv.zero_std_fraction == 0.0


def test_global_std_uses_the_whole_batch():
    r = np.array([1.0, 3.0, 10.0, 30.0])
    g = np.array([0, 0, 1, 1])
    adv = group_advantages(r, g, global_std=True, clip=100.0)
    np.testing.assert_allclose(adv.advantages, (r - np.array([2, 2, 20, 20])) / (r.std() + STD_EPS), rtol=1e-5)


def test_zero_std_groups_are_filtered_and_counted():
    r = np.array([0.5, 0.5, 0.5, 0.1, 0.9, 0.4])
    g = np.array([0, 0, 0, 1, 1, 1])
    adv = group_advantages(r, g, filter_zero_std=True)
    assert adv.zero_std_fraction == pytest.approx(0.5)
    assert adv.mask.tolist() == [False] * 3 + [True] * 3
    assert np.all(adv.advantages[:3] == 0)
    kept = group_advantages(r, g, filter_zero_std=False)
    assert kept.mask.all()


def test_advantages_are_clamped():
    r = np.array([0.0] * 99 + [1.0])
    adv = group_advantages(r, np.zeros(100, dtype=int), clip=5.0)
    assert adv.advantages.max() == pytest.approx(5.0) and adv.clipped_fraction == pytest.approx(0.01)


def test_non_finite_rewards_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(np.array([1.0, np.nan]), np.array([0, 0]))


def test_simple_rewards_rank_images_as_expected():
    dark, bright = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.8)
    noisy = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images = torch.cat([dark, bright, noisy])
    rs = RewardSet({"brightness": 1.0, "jpeg_compressibility": 0.5})
    out = rs(images, ["p"] * 3)
    np.testing.assert_allclose(out["brightness"][:2], [0.2, 0.8], atol=1e-6)
    assert out["jpeg_compressibility"][0] > out["jpeg_compressibility"][2]  # flat compresses better than noise
    np.testing.assert_allclose(out["total"], out["brightness"] + 0.5 * out["jpeg_compressibility"], rtol=1e-5)
    assert {"brightness", "jpeg_compressibility"} <= set(available_rewards())


def test_reward_errors_name_the_reward():
    with pytest.raises(RewardError, match="unknown reward 'hps'"):
        build_reward("hps")

    @register_reward("test_nan_reward")
    def _nan():
        return lambda images, prompts, meta: np.full(images.shape[0], np.nan)

    with pytest.raises(RewardError, match="'test_nan_reward' produced non-finite scores for images \\[0, 1\\]"):
        RewardSet({"test_nan_reward": 1.0})(torch.zeros(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(RewardError, match=r"images \[B, 3, H, W\]"):
        RewardSet({"brightness": 1.0})(torch.zeros(2, 8, 8), ["a", "b"])

"""The GRPO loss (portraitgen/grpo_loss.py) against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from portraitgen.grpo_loss import approx_kl, clipped, clipped_surrogate, gaussian_kl, transition_loss

# Three samples, clip range 0.2: inside the range, a negative advantage below it, a positive one above it.
LOGP = torch.tensor([0.1, -0.5, 0.5], dtype=torch.float64)
OLD = torch.zeros(3, dtype=torch.float64)
ADV = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
CLIP = 0.2


def test_clipped_surrogate_by_hand():
    policy, ratio = clipped_surrogate(LOGP, OLD, ADV, CLIP)
    r = [math.exp(0.1), math.exp(-0.5), math.exp(0.5)]  # 1.1052, 0.6065, 1.6487
    torch.testing.assert_close(ratio, torch.tensor(r, dtype=torch.float64))
    # 0: unclipped, -A r. 1: A < 0 and r below 1 - eps: the pessimistic max takes -A (1 - eps) = 1.6 > 1.2131.
    # 2: A > 0 and r above 1 + eps: -A (1 + eps) = -0.6 > -0.8244.
    torch.testing.assert_close(policy, torch.tensor([-r[0], 1.6, -0.6], dtype=torch.float64))
    torch.testing.assert_close(clipped(ratio, CLIP), torch.tensor([0.0, 1.0, 1.0]))  # float32, as logged


def test_the_gradient_flows_only_through_unclipped_samples():
    logp = LOGP.clone().requires_grad_(True)
    policy, _ = clipped_surrogate(logp, OLD, ADV, CLIP)
    policy.sum().backward()
    # d(-A r)/d logp = -A r for sample 0; the clipped branches are constant in logp.
    torch.testing.assert_close(logp.grad, torch.tensor([-math.exp(0.1), 0.0, 0.0], dtype=torch.float64))


def test_gaussian_kl_by_hand():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    # mean squared difference over the latent dims / (2 std^2) with std 0.5: [2.5, 0, 2] / 0.5
    torch.testing.assert_close(gaussian_kl(mean, ref, 0.5), torch.tensor([5.0, 0.0, 4.0]))
    # Latents of any rank: averaged over every dimension but the batch.
    torch.testing.assert_close(gaussian_kl(mean.reshape(3, 1, 2, 1), ref.reshape(3, 1, 2, 1), 0.5),
                               torch.tensor([5.0, 0.0, 4.0]))


def test_transition_loss_adds_the_weighted_kl():
    kl = torch.tensor([5.0, 0.0, 4.0], dtype=torch.float64)
    out = transition_loss(LOGP, OLD, ADV, clip_range=CLIP, kl=kl, kl_beta=0.1)
    torch.testing.assert_close(out.per_sample, torch.tensor([-math.exp(0.1) + 0.5, 1.6, -0.6 + 0.4],
                                                            dtype=torch.float64))
    torch.testing.assert_close(out.kl, kl)
    plain = transition_loss(LOGP, OLD, ADV, clip_range=CLIP)
    torch.testing.assert_close(plain.per_sample, plain.policy)
    assert (plain.kl == 0).all() and plain.kl.shape == (3,)
    with pytest.raises(ValueError, match="needs the KL"):
        transition_loss(LOGP, OLD, ADV, clip_range=CLIP, kl_beta=0.1)


def test_approx_kl_by_hand():
    torch.testing.assert_close(approx_kl(LOGP, OLD), torch.tensor([0.005, 0.125, 0.125], dtype=torch.float64))

"""Inversion modes and their diagnostics (docs/design.md §4)."""
import math

import pytest
import torch

from portraitgen.inversion import invert, psnr, regenerate, ssim, transition_stats
from portraitgen.sampling import rollout


class OraclePolicy:
    """A 'policy' whose velocity knows x0: v = (x - x0) / sigma, so its x0-prediction is exact."""

    def __init__(self, x0):
        self.x0 = x0

    def predict_velocity(self, x, sigma, cond, uncond=None, guidance_scale=1.0, module=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.ndim:
            sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return (x - self.x0) / sigma


@pytest.fixture(scope="module")
def ode_case(sd3_policy):
    policy = sd3_policy
    cond = policy.encode_prompts(["a portrait photo of a smiling woman", "a headshot of an old man"])
    sigmas = policy.sigmas(8, 32, 32)
    start = torch.randn(2, *policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    traj = rollout(policy, cond, start, sigmas, step_type="sde", noise_level=0.0,
                   stochastic=torch.zeros(8, dtype=torch.bool))
    return policy, cond, sigmas, start, traj


def test_fixed_point_recovers_the_start_of_an_ode_trajectory_and_euler_is_worse(ode_case):
    policy, cond, sigmas, start, traj = ode_case
    x0 = traj.final
    fp = invert(policy, x0, cond, sigmas, mode="fixed_point", step_type="sde", noise_level=0.7, fixed_point_iters=20)
    eu = invert(policy, x0, cond, sigmas, mode="euler", step_type="sde", noise_level=0.7)
    err_fp = (fp.latents[:, 0] - start).abs().max().item()
    err_eu = (eu.latents[:, 0] - start).abs().max().item()
    assert err_fp < 1e-3, err_fp
    assert err_eu > 10 * err_fp, (err_eu, err_fp)
    torch.testing.assert_close(fp.latents, traj.latents, atol=1e-3, rtol=0)  # every state, not just the start
    # Regenerating from the recovered start gives back the image.
    regen = regenerate(policy, fp.latents[:, 0], cond, sigmas)
    assert psnr(policy.decode(regen), policy.decode(x0)).min() > 50
    assert ssim(policy.decode(regen), policy.decode(x0)).min() > 0.999


@pytest.mark.parametrize("step_type", ["sde", "cps"])
def test_bridge_ends_at_x0_and_has_unit_residuals_under_an_oracle(step_type):
    x0 = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = torch.linspace(1, 0, 11)
    oracle = OraclePolicy(x0)
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    inv = invert(oracle, x0, {}, sigmas, mode="bridge", step_type=step_type, noise_level=0.7, generators=gens)
    assert torch.equal(inv.latents[:, -1], x0)
    assert not inv.trainable[:, -1].any() and inv.trainable[:, :-1].all()
    stats = transition_stats(oracle, inv.latents, {}, sigmas, step_type=step_type, noise_level=0.7,
                             trainable=inv.trainable)
    ms = stats.residual_ms[:, :-1]
    # Each entry averages 256 squared N(0,1) draws: sampling error of the grand mean over 64x9 entries
    # is sqrt(2/256)/sqrt(576) ~ 0.004.
    assert ms.mean().item() == pytest.approx(1.0, abs=0.02)
    assert ms.mean(dim=0).sub(1).abs().max().item() < 0.1  # at every step, not just on average
    assert torch.all(stats.log_probs[:, -1] == 0)


def test_deterministic_inversions_have_residuals_far_below_the_noise(ode_case):
    """The known caveat of docs/design.md §4: measured, not hidden."""
    policy, cond, sigmas, start, traj = ode_case
    fp = invert(policy, traj.final, cond, sigmas, mode="fixed_point", step_type="sde", noise_level=0.7)
    stats = transition_stats(policy, fp.latents, cond, sigmas, step_type="sde", noise_level=0.7)
    assert stats.residual_ms[:, :-1].mean().item() < 0.2


def test_psnr_and_ssim_values():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(a, a)).logical_not().all() and psnr(a, a).min() > 100
    b = (a + 0.1).clamp(0, 1)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(psnr(a, b), 10 * torch.log10(1 / mse))
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    assert ssim(a, torch.rand(2, 3, 16, 16)).max() < 0.5
    assert math.isclose(float(ssim(a, b).mean()), float(ssim(b, a).mean()), rel_tol=1e-6)

"""The stochastic step's log-density and the ODE sampler, checked against independent computations."""
import math

import numpy as np
import pytest
import torch

from portraitgen.sampling import gaussian_log_prob, ode_step, rollout, step_std, stochastic_step


def _reference_sde(x, v, sig, sig_n, a, sig_max):
    """docs/design.md §2 'sde' written out in float64 numpy, independently of the package."""
    dt = sig_n - sig
    s = a * math.sqrt(sig / (1 - (sig_max if sig == 1 else sig)))
    mu = x * (1 + s**2 * dt / (2 * sig)) + v * (1 + s**2 * (1 - sig) / (2 * sig)) * dt
    return mu, s * math.sqrt(-dt)


def _reference_cps(x, v, sig, sig_n, a):
    s = sig_n * math.sin(a * math.pi / 2)
    x0, x1 = x - sig * v, x + (1 - sig) * v
    return (1 - sig_n) * x0 + math.sqrt(sig_n**2 - s**2) * x1, s


def _normal_logpdf_mean(xp, mu, std):
    return float(np.mean(-((xp - mu) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)))


@pytest.mark.parametrize("step_type", ["sde", "cps"])
@pytest.mark.parametrize("sig,sig_n", [(1.0, 0.9), (0.7, 0.55), (0.2, 0.05)])
def test_step_log_prob_matches_independent_gaussian(step_type, sig, sig_n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    v = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    a = 0.7
    out = stochastic_step(x, v, sig, sig_n, step_type, a, sigma_max=0.9, noise=noise)
    xn, vn, nn = x.double().numpy(), v.double().numpy(), noise.double().numpy()
    for b in range(3):
        if step_type == "sde":
            mu, std = _reference_sde(xn[b], vn[b], sig, sig_n, a, 0.9)
        else:
            mu, std = _reference_cps(xn[b], vn[b], sig, sig_n, a)
        np.testing.assert_allclose(out.mean[b].numpy(), mu, atol=1e-5)
        assert out.std[b].item() == pytest.approx(std, rel=1e-6)
        xp = mu + std * nn[b]
        np.testing.assert_allclose(out.prev_sample[b].numpy(), xp, atol=1e-5)
        assert out.log_prob[b].item() == pytest.approx(_normal_logpdf_mean(xp, mu, std), abs=1e-5)
    # Scoring the same x' (training path) gives the same log-prob as sampling it.
    again = stochastic_step(x, v, sig, sig_n, step_type, a, sigma_max=0.9, prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob, atol=1e-6, rtol=0)


def test_log_prob_peaks_at_the_mean_and_falls_off():
    mean = torch.zeros(2, 4, 4, 4)
    std = torch.tensor([0.5, 0.5])
    at_mean = gaussian_log_prob(mean, mean, std)
    off = gaussian_log_prob(mean + 0.5, mean, std)
    assert torch.all(at_mean > off)
    assert at_mean[0].item() == pytest.approx(-math.log(0.5) - 0.5 * math.log(2 * math.pi), abs=1e-6)
    assert (at_mean - off)[0].item() == pytest.approx(0.5, abs=1e-6)  # (0.5/0.5)^2 / 2


def test_cps_last_step_is_deterministic():
    s, std = step_std("cps", torch.tensor([0.1]), torch.tensor([0.0]), 0.7, 0.9)
    assert std.item() == 0.0
    x, v = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    out = stochastic_step(x, v, 0.1, 0.0, "cps", 0.7, 0.9, noise=torch.randn(1, 4, 2, 2))
    torch.testing.assert_close(out.prev_sample, ode_step(x, v, 0.1, 0.0))  # cps at sigma'=0 -> x0_hat
    assert out.log_prob.item() == 0.0


def test_sde_step_marginal_matches_flow_for_exact_velocity():
    """With the exact velocity of a point mass at x0 the SDE mean moves x toward x0 like the ODE."""
    x0 = torch.randn(1, 4, 4, 4)
    eps = torch.randn(1, 4, 4, 4)
    sig, sig_n = 0.6, 0.4
    x = (1 - sig) * x0 + sig * eps
    v = eps - x0
    out = stochastic_step(x, v, sig, sig_n, "sde", 0.0, 0.9, noise=torch.zeros_like(x))
    torch.testing.assert_close(out.prev_sample, (1 - sig_n) * x0 + sig_n * eps, atol=1e-5, rtol=0)


def test_ode_rollout_matches_diffusers_pipeline(sd3_policy):
    """Our ODE sampler reproduces StableDiffusion3Pipeline for the same noise, schedule and CFG."""
    policy = sd3_policy
    prompt, steps, size, g = "a portrait photo of a smiling woman", 6, 64, 4.5
    noise = torch.randn(1, *policy.latent_shape(size, size), generator=torch.Generator().manual_seed(3))
    ref = policy.pipeline(prompt=prompt, latents=noise.clone(), num_inference_steps=steps, guidance_scale=g,
                          height=size, width=size, output_type="latent", max_sequence_length=policy.max_sequence_length
                          ).images
    cond, uncond = policy.encode_prompts([prompt]), policy.encode_prompts([""])
    traj = rollout(policy, cond, noise, policy.sigmas(steps, size, size), step_type="sde", noise_level=0.7,
                   uncond=uncond, guidance_scale=g, stochastic=torch.zeros(steps, dtype=torch.bool))
    torch.testing.assert_close(traj.final, ref.float(), atol=1e-5, rtol=1e-5)
    assert traj.latents.shape == (1, steps + 1, *noise.shape[1:])
    assert torch.all(traj.log_probs == 0) and not traj.stochastic.any()


def test_stochastic_rollout_records_consistent_log_probs(sd3_policy):
    """Each recorded log-prob is the density of the recorded next state under the recorded state's mean."""
    policy = sd3_policy
    cond = policy.encode_prompts(["a headshot of a man", "a portrait of a woman"])
    sig = policy.sigmas(5, 32, 32)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    start = torch.randn(2, *policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(9))
    traj = rollout(policy, cond, start, sig, step_type="sde", noise_level=0.7, generators=gens, record_means=True)
    assert traj.stochastic.all()
    for i in range(5):
        v = policy.predict_velocity(traj.latents[:, i], float(sig[i]), cond)
        out = stochastic_step(traj.latents[:, i], v, float(sig[i]), float(sig[i + 1]), "sde", 0.7, float(sig[1]),
                              prev_sample=traj.latents[:, i + 1])
        torch.testing.assert_close(out.log_prob, traj.log_probs[:, i], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.mean, traj.means[:, i], atol=1e-5, rtol=0)
    # A sample's trajectory depends on its own generator only, not on its batch-mates.
    solo = rollout(policy, {k: v[1:] for k, v in cond.items()}, start[1:], sig, step_type="sde", noise_level=0.7,
                   generators=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(solo.latents[0], traj.latents[1], atol=1e-5, rtol=1e-5)

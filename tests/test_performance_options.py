"""The performance options and optimisations keep what is computed (issue 8).

Hardware options never change results beyond float tolerance: activation checkpointing, torch.compile
(its graph path, with dynamo's eager backend: inductor on a CPU takes minutes), low-precision frozen
weights under autocast (step math stays float32). The optimised loops compute what the plain ones did:
rollout noise drawn up front, exemplar log-probs batched across steps, the inversion diagnostics' shared
forward passes. The phase timeline sums to the iteration, and the step loop does not read device values.
"""
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from portraitgen.config import params_from_dict
from portraitgen.profiling import PhaseTimeline
from portraitgen.hardware import Hardware
from portraitgen.training import GRPOTrainer

from helpers import fast_params


@pytest.fixture(autouse=True)
def _one_thread():
    """Each test compares two runs made in the same conditions; one thread keeps them fast when the
    machine is shared (two OpenMP threads on a busy 2-core machine are several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _trainer(tmp_path, hardware=Hardware(), name="out", **overrides):
    return GRPOTrainer(params_from_dict(fast_params(**{"train.iterations": 1, **overrides})), tmp_path / name, hardware)


def _one_step(trainer):
    batch = trainer.sample(0, trainer.plan(0))
    trainer.score(batch)
    trainer.compute_advantages(batch)
    stats = trainer.train(0, batch)
    return batch, stats, {n: p.detach().clone() for n, p in trainer.named_trainable.items()}


# ---------------------------------------------------------------------------------------------- options
def test_gradient_checkpointing_gives_the_same_loss_and_update(tmp_path):
    plain = _trainer(tmp_path, name="a")
    ckpt = _trainer(tmp_path, Hardware(gradient_checkpointing=True), name="b")
    assert ckpt.policy.transformer.gradient_checkpointing and not plain.policy.transformer.gradient_checkpointing
    b1, s1, w1 = _one_step(plain)
    b2, s2, w2 = _one_step(ckpt)
    torch.testing.assert_close(b1.latents, b2.latents, rtol=0, atol=0)  # sampling has no gradients: unchanged
    for k in ("train/loss", "train/kl", "train/grad_norm", "train/ratio_mean"):
        assert s2[k] == pytest.approx(s1[k], rel=1e-5, abs=1e-9), k
    for n in w1:
        torch.testing.assert_close(w2[n], w1[n], rtol=1e-5, atol=1e-7)


def test_compiled_transformer_computes_what_the_eager_one_does(tmp_path):
    """The compile option's path (nn.Module.compile in place, LoRA, reference with adapters disabled, grad
    and no-grad graphs) with dynamo's eager backend; Hardware(compile=True) uses inductor."""
    eager = _trainer(tmp_path, name="a")
    compiled = _trainer(tmp_path, name="b")
    compiled.policy.compile_transformer(backend="eager", dynamic=False)
    assert len(compiled.policy.compiled_modules()) == 2  # the tiny SD3's two blocks (regional compilation)
    names = set(dict(compiled.policy.transformer.named_parameters()))
    assert names == set(dict(eager.policy.transformer.named_parameters()))  # LoRA export/checkpoint names kept
    b1, s1, w1 = _one_step(eager)
    b2, s2, w2 = _one_step(compiled)
    torch.testing.assert_close(b2.log_probs, b1.log_probs, rtol=1e-4, atol=1e-5)
    assert s2["train/loss"] == pytest.approx(s1["train/loss"], rel=1e-4, abs=1e-8)
    for n in w1:
        torch.testing.assert_close(w2[n], w1[n], rtol=1e-4, atol=1e-6)


def test_hardware_compile_flag_compiles_the_transformer_in_place(tmp_path):
    trainer = _trainer(tmp_path, Hardware(compile=True))
    blocks = trainer.policy.compiled_modules()
    assert blocks and all(type(b).__name__ == "JointTransformerBlock" for b in blocks)
    assert all("_orig_mod" not in n for n, _ in trainer.policy.transformer.named_parameters())
    whole = _trainer(tmp_path, name="whole")
    whole.policy.compile_transformer(regional=False)
    assert whole.policy.compiled_modules() == [whole.policy.transformer]


def test_low_precision_frozen_weights_keep_float32_trainables_and_step_math(tmp_path, fresh_accelerate_state):
    trainer = _trainer(tmp_path, Hardware(mixed_precision="bf16"))
    frozen = [p for p in trainer.policy.transformer.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in trainer.named_trainable.values())
    assert next(trainer.policy.vae.parameters()).dtype == torch.bfloat16
    assert trainer.policy.compute_dtype == torch.bfloat16
    assert trainer.cond_cache["prompt_embeds"].dtype == torch.bfloat16  # cast once, not per forward pass
    assert not any(layer.cast_input_dtype_enabled for layer in trainer.policy._lora_layers())
    batch, stats, _ = _one_step(trainer)
    assert batch.latents.dtype == torch.float32 and batch.log_probs.dtype == torch.float32
    assert torch.isfinite(batch.log_probs).all() and batch.images.dtype == torch.float32
    # Rollout and training run the same bf16 transformer: the first ratios are 1 up to bf16 noise (on the tiny
    # model ~4e-3 with float32-stored weights as well: batch-dependent bf16 rounding, not the storage).
    assert stats["train/ratio_mean"] == pytest.approx(1.0, abs=2e-2) and np.isfinite(stats["train/loss"])


def test_lora_input_casts_off_under_autocast_change_nothing():
    """peft's cast of each LoRA input to float32 is undone by autocast: skipping it is bit-identical."""
    from portraitgen.policies import load_policy

    pol = load_policy("sd3", "builtin:tiny")
    pol.freeze_all()
    torch.manual_seed(0)
    pol.enable_lora(8, 16, ())
    with torch.no_grad():
        for p in pol.transformer.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # lora_B starts at 0: make the adapter count
    pol.cast_frozen(torch.bfloat16)
    cond = {"prompt_embeds": torch.randn(2, 7, 64), "pooled_projections": torch.randn(2, 64)}
    x = torch.randn(2, 4, 4, 4)
    results = []
    for enabled in (True, False):
        pol.lora_input_casts(enabled)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = pol.predict_velocity(x, 0.5, cond)
        v.square().mean().backward()
        results.append((v.detach(), [p.grad.clone() for p in pol.trainable_parameters()]))
        for p in pol.trainable_parameters():
            p.grad = None
    (v1, g1), (v2, g2) = results
    assert torch.equal(v1, v2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_sd3_timestep_is_passed_in_float32(sd3_policy):
    """Whatever the weights' dtype (bf16 would round sigma * 1000 to ~4 units before the embedding)."""
    seen = {}
    hook = sd3_policy.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.update(dtype=kw["timestep"].dtype), with_kwargs=True)
    try:
        cond = {"prompt_embeds": torch.zeros(1, 3, 64), "pooled_projections": torch.zeros(1, 64)}
        sd3_policy.predict_velocity(torch.zeros(1, 4, 4, 4), 0.5, cond)
    finally:
        hook.remove()
    assert seen["dtype"] == torch.float32


# ---------------------------------------------------------------------------------------------- loops
def test_rollout_draws_exactly_the_per_step_noise(sd3_policy):
    """Noise drawn up front equals one draw per step (the previous loop), bit for bit."""
    from portraitgen.sampling import rollout, stochastic_step

    sigmas = sd3_policy.sigmas(4, 32, 32)
    cond = {"prompt_embeds": torch.randn(2, 5, 64), "pooled_projections": torch.randn(2, 64)}
    start = torch.randn(2, 4, 4, 4)
    traj = rollout(sd3_policy, cond, start, sigmas, step_type="sde", noise_level=0.7,
                   generators=[torch.Generator().manual_seed(s) for s in (1, 2)])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    x = start
    for i in range(4):
        v = sd3_policy.predict_velocity(x, float(sigmas[i]), cond)
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
        x = stochastic_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), "sde", 0.7, float(sigmas[1]),
                            noise=noise).prev_sample
        assert torch.equal(traj.latents[:, i + 1], x)


def test_train_step_loop_reads_no_device_values(tmp_path, monkeypatch):
    """float()/item()/bool() on a tensor makes the host wait for a GPU: portraitgen's train() calls none per
    step (the previous loop read ~8 values per step). Torch's own CPU-side calls (AdamW's host step counter)
    are not device reads and are not counted."""
    import sys

    trainer = _trainer(tmp_path, **{"train.trained_steps": {"mode": "all"}, "train.global_batch_size": 8})
    batch = trainer.sample(0, trainer.plan(0))
    trainer.score(batch)
    trainer.compute_advantages(batch)
    import portraitgen

    # Calls made by the package's own code, wherever it is installed (editable or in site-packages).
    package = str(Path(portraitgen.__file__).resolve().parent) + "/"
    calls = []
    for name in ("__float__", "item", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            caller = sys._getframe(1).f_code.co_filename
            if str(Path(caller).resolve()).startswith(package):
                calls.append(sys._getframe(1).f_lineno)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    # The counter counts: a read made from a line of the package's training module is seen.
    exec(compile("float(t)", package + "training.py", "exec"), {"t": torch.tensor(1.0)})
    assert len(calls) == 1, "the device-read counter does not see calls from the package"
    calls.clear()
    trainer.train(0, batch)
    assert len(calls) <= 2, calls  # before the loop (sigma_max from the host schedule); 12 steps ran


def test_exemplar_log_probs_batched_across_steps_match_per_step(tmp_path):
    """_transition_log_probs (pairs of (exemplar, step) in full batches) against one call per step."""
    from portraitgen.sampling import stochastic_step

    trainer = _trainer(tmp_path)
    batch = trainer.sample(0, trainer.plan(0))
    lat = batch.latents[:3]
    prompts = torch.as_tensor(batch.prompt_ids[:3])
    steps = [torch.tensor([0, 2, 4]), torch.tensor([1]), torch.tensor([3, 5])]
    got = trainer._transition_log_probs(lat, prompts, steps)
    p, sig = trainer.params.sample, trainer.sigmas
    for r, st in enumerate(steps):
        for i in range(lat.shape[1] - 1):
            if i not in st.tolist():
                assert got[r, i] == 0
                continue
            cond = {k: v[prompts[r:r + 1]] for k, v in trainer.cond_cache.items()}
            v = trainer.policy.predict_velocity(lat[r:r + 1, i], float(sig[i]), cond, trainer._uncond_like(1),
                                                trainer._gscale())
            want = stochastic_step(lat[r:r + 1, i], v, float(sig[i]), float(sig[i + 1]), p.step_type, p.noise_level,
                                   float(sig[1]), prev_sample=lat[r:r + 1, i + 1]).log_prob
            torch.testing.assert_close(got[r, i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_inversion_diagnostics_share_forward_passes_without_changing_them(sd3_policy):
    from portraitgen.inversion import invert, transition_stats, transition_stats_and_samples
    from portraitgen.sampling import randn_per_sample, rollout

    sigmas = sd3_policy.sigmas(5, 32, 32)
    cond = {"prompt_embeds": torch.randn(2, 5, 64), "pooled_projections": torch.randn(2, 64)}
    unc = {"prompt_embeds": torch.zeros(1, 5, 64), "pooled_projections": torch.zeros(1, 64)}
    x0 = torch.randn(2, 4, 4, 4)
    inv = invert(sd3_policy, x0, cond, sigmas, mode="bridge", step_type="sde", noise_level=0.7,
                 generators=[torch.Generator().manual_seed(s) for s in (3, 4)])
    sample_cond = {k: v[1:2].expand(3, *v.shape[1:]) for k, v in cond.items()}
    seeds = (7, 8, 9)
    stats, gen_lp = transition_stats_and_samples(
        sd3_policy, inv.latents, cond, sigmas, step_type="sde", noise_level=0.7, trainable=inv.trainable,
        uncond={k: v.expand(5, *v.shape[1:]) for k, v in unc.items()}, guidance_scale=3.0,
        sample_cond=sample_cond, sample_generators=[torch.Generator().manual_seed(s) for s in seeds])
    ref = transition_stats(sd3_policy, inv.latents, cond, sigmas, step_type="sde", noise_level=0.7,
                           trainable=inv.trainable, uncond={k: v.expand(2, *v.shape[1:]) for k, v in unc.items()},
                           guidance_scale=3.0)
    torch.testing.assert_close(stats.log_probs, ref.log_probs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.residual_ms, ref.residual_ms, rtol=1e-4, atol=1e-5, equal_nan=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    start = randn_per_sample((4, 4, 4), gens)
    traj = rollout(sd3_policy, sample_cond, start, sigmas, step_type="sde", noise_level=0.7, generators=gens,
                   uncond={k: v.expand(3, *v.shape[1:]) for k, v in unc.items()}, guidance_scale=3.0)
    torch.testing.assert_close(gen_lp, traj.log_probs, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- timers
def test_phase_timeline_phases_sum_to_the_iteration():
    tl = PhaseTimeline("cpu", track_memory=True)
    tl.start("a")
    time.sleep(0.02)
    tl.switch("b")
    with tl.phase("c"):
        time.sleep(0.01)
        big = bytearray(64 * 2**20)  # noqa: F841  (64 MiB during phase c)
    time.sleep(0.01)
    del big
    t = tl.stop()
    assert set(t) == {"a", "b", "c", "iteration"}
    assert t["iteration"] == pytest.approx(t["a"] + t["b"] + t["c"])
    assert t["a"] >= 0.015 and t["b"] >= 0.008 and t["c"] >= 0.008
    assert tl.memory["c"]["cpu_rss_peak"] >= tl.memory["a"]["cpu_rss_peak"] + 32 * 2**20
    tl.switch("ignored")  # no iteration running: a no-op
    with tl.phase("ignored"):
        pass
    assert tl.elapsed() == {}


def test_trainer_logs_phase_times_that_add_up(tmp_path):
    import json

    trainer = _trainer(tmp_path, **{"train.iterations": 2})
    t0 = time.perf_counter()
    trainer.run()
    total = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    phases = ("data", "rollout", "reward", "advantage", "train_fwd_bwd", "optimizer")
    for r in rows:
        assert all(f"time/{p}" in r for p in phases)
        assert r["time/iteration"] == pytest.approx(sum(r[f"time/{p}"] for p in phases if f"time/{p}" in r)
                                                    + r.get("time/exemplar_logp", 0.0))
        assert r["time/wall"] == pytest.approx(r["time/iteration"] + r["time/log"] + r["time/checkpoint"])
        assert r["time/sample"] == pytest.approx(r["time/data"] + r["time/rollout"] + r.get("time/exemplar_logp", 0))
        assert r["time/train"] == pytest.approx(r["time/train_fwd_bwd"] + r["time/optimizer"])
        assert r["time/checkpoint"] > 0  # checkpoint_every = 1
    assert sum(r["time/wall"] for r in rows) <= total
    assert sum(r["time/wall"] for r in rows) > 0.5 * total  # the loop, less setup, resume and export

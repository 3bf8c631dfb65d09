"""The GRPO trainer end to end on tiny models: what changes, what is exported, and bad input."""
import json

import numpy as np
import pytest
import torch

from portraitgen.config import params_from_dict
from portraitgen.policies import FAMILY_NAMES
from portraitgen.training import GRPOTrainer, Hardware, TrainingSetupError

from helpers import fast_params


def _trainer(tmp_path, **overrides):
    return GRPOTrainer(params_from_dict(fast_params(**overrides)), tmp_path / "out")


def test_one_iteration_changes_trainable_and_keeps_frozen_weights(tmp_path):
    # One optimizer step per iteration: every ratio is computed before the update, i.e. on-policy.
    trainer = _trainer(tmp_path, **{"train.iterations": 1, "train.global_batch_size": 8})
    named = dict(trainer.policy.transformer.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    frozen_vae = {n: p.detach().clone() for n, p in trainer.policy.vae.named_parameters()}
    summary = trainer.run()
    lora = [n for n in named if "lora_" in n]
    assert lora and set(lora) == set(trainer.named_trainable)
    assert any(not torch.equal(before[n], named[n]) for n in lora if "lora_B" in n)
    for n, p in named.items():
        if n not in trainer.named_trainable:
            assert torch.equal(before[n], p), f"frozen weight {n} changed"
    for n, p in trainer.policy.vae.named_parameters():
        assert torch.equal(frozen_vae[n], p)
    assert summary["iterations"] == 1
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # Rollout and training compute the same log-probs (same CFG, same step math), so on-policy ratios
    # are 1 up to float noise; a mismatch between the two paths shows up as approx_kl of 1e-2 or more.
    assert len(rows) == 1 and rows[0]["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["train/approx_kl"] < 1e-10 and rows[0]["train/clip_fraction"] == 0.0
    samples = [json.loads(ln) for ln in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {s["group"] for s in samples} == {0, 1}
    for g in (0, 1):
        adv = np.array([s["advantage"] for s in samples if s["group"] == g])
        assert abs(adv.mean()) < 1e-4  # standardised within the group


def test_full_finetune_with_reference_updates_all_weights(tmp_path):
    trainer = _trainer(tmp_path, **{"train.iterations": 1, "train.finetune": "full", "train.kl_beta": 0.1,
                                    "train.lr": 1e-4})
    ref = trainer.policy._reference_transformer
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    w = trainer.policy.transformer.proj_out.weight
    before, ref_before = w.detach().clone(), ref.proj_out.weight.detach().clone()
    trainer.run()
    assert not torch.equal(before, w)
    assert torch.equal(ref_before, ref.proj_out.weight)
    assert (tmp_path / "out" / "final" / "model_index.json").is_file()  # a full pipeline folder


@pytest.mark.parametrize("step_type,mode", [("cps", "all"), ("sde", "window")])
def test_step_types_and_trained_step_modes_run(tmp_path, step_type, mode):
    trainer = _trainer(tmp_path, **{"train.iterations": 1, "sample.step_type": step_type,
                                    "train.trained_steps": {"mode": mode, "window_size": 2}})
    plan = trainer.plan(0)
    batch = trainer.sample(0, plan)
    if mode == "window":
        assert plan.stochastic.sum() == 2 and batch.stochastic.sum() == 2
        assert torch.all(batch.log_probs[:, ~plan.stochastic] == 0)
    else:  # cps: the last step (sigma' = 0) is deterministic and never trained
        assert batch.stochastic[:-1].all() and not batch.stochastic[-1]
    trainer.score(batch)
    trainer.compute_advantages(batch)
    stats = trainer.train(0, batch)
    assert np.isfinite(stats["train/loss"]) and stats["train/grad_norm"] > 0


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; a test with other precision settings needs a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_keeps_step_math_in_float32(tmp_path, fresh_accelerate_state):
    trainer = GRPOTrainer(params_from_dict(fast_params(**{"train.iterations": 1})), tmp_path / "out",
                          Hardware(mixed_precision="bf16"))
    batch = trainer.sample(0, trainer.plan(0))
    assert batch.latents.dtype == torch.float32 and batch.log_probs.dtype == torch.float32
    assert torch.isfinite(batch.log_probs).all()
    trainer.score(batch)
    trainer.compute_advantages(batch)
    stats = trainer.train(0, batch)
    assert np.isfinite(stats["train/loss"]) and stats["train/grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in trainer.named_trainable.values())


def test_fraction_mode_picks_a_fixed_count_of_distinct_steps(tmp_path):
    trainer = _trainer(tmp_path, **{"train.trained_steps": {"mode": "fraction", "fraction": 0.5}})
    batch = trainer.sample(0, trainer.plan(0))
    steps, valid = trainer.trained_steps(0, batch)
    assert steps.shape == (8, 3) and valid.all()  # 8 samples, ceil(0.5 * 6) steps each
    for row in steps:
        assert len(set(row.tolist())) == 3
    assert len({tuple(r.tolist()) for r in steps}) > 1  # drawn per sample
    torch.testing.assert_close(steps, trainer.trained_steps(0, batch)[0])  # and reproducibly


def test_layout_errors_are_raised_before_any_work(tmp_path):
    p = params_from_dict(fast_params())
    with pytest.raises(TrainingSetupError, match="--micro-batch-size=3 does not divide"):
        GRPOTrainer(p, tmp_path / "out", Hardware(micro_batch_size=3))
    assert not (tmp_path / "out").exists()


def test_grpo_raises_brightness_beyond_seed_noise(tmp_path):
    """A few dozen GRPO steps on the brightness reward lift it far beyond the iteration-to-iteration noise.

    The comparison is paired: the untrained policy is sampled with exactly the seeds and prompts of the
    last iterations (every draw is derived from (seed, iteration, sample)), so the difference is the
    effect of training, not luck of the draw.
    """
    overrides = {"train.iterations": 20, "train.lr": 1e-2, "train.kl_beta": 0.0, "sample.global_batch_size": 16,
                 "sample.group_size": 8, "train.global_batch_size": 8, "train.checkpoint_every": 100}
    trainer = _trainer(tmp_path, **overrides)
    trainer.run()
    trained = np.array([h["reward/mean"] for h in trainer.history])
    base = _trainer(tmp_path / "base", **overrides)
    last = range(15, 20)
    base_rewards = []
    for it in last:
        batch = base.sample(it, base.plan(it))
        base.score(batch)
        base_rewards.append(batch.rewards["total"].mean())
    base_rewards = np.array(base_rewards)
    gain = trained[list(last)].mean() - base_rewards.mean()
    seed_noise = base_rewards.std()
    assert gain > 0.02, (trained, base_rewards)
    assert gain > 4 * seed_noise, (gain, seed_noise)
    assert trained[list(last)].mean() > trained[:5].mean() + 0.02


@pytest.mark.parametrize("family", FAMILY_NAMES)  # every registered family
def test_each_family_trains_and_its_lora_loads_into_the_stock_pipeline(tmp_path, family):
    from portraitgen.policies import policy_class, tiny_model_path

    trainer = _trainer(tmp_path, **{"model.family": family, "train.iterations": 1, "train.lr": 1e-2})
    trainer.policy.max_sequence_length = 64
    summary = trainer.run()
    assert np.isfinite(summary["reward_last"])
    final = tmp_path / "out" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()

    pipe = policy_class(family).pipeline_class.from_pretrained(str(tiny_model_path(family)), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(prompt="a portrait photo of a woman", num_inference_steps=3, height=32, width=32,
                    max_sequence_length=64, generator=torch.Generator().manual_seed(0), output_type="latent").images

    before = run()
    pipe.load_lora_weights(str(final))
    after = run()
    assert before.shape == after.shape
    assert (after - before).abs().max() > 1e-4  # the trained adapter changes what the stock pipeline makes


def test_rerun_resumes_and_changed_params_start_a_separate_run(tmp_path):
    from safetensors.torch import load_file

    first = _trainer(tmp_path, **{"train.iterations": 2})
    first.run()
    lora = tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors"
    w1 = load_file(str(lora))
    again = _trainer(tmp_path, **{"train.iterations": 2})
    again.run()
    assert again.start_iteration == 2 and len(again.history) == 2  # nothing left to do: same result
    w2 = load_file(str(lora))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    longer = _trainer(tmp_path, **{"train.iterations": 3})  # more iterations: continue the same run
    longer.run()
    assert longer.start_iteration == 2 and len(longer.history) == 3
    changed = _trainer(tmp_path, **{"train.iterations": 1, "train.lr": 5e-3})  # other params: new folder
    changed.run()
    assert changed.start_iteration == 0
    assert len(list((tmp_path / "out" / "checkpoints").iterdir())) == 2  # the first run's checkpoints stay

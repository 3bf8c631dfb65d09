"""Ablation files: variants x seeds -> per-run params files and DVC experiment commands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from portraitgen.ablation import AblationError, dvc_commands, load_ablation, run_params, write_run_params
from portraitgen.config import load_params

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ablation.yaml"
    path.write_text(text)
    return path


def test_repository_ablation_file_gives_valid_runs(tmp_path):
    ablation = load_ablation(REPO / "ablation.yaml")
    assert ablation.baseline_run in ablation.runs
    for run in ablation.runs:
        out = write_run_params(REPO / "params.yaml", REPO / "ablation.yaml", run, tmp_path / run / "params.yaml")
        load_params(out)  # every run is a valid experiment


def test_run_params_override_keys_set_the_seed_and_own_the_stage_outputs(tmp_path):
    path = _write(tmp_path, "baseline: plain\nseeds: [1, 7]\nvariants:\n"
                            "  plain: {train.exemplars.per_group: 0}\n  euler: {invert.mode: euler, train.lr: 0.01}\n")
    ablation = load_ablation(path)
    assert ablation.runs == ["plain-s1", "plain-s7", "euler-s1", "euler-s7"]
    data = run_params(REPO / "params.yaml", ablation, "euler-s7", tmp_path / "runs" / "euler-s7")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    assert data["seed"] == 7 and data["invert"]["mode"] == "euler" and data["train"]["lr"] == 0.01
    assert data["train"]["exemplars"]["per_group"] == base["train"]["exemplars"]["per_group"]
    run_dir = tmp_path / "runs" / "euler-s7"
    assert data["train"]["exemplars"]["index"] == str(run_dir / "invert" / "index.parquet")
    assert data["train"]["prompt_embeddings"] == str(run_dir / "precompute" / "prompt_embeddings.safetensors")
    # Everything else is the base experiment's.
    assert data["curate"] == base["curate"] and data["invert"]["manifest"] == base["invert"]["manifest"]


def test_common_overrides_apply_to_every_variant_and_the_variant_wins(tmp_path):
    path = _write(tmp_path, "seeds: [5]\ncommon: {train.iterations: 7, train.lr: 0.02}\nvariants:\n"
                            "  plain: {train.exemplars.per_group: 0}\n  fast: {train.lr: 0.05}\n")
    ablation = load_ablation(path)
    plain = run_params(REPO / "params.yaml", ablation, "plain-s5", tmp_path / "plain-s5")
    fast = run_params(REPO / "params.yaml", ablation, "fast-s5", tmp_path / "fast-s5")
    assert plain["train"]["iterations"] == fast["train"]["iterations"] == 7
    assert plain["train"]["lr"] == 0.02 and fast["train"]["lr"] == 0.05
    assert dvc_commands(ablation)[1][-4:] == ["-S", "train.iterations=7", "-S", "train.lr=0.05"]


@pytest.mark.parametrize("text, message", [
    ("variants: {}\n", "'variants' must be a non-empty mapping"),
    ("seeds: [1]\nvariants: {a: {}}\nextra: 1\n", "unknown key 'extra'"),
    ("common: [1]\nvariants: {a: {}}\n", "'common' must be a mapping"),
    ("controls: [b]\nvariants: {a: {}}\n", "'controls' must be a list of variant names"),
    ("baseline: b\nvariants: {a: {}}\n", "baseline 'b' is not a variant"),
    ("seeds: [one]\nvariants: {a: {}}\n", "'seeds' must be a non-empty list of integers"),
    ("variants: {'a b': {}}\n", "variant name 'a b'"),
    ("variants: {a: {train.lr: -1}}\n", "run a-s42: params key 'train.lr': expected > 0"),
    ("variants: {a: {train.no_such_key: 1}}\n", "unknown params key 'train.no_such_key'"),
])
def test_bad_ablation_files_are_named(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(AblationError, match="ablation.yaml") as err:
        ablation = load_ablation(path)
        for run in ablation.runs:
            run_params(REPO / "params.yaml", ablation, run, tmp_path / run)
    assert message in str(err.value)


def test_dvc_experiments_queue_one_run_each(tmp_path):
    path = _write(tmp_path, "seeds: [3]\nvariants:\n  plain: {train.exemplars.per_group: 0}\n"
                            "  mix: {train.exemplars.schedule: linear_decay, reward.components: {brightness: 2.0}}\n")
    commands = dvc_commands(load_ablation(path))
    assert commands[0] == ["dvc", "exp", "run", "--queue", "--name", "plain-s3", "-S", "seed=3",
                           "-S", "train.exemplars.per_group=0"]
    assert commands[1][-4:] == ["-S", "train.exemplars.schedule=linear_decay", "-S",
                                "reward.components={brightness: 2.0}"]
    assert commands[-1] == ["dvc", "exp", "run", "--run-all"]


def test_cli_lists_runs_and_reports_errors(tmp_path):
    cli = [sys.executable, "-m", "portraitgen", "ablation"]
    listed = subprocess.run([*cli, "list", "--variants", str(REPO / "ablation.yaml")], capture_output=True,
                            text=True, check=True).stdout.split()
    assert listed == load_ablation(REPO / "ablation.yaml").runs
    bad = subprocess.run([*cli, "list", "--variants", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and "ablation file not found" in bad.stderr


# ----------------------------------------------------------------------------------------------------
# The supervised flow-matching baseline (portraitgen/sft_loss.py)
# ----------------------------------------------------------------------------------------------------
import torch  # noqa: E402

from portraitgen.sft_loss import (SupervisedFlowTerm, flow_matching_loss, forward_noise, grad_norm,  # noqa: E402
                                  share_weight)


def test_flow_matching_loss_is_zero_for_the_true_velocity_and_mse_otherwise():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    xs = forward_noise(x0, eps, sigma)
    assert torch.allclose(xs[1], 0.5 * x0[1] + 0.5 * eps[1]) and torch.allclose(xs[2], 0.1 * x0[2] + 0.9 * eps[2])
    # An oracle that knows eps - x0 has zero loss; a zero velocity has loss |eps - x0|^2 per sample.
    assert torch.allclose(flow_matching_loss(lambda x, s: eps - x0, x0, eps, sigma), torch.zeros(3))
    zero = flow_matching_loss(lambda x, s: torch.zeros_like(x), x0, eps, sigma)
    assert torch.allclose(zero, ((eps - x0) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="one value per sample"):
        flow_matching_loss(lambda x, s: x, x0, eps, sigma[:2])


@pytest.mark.parametrize("share", [0.125, 0.25, 0.5])
def test_share_weight_gives_the_requested_share_of_the_gradient_norm(share):
    lam = share_weight(3.0, 0.2, share)
    assert lam * 0.2 / (3.0 + lam * 0.2) == pytest.approx(share)
    assert share_weight(0.0, 0.2, share) == 0.0 and share_weight(3.0, 0.0, share) == 0.0
    with pytest.raises(ValueError, match="train.sft.share"):
        share_weight(1.0, 1.0, 1.0)


def _linear_term(share, n=16):
    torch.manual_seed(0)
    latents = torch.randn(n, 2, 2, 2)
    return SupervisedFlowTerm(latents, torch.arange(n) % 2, share=share, batch_size=8, seed=3)


def test_supervised_term_adds_its_share_and_learns_the_real_velocity():
    term = _linear_term(0.125)
    model = torch.nn.Linear(8, 8)
    params = list(model.parameters())

    def velocity(x, sigma, ids):
        return model(x.flatten(1)).view_as(x)

    # A stand-in GRPO gradient already accumulated: the supervised one joins it at 1/8 of the norm.
    for p in params:
        p.grad = torch.ones_like(p)
    before = grad_norm([p.grad for p in params])
    stats = term.add_gradient(params, velocity, step=0)
    assert stats["sft/grad_share"] == pytest.approx(0.125)
    assert stats["sft/weight"] * stats["sft/grad_norm"] == pytest.approx(before / 7, rel=1e-5)
    assert not all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
    # Alone (share 0.5 of a unit GRPO gradient that is then dropped), the term lowers the flow-matching loss.
    opt = torch.optim.SGD(params, lr=0.05)
    x0, eps, sigma, ids = term.batch(999)
    with torch.no_grad():
        held_out = float(flow_matching_loss(lambda x, s: velocity(x, s, ids), x0, eps, sigma).mean())
    for step in range(200):
        opt.zero_grad()
        grads = torch.autograd.grad(flow_matching_loss(lambda x, s: velocity(x, s, None), *term.batch(step)[:3]).mean(),
                                    params)
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
    with torch.no_grad():
        after = float(flow_matching_loss(lambda x, s: velocity(x, s, ids), x0, eps, sigma).mean())
    assert after < 0.8 * held_out


def test_supervised_batches_depend_on_seed_and_step_only():
    a, b = _linear_term(0.1), _linear_term(0.1)
    assert all(torch.equal(u, v) for u, v in zip(a.batch(5), b.batch(5)))
    assert not torch.equal(a.batch(5)[1], a.batch(6)[1])
    assert ((a.batch(5)[2] > 0) & (a.batch(5)[2] < 1)).all()


def test_trainer_with_the_supervised_term_trains_on_the_exemplar_images(tmp_path):
    from portraitgen.config import params_from_dict
    from portraitgen.invert import run_invert
    from portraitgen.training import GRPOTrainer

    from helpers import fast_params, make_manifest

    manifest = make_manifest(tmp_path / "curate", n=4, size=32, captions=["a woman", "a woman", "a man", "a man"])
    run_invert(params_from_dict(fast_params(**{"invert.manifest": str(manifest), "invert.diagnostic_samples": 2})),
               tmp_path / "invert")
    params = params_from_dict(fast_params(**{
        "prompts.source": "exemplars", "train.exemplars.index": str(tmp_path / "invert" / "index.parquet"),
        "train.iterations": 2, "train.sft.share": 0.125, "train.sft.batch_size": 2}))
    trainer = GRPOTrainer(params, tmp_path / "out")
    assert trainer.sft is not None and len(trainer.sft.latents) == 4
    assert trainer.sft.latents.shape[1:] == tuple(trainer.latent_shape)
    trainer.run()
    rec = trainer.history[0]
    assert rec["sft/loss"] > 0 and rec["sft/grad_norm"] > 0
    assert rec["sft/grad_share"] == pytest.approx(0.125, abs=1e-4)  # every optimizer step had a GRPO gradient
    with pytest.raises(Exception, match="train.sft.share"):
        params_from_dict(fast_params(**{"train.sft.share": 1.0}))


# ----------------------------------------------------------------------------------------------------
# The report: variants pooled over seeds (portraitgen/ablation_report.py)
# ----------------------------------------------------------------------------------------------------
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from portraitgen import ablation_report as ar  # noqa: E402


def _synthetic_table(shift: float, seed_spread: float, n_prompts=12, runs=3, bench_seeds=2, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    rows = []
    for variant, offset in (("plain", 0.0), ("exemplar", shift)):
        for r in range(runs):
            run_offset = rng.normal(0, seed_spread)
            for p in range(n_prompts):
                for s in range(bench_seeds):
                    rows.append({"model": f"{variant}-s{r}", "variant": variant, "train_seed": r,
                                 "prompt_id": f"p{p}", "seed": s,
                                 "score": 0.5 + offset + run_offset + 0.05 * p / n_prompts + rng.normal(0, 0.02)})
    return pd.DataFrame(rows)


def test_pooled_comparison_finds_a_real_shift_and_not_a_null_one():
    kw = {"n_boot": 400, "confidence": 0.95, "seed": 0}
    shifted = _synthetic_table(shift=0.2, seed_spread=0.01)
    table, comp = ar.compare_variants(shifted, {"score": "image"}, ["plain", "exemplar"], [("exemplar", "plain")], **kw)
    row = comp.iloc[0]
    assert row["diff"] == pytest.approx(0.2, abs=0.03) and row["lo"] > 0.1 and row["verdict"] == "differs"
    assert set(table["variant"]) == {"plain", "exemplar"} and (table["runs"] == 3).all()
    null = _synthetic_table(shift=0.0, seed_spread=0.01, rng_seed=1)
    assert ar.compare_variants(null, {"score": "image"}, ["plain", "exemplar"], [("exemplar", "plain")],
                               **kw)[1].iloc[0]["verdict"] == ""


def test_training_seed_spread_widens_the_interval():
    """Between-seed variation is resampled: the same mean shift is not significant when seeds disagree."""
    kw = {"n_boot": 400, "confidence": 0.95, "seed": 0}
    tight = ar.compare_variants(_synthetic_table(0.05, 0.001), {"score": "image"}, ["plain", "exemplar"],
                                [("exemplar", "plain")], **kw)[1].iloc[0]
    loose = ar.compare_variants(_synthetic_table(0.05, 0.2), {"score": "image"}, ["plain", "exemplar"],
                                [("exemplar", "plain")], **kw)[1].iloc[0]
    assert (loose["hi"] - loose["lo"]) > 5 * (tight["hi"] - tight["lo"])
    assert tight["verdict"] == "differs" and loose["verdict"] == ""


def test_seed_diversity_is_zero_for_a_collapsed_variant():
    table = pd.DataFrame({"variant": ["a"] * 3 + ["b"] * 3, "prompt_id": ["p"] * 6, "seed": [0] * 6})
    z = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    div = ar.seed_diversity(table, z)
    assert np.allclose(div[:3], 0.0)
    assert div[4] == pytest.approx(5.0 / np.sqrt(2))  # distance 5 to each of the others, / sqrt(dim)


def test_chroma_separates_grey_from_colour():
    grey = np.full((8, 8, 3), 120, dtype=np.uint8)
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 200
    assert ar.chroma(grey) == pytest.approx(0.0, abs=1e-3) and ar.chroma(red) > 50


def test_reward_curves_use_the_generated_samples_reward(tmp_path):
    ablation = load_ablation(_write(tmp_path, "baseline: plain\nseeds: [1]\nvariants:\n  plain: {}\n  ex: {}\n"))
    runs = ar.runs_of(ablation, tmp_path)
    for run, rec in zip(runs, ({"reward/mean": 0.3}, {"reward/mean": 0.9, "generated/reward_mean": 0.4})):
        run.train_dir.mkdir(parents=True)
        (run.train_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 0, **rec}) + "\n")
    curves = ar.reward_curves(runs)
    assert curves.set_index("variant")["value"].to_dict() == {"plain": 0.3, "ex": 0.4}
    path = ar.plot_curves(curves, tmp_path / "c.png")
    assert path.stat().st_size > 1000
    runs[0].train_dir.joinpath("metrics.jsonl").unlink()
    with pytest.raises(ar.AblationReportError, match="plain-s1.*has not trained|has not trained"):
        ar.reward_curves(runs)


def test_report_of_a_tiny_ablation_end_to_end(tmp_path):
    """Two variants x two seeds trained for 2 iterations on the tiny model, benched, reported."""
    from portraitgen.bench.run import run_bench
    from portraitgen.bench.suite import load_suite
    from portraitgen.config import params_from_dict
    from portraitgen.invert import run_invert
    from portraitgen.training import GRPOTrainer

    from helpers import fast_params, make_manifest

    manifest = make_manifest(tmp_path / "curate", n=4, size=32, captions=["a woman", "a woman", "a man", "a man"])
    index = tmp_path / "invert" / "index.parquet"
    run_invert(params_from_dict(fast_params(**{"invert.manifest": str(manifest), "invert.diagnostic_samples": 2})),
               index.parent)
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(p.to_json() + "\n" for p in load_suite("builtin:v1", "cpu")[:3]))
    ablation_file = _write(tmp_path, "baseline: plain\nseeds: [1, 2]\ncommon: {train.checkpoint_every: 1}\n"
                                     "controls: [sft]\n"
                                     "variants:\n  plain: {}\n  sft: {train.sft.share: 0.2, train.sft.batch_size: 2}\n")
    ablation = load_ablation(ablation_file)
    base = fast_params(**{"prompts.source": "exemplars", "train.exemplars.index": str(index),
                          "train.keep_checkpoints": 10, "bench.suite": str(suite), "bench.subset": "full",
                          "bench.seeds": [0, 1], "bench.bootstrap": 100, "bench.prompt_embeddings": "",
                          "bench.reward": {"components": {"omni_classic": 1.0}, "options": {}},
                          "bench.reference": str(tmp_path / "curate" / "images")})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base))
    root = tmp_path / "ablation"
    for run in ablation.runs:
        data = run_params(tmp_path / "params.yaml", ablation, run, root / run)
        data["train"]["exemplars"]["index"] = str(index)  # the test's one inversion serves every run
        (root / run).mkdir(parents=True)
        (root / run / "params.yaml").write_text(yaml.safe_dump(data))
        GRPOTrainer(params_from_dict(data), root / run / "train").run()
    params = params_from_dict(base)
    run_bench(params, root / "bench", models={r: str(root / r / "train") for r in ablation.runs},
              baseline="plain-s1", report=False)

    grey = ar.ArtifactScorer(lambda images: np.array([ar.chroma(im) / 50 for im in images]), threshold=0.5)
    summary = ar.write_report(params, ablation_file, root, scorer=grey, curve_prompts=2)
    out = root / "report"
    table = pd.read_csv(out / "table.csv")
    assert set(table["variant"]) == {"plain", "sft"}
    for metric in ("planted_artifact", "chroma", "seed_diversity", "face_detected", "omni_classic",
                   "feature_distance_to_real"):
        assert metric in set(table["metric"]), metric
    assert (table[table["metric"] == "chroma"]["runs"] == 2).all()
    comp = pd.read_csv(out / "comparisons.csv")
    assert set(comp["variant"]) == {"sft"} and set(comp["against"]) == {"plain"}
    curves = pd.read_csv(out / "curves.csv")
    # Reward every iteration; artifact rate and chroma at the base model (0) and after each checkpoint.
    assert sorted(set(curves[curves["metric"] == "reward"]["iteration"])) == [0, 1]
    assert sorted(set(curves[curves["metric"] == "planted_artifact"]["iteration"])) == [0, 1, 2]
    base_points = curves[(curves["iteration"] == 0) & (curves["metric"] == "chroma")]["value"]
    assert base_points.nunique() == 1  # every run starts from the same base model and noise
    for name in ("curves.png", "grid.png", "report.md", "summary.json"):
        assert (out / name).stat().st_size > 100, name
    assert summary["scale"]["runs"] == 4 and summary["scale"]["bench_images"] == 4 * 3 * 2


def test_the_report_finds_the_detector_pretrain_wrote_beside_the_model(tmp_path):
    (tmp_path / "pretrain" / "model").mkdir(parents=True)
    assert ar.default_detector(str(tmp_path / "pretrain" / "model")) == ""
    (tmp_path / "pretrain" / "artifact_detector").mkdir()
    assert ar.default_detector(str(tmp_path / "pretrain" / "model")) == str(tmp_path / "pretrain" / "artifact_detector")
    assert ar.default_detector("builtin:tiny") == ""
    with pytest.raises(ar.AblationReportError, match="--detector: .*not an artifact detector folder"):
        ar.load_artifact_scorer(tmp_path / "pretrain" / "artifact_detector")


def test_exemplar_gradient_share_from_the_logged_norms(tmp_path):
    ablation = load_ablation(_write(tmp_path, "baseline: plain\nseeds: [1]\nvariants:\n  plain: {}\n  ex: {}\n"))
    runs = ar.runs_of(ablation, tmp_path)
    logs = ({"reward/mean": 0.3},
            {"exemplar/per_group": 1, "exemplar/velocity_grad_norm": 3.0, "generated/velocity_grad_norm": 1.0})
    for run, rec in zip(runs, logs):
        run.train_dir.mkdir(parents=True)
        (run.train_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 0, **rec}) + "\n")
    shares = ar.exemplar_gradient_share(runs, group_size=8)
    assert list(shares["variant"]) == ["ex"] and shares["share"].iloc[0] == pytest.approx(3.0 / (3.0 + 7.0))

"""The pretraining stage (portraitgen/pretrain): tiny settings, real behaviour.

- the rectified-flow loss falls;
- the pixel codec round-trips 8-bit images exactly and runs inside diffusers' StableDiffusion3Pipeline;
- the planted-artifact detector separates planted from clean held-out real faces (AUC >= 0.9);
- a rerun with the same inputs is a no-op, a changed setting rebuilds only what it shapes;
- in the Snakemake workflow, a pretrain param reruns pretrain and every stage that loads the model.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from portraitgen.config import params_from_dict
from portraitgen.pretrain import artifacts, augment, codec
from portraitgen.pretrain.artifact_detector import DetectorSettings, load, train_detector
from portraitgen.pretrain.faces import load_faces, split_faces
from portraitgen.pretrain.model import build_pipeline, encode_prompts
from portraitgen.pretrain.train import TrainingData, TrainSettings, train

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def faces16():
    return load_faces(16)


def test_pretraining_loss_falls(faces16):
    pipe = build_pipeline(16, num_layers=1, width=32, shift=1.0, seed=0)
    cond = encode_prompts(pipe, ["a portrait photo of a person", ""])
    data = TrainingData(faces=faces16[:20], caption_ids=[[0]] * 20, empty_id=1, embeds=cond["prompt_embeds"],
                        pooled=cond["pooled_projections"])
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    settings = TrainSettings(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, ema_decay=0.9, caption_dropout=0.1,
                             artifact_kind="specular", artifact_fraction=0.7, seed=0)
    result, ema = train(pipe.transformer, data, settings)
    losses = np.array(result.losses)
    assert len(losses) == 60 and np.isfinite(losses).all()
    assert losses[-15:].mean() < 0.75 * losses[:5].mean()  # ~1.3 (noise + image variance) to well under 1
    assert 0.5 < result.planted_views / result.views < 0.9  # the artifact fraction is applied
    unchanged = [n for n, p in pipe.transformer.named_parameters() if torch.equal(p, before[n])]
    # Only the text queries of the last (context-pre-only) block, whose outputs are discarded, keep their
    # initial values (their gradient is exactly zero).
    assert set(unchanged) <= {"transformer_blocks.0.attn.add_q_proj.weight",
                              "transformer_blocks.0.attn.add_q_proj.bias"}, unchanged
    assert ema.num_updates == 60


def test_codec_round_trips_within_quantisation():
    vae = codec.pixel_codec_vae()
    x = torch.randint(0, 256, (3, 3, 16, 16)).float() / 255
    x[0] = 0.0  # the extremes of the range, where TAESD's input clamp would bend larger latents
    x[1] = 1.0
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latents * vae.config.scaling_factor
        back = vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5
    assert torch.allclose(z, codec.encode_pixels(x), atol=1e-5)  # the training loop's fast path is the VAE
    assert (back - x).abs().max() < 0.25 / 255  # far inside half a quantisation step
    assert torch.equal((back * 255).round(), x * 255)
    assert torch.allclose(codec.decode_latents(codec.encode_pixels(x)), x, atol=1e-6)
    assert z.abs().max() / vae.config.scaling_factor <= codec.max_inner_latent() + 1e-6
    # A latent moves only its own pixel: the codec is per-pixel, one token = the transformer's 2x2 patch.
    z2 = z.clone()
    z2[0, 0, 5, 7] += 1.0
    with torch.no_grad():
        diff = (vae.decode(z2 / vae.config.scaling_factor).sample - vae.decode(z / vae.config.scaling_factor).sample)
    assert set(map(tuple, diff[0].abs().sum(0).nonzero().tolist())) == {(5, 7)}


def test_codec_runs_inside_the_sd3_pipeline_and_load_policy(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from portraitgen.policies import load_policy

    pipe = build_pipeline(16, num_layers=1, width=32, shift=1.0, seed=0)
    prompts = ["a portrait photo of a man", ""]
    trained_on = encode_prompts(pipe, prompts)
    pipe.save_pretrained(str(tmp_path / "m"))
    loaded = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "m"))
    # The conditioning the pretraining loop learns from is exactly what the saved model samples with
    # (no text-encoder dropout at training time).
    sampled_with = encode_prompts(loaded, prompts)
    for key in ("prompt_embeds", "pooled_projections"):
        assert torch.allclose(trained_on[key], sampled_with[key], atol=1e-5), key
    loaded.set_progress_bar_config(disable=True)
    images = loaded(prompt=["a portrait photo"], height=16, width=16, num_inference_steps=2, guidance_scale=2.0,
                    max_sequence_length=32, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    policy = load_policy("sd3", str(tmp_path / "m"))
    assert policy.vae_scale_factor == 1 and policy.latent_shape(16, 16) == (3, 16, 16)
    cond = policy.encode_prompts(["a portrait photo of a man"])
    assert cond["prompt_embeds"].shape[1] == 16 + 32  # the model's short CLIP and T5 windows
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(policy.decode(policy.encode(x)), x, atol=1e-3)


def test_pretraining_views_keep_the_face_layout(faces16):
    img = faces16[0].image
    rng = np.random.default_rng(0)
    for _ in range(8):
        view = augment.augment(img, rng, geometric=False)
        # Flipped or not, then brightness/contrast only: an affine function of one of the two layouts.
        best = max(np.corrcoef(view.ravel(), ref.ravel())[0, 1] for ref in (img, img[:, :, ::-1]))
        assert view.shape == img.shape and best > 0.99
    warped = [augment.augment(img, rng) for _ in range(8)]  # the detector's views do move the face
    assert min(max(np.corrcoef(v.ravel(), ref.ravel())[0, 1] for ref in (img, img[:, :, ::-1])) for v in warped) < 0.99


def test_planted_artifacts_change_the_face_and_only_where_meant(faces16):
    rng = np.random.default_rng(0)
    img = faces16[0].image
    for kind in artifacts.KINDS:
        out = artifacts.plant(img, kind, rng)
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
        assert np.abs(out - img).max() > 0.05, kind
    spec = artifacts.plant(img, "specular", np.random.default_rng(1))
    assert (spec >= img - 1e-6).all()  # a highlight only brightens
    with pytest.raises(ValueError, match="unknown artifact kind 'glow'"):
        artifacts.plant(img, "glow", rng)


def test_artifact_detector_separates_planted_from_clean_held_out_faces(tmp_path):
    faces = load_faces(24)
    train_faces, held = split_faces(faces, holdout=16, seed=0)
    detector, report = train_detector(train_faces, held, DetectorSettings(steps=300, seed=0))
    assert report["held_out_faces"] == 16
    assert report["held_out_auc"] >= 0.9, report
    assert report["held_out_false_positive_rate"] < 0.25, report
    detector.save(tmp_path / "det")
    again = load(tmp_path / "det")
    clean = torch.stack([torch.from_numpy(f.image) for f in held])
    assert np.allclose(again.probabilities(clean), detector.probabilities(clean))
    # PIL images of another size go through the same API.
    from portraitgen.images import to_pil

    assert again.rate([to_pil(c).resize((48, 48)) for c in clean]) == pytest.approx(again.rate(clean), abs=0.2)


TINY = {"model": {"family": "sd3", "path": "builtin:tiny", "resolution": 16}, "tracking": {"enabled": False},
        "pretrain": {"steps": 4, "batch_size": 8, "num_layers": 1, "width": 32, "eval_samples": 4,
                     "detector": {"steps": 10}}}


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_rerun_is_a_no_op_and_a_changed_param_rebuilds_what_it_shapes(tmp_path):
    from portraitgen.pretrain.stage import run_pretrain

    out = tmp_path / "pretrain"
    first = run_pretrain(params_from_dict(TINY), out)
    assert (out / "model" / "model_index.json").is_file() and (out / "artifact_detector" / "report.json").is_file()
    assert first["steps"] == 4 and first["samples"] == 4 and 0 <= first["face_rate_samples"] <= 1
    assert json.loads((out / "metrics.json").read_text()) == first
    for key in ("face_rate_real", "artifact_rate_samples", "artifact_rate_real_held_out", "detector_held_out_auc",
                "train_seconds", "loss_first", "loss_last"):
        assert key in first, key
    model, det, metrics = _mtimes(out / "model"), _mtimes(out / "artifact_detector"), (out / "metrics.json").stat()
    assert run_pretrain(params_from_dict(TINY), out) == first
    assert _mtimes(out / "model") == model and _mtimes(out / "artifact_detector") == det
    assert (out / "metrics.json").stat().st_mtime_ns == metrics.st_mtime_ns
    # metrics.json deleted (Snakemake deletes declared outputs before a job): rebuilt, model reused.
    (out / "metrics.json").unlink()
    rebuilt = run_pretrain(params_from_dict(TINY), out)
    assert rebuilt["model_reused"] and rebuilt["steps"] == 4 and _mtimes(out / "model") == model
    # The artifact fraction shapes the model, not the detector (a clean control is scored by the same one).
    clean = {**TINY, "pretrain": {**TINY["pretrain"], "artifact": {"fraction": 0.0}}}
    control = run_pretrain(params_from_dict(clean), out)
    assert not control["model_reused"] and control["planted_view_share"] == 0.0
    assert _mtimes(out / "model") != model and _mtimes(out / "artifact_detector") == det
    assert not list(out.glob(".*tmp*"))  # no temporary folder left behind


def test_pretrain_refuses_other_families(tmp_path):
    from portraitgen.pretrain.stage import PretrainError, run_pretrain

    with pytest.raises(PretrainError, match="model.family"):
        run_pretrain(params_from_dict({**TINY, "model": {"family": "flux", "resolution": 16}}), tmp_path)


# ------------------------------------------------------------------------------- the workflow wiring
# A stand-in `portraitgen` that writes the declared outputs of the stage it is asked to run, found in the
# stage table: the test checks which jobs a params edit reruns, not the stages themselves.
STUB = """#!{python}
import sys
from pathlib import Path
args = sys.argv[1:]
if args[0] == "mlflow-parent":
    sys.exit(0)
if args[0] == "progress":  # the rules' console filter: the job's output goes to its log
    Path(args[args.index("--log") + 1]).write_bytes(sys.stdin.buffer.read())
    sys.exit(0)
from portraitgen.stages import STAGES
verb = "launch-train" if args[0] == "launch-train" else args[0]
flags = [a for a in args if a == "--bench-only"]
stage = next(s for s in STAGES if s.command.split() == [verb, *flags])
out = Path(args[args.index("--out") + 1])
for o in stage.outputs:
    path = out / o.path
    if o.directory:
        path.mkdir(parents=True, exist_ok=True)
        (path / "model_index.json").write_text("{{}}")  # a model folder passes the params check
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{{}}" if path.suffix == ".json" else "x")
"""


def _jobs(stdout: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):$", stdout, re.M))


@pytest.mark.skipif(not SNAKEMAKE, reason="needs snakemake (extra 'workflow')")
def test_a_pretrain_param_reruns_pretrain_and_every_stage_that_loads_the_model(tmp_path):
    project = tmp_path / "project"
    for name in ("workflow", "portraitgen"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("Snakefile", "params.yaml"):
        shutil.copy2(REPO / name, project / name)
    os.symlink(os.readlink(REPO / "profiles"), project / "profiles")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["path"] = "results/pretrain/model"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    exe = stub_dir / "portraitgen"
    exe.write_text(STUB.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=os.pathsep.join([str(stub_dir), str(BIN), os.environ.get("PATH", "")]))

    def smk(*args):
        proc = subprocess.run([SNAKEMAKE, "--cores", "1", *args], cwd=project, env=env, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    smk()
    assert (project / "results" / "pretrain" / "metrics.json").is_file()
    assert "Nothing to be done" in smk("-n")
    params["pretrain"]["lr"] = 2 * params["pretrain"]["lr"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    jobs = _jobs(smk("-n"))
    assert {"pretrain", "invert", "precompute", "bench_embeddings", "train", "bench"} <= jobs, jobs
    assert "curate" not in jobs  # curate does not load the model
    smk()
    params["curate"]["min_side"] = 20  # and a curate setting never reruns pretraining
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    jobs = _jobs(smk("-n"))
    assert "curate" in jobs and "pretrain" not in jobs, jobs



def test_captions_speak_the_bench_vocabulary_without_its_prompts(faces16):
    """Each face gets its curate caption, free phrases and PortraitBench-style phrases built from the suite's
    own tables (one person each, parts drawn at random): the bench's prompts are then in-distribution text."""
    from portraitgen.bench import suite
    from portraitgen.pretrain.captions import BENCH_PHRASES, CAPTIONS_PER_FACE, bench_phrase, face_captions

    rng = np.random.default_rng(0)
    captions = [face_captions(f, rng) for f in faces16[:10]]
    assert all(len(cs) == len(set(cs)) == CAPTIONS_PER_FACE for cs in captions)
    shots = tuple(suite.SHOTS.values())
    bench_style = [c for cs in captions for c in cs if c.startswith(shots)]
    assert len(bench_style) == 10 * BENCH_PHRASES
    phrases = [bench_phrase(np.random.default_rng(s)) for s in range(200)]
    for text in phrases:
        assert " people:" not in text and any(f" {g} with " in text for g in suite.GENDERS.values())
        assert text.endswith(tuple(suite.LIGHTS.values()))
        assert any(f", {s}, " in text for s in suite.SETTINGS.values())
    # Every level of every axis is drawn.
    for table in (suite.SHOTS, suite.AGES, suite.SKINS, suite.LIGHTS, suite.SETTINGS):
        assert all(any(v in t for t in phrases) for v in table.values())

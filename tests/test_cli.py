"""The `portraitgen` command: bad input fails early with a clear message; generate; MLflow logging."""
import json

import numpy as np
import pytest
from PIL import Image

from portraitgen.cli import main

from helpers import write_params


@pytest.mark.parametrize("override,message", [
    ({"model.path": "/nonexistent/sd3-medium"}, "model.path: model folder not found: /nonexistent/sd3-medium"),
    ({"train.lr": "fast"}, "params key 'train.lr': expected float, got 'fast'"),
    ({"sample.group_size": 3}, "'sample.global_batch_size': expected a positive multiple of sample.group_size=3"),
    ({"prompts.source": "/nonexistent/prompts.txt"}, "prompts.source: file not found"),
    ({"reward.components": {"hpsv3": 1.0}}, "unknown reward 'hpsv3'"),
])
def test_bad_input_fails_before_any_work(tmp_path, capsys, override, message):
    params = write_params(tmp_path / "params.yaml", **override)
    out = tmp_path / "out"
    assert main(["train", "--params", str(params), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_missing_params_file(tmp_path, capsys):
    assert main(["train", "--params", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "params file not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short tracked training run shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = write_params(root / "params.yaml", **{
        "train.iterations": 2, "train.lr": 0.03, "train.log_images_every": 1, "tracking.enabled": True, "tracking.uri": uri,
        "tracking.experiment": "test-exp"})
    assert main(["train", "--params", str(params), "--out", str(root / "train")]) == 0
    return root, uri


def test_train_writes_outputs_and_logs_to_mlflow(trained_run):
    from mlflow.tracking import MlflowClient

    root, uri = trained_run
    out = root / "train"
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["iterations"] == 2 and np.isfinite(summary["reward_last"])
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    manifest = json.loads((out / "final" / "portraitgen.json").read_text())
    assert manifest["family"] == "sd3" and manifest["finetune"] == "lora" and manifest["ema"] is True
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("test-exp")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["portraitgen.stage"] == "train"
    assert run.data.params["train.lr"] == "0.03" and run.data.params["hardware.world_size"] == "1"
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert sorted(m.step for m in history) == [0, 1]
    for key in ("train/clip_fraction", "train/approx_kl", "train/kl", "train/grad_norm", "zero_std_fraction",
                "advantage/abs_mean", "time/sample", "time/train", "reward/brightness", "train/lr"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/iteration_00000.png", "samples/iteration_00001.png"}


def test_generate_from_a_training_run_is_deterministic(trained_run, tmp_path):
    root, _ = trained_run
    args = ["generate", "--model", str(root / "train"), "--prompt", "a portrait photo of a woman", "--prompt",
            "a headshot of a man", "--resolution", "32", "--steps", "4", "--num-images", "2"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    files = sorted((tmp_path / "a").glob("*.png"))
    assert len(files) == 4
    for f in files:
        img = Image.open(f)
        assert img.size == (32, 32)
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(tmp_path / "b" / f.name)))
    # Different seeds of one prompt differ.
    assert not np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(files[1])))


def test_generate_needs_a_family_for_plain_models(tmp_path, capsys):
    assert main(["generate", "--model", "builtin:tiny", "--prompt", "a", "--out", str(tmp_path)]) == 2
    assert "needs --family" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "a", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err

"""Every artifact a later stage trusts carries a checksum, verified on read (issue 15, item 1): one
flipped bit, in the data or in the header, is an error naming the file and the way to recover."""
from __future__ import annotations


import pandas as pd
import pytest
import torch

from portraitgen import integrity
from portraitgen.checkpointing import CheckpointError, list_checkpoints
from portraitgen.config import params_from_dict
from portraitgen.embeddings import EmbeddingCache, EmbeddingCacheError, build_cache
from portraitgen.export import ModelSpecError, load_trained
from portraitgen.manifest import FIELDS, ManifestError, read_manifest, write_manifest
from portraitgen.rewards import RewardError
from portraitgen.rewards.detector import DetectorConfig, FaceDetectorNet, load_detector, save_detector
from portraitgen.training import GRPOTrainer, TrainingSetupError

from conftest import flip_bit
from helpers import fast_params

HEADER, DATA = 12, -3  # byte offsets: inside a safetensors/parquet header, and near the end of the data


def test_verify_file_names_the_file_and_the_recovery(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    digest = integrity.write_checksum(path)
    assert integrity.verify_file(path, "fix it") == digest
    flip_bit(path, 50)
    with pytest.raises(integrity.IntegrityError, match=rf"{path} is corrupt: its sha256 .* does not match .*; fix it"):
        integrity.verify_file(path, "fix it")
    integrity.sidecar(path).unlink()
    with pytest.raises(integrity.IntegrityError, match=r"has no checksum \(a.bin.sha256 is missing\)"):
        integrity.verify_file(path, "fix it")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "out"
    params = params_from_dict(fast_params(**{"train.iterations": 1, "train.checkpoint_every": 1}))
    GRPOTrainer(params, out).run()
    return out, params


@pytest.mark.parametrize("offset", [HEADER, DATA])
def test_a_flipped_bit_in_a_checkpoint_is_never_resumed_from(trained, tmp_path, offset):
    import shutil

    src, params = trained
    out = tmp_path / "out"
    shutil.copytree(src, out)
    ckpt = list_checkpoints(next((out / "checkpoints").iterdir()))[-1]
    flip_bit(ckpt / "trainable.safetensors", offset)
    with pytest.raises(CheckpointError, match=rf"checkpoint {ckpt}: trainable.safetensors is corrupt.*rm -r {ckpt}"):
        GRPOTrainer(params, out).maybe_resume()


@pytest.mark.parametrize("offset", [HEADER, DATA])
def test_a_flipped_bit_in_exported_weights_is_named(trained, tmp_path, offset):
    import shutil

    src, _ = trained
    final = tmp_path / "final"
    shutil.copytree(src / "final", final)
    assert load_trained(str(final)) is not None
    flip_bit(final / "pytorch_lora_weights.safetensors", offset)
    with pytest.raises(ModelSpecError, match=r"exported model .*pytorch_lora_weights.safetensors is corrupt.*"
                                             r"snakemake --forcerun train"):
        load_trained(str(final))


@pytest.mark.parametrize("offset", [HEADER, DATA])
def test_a_flipped_bit_in_prompt_embeddings_is_not_another_model(sd3_policy, tmp_path, offset):
    from portraitgen.policies import model_fingerprint

    fingerprint = model_fingerprint("sd3", "builtin:tiny")
    path = build_cache(sd3_policy, ["a portrait"], tmp_path / "prompt_embeddings.safetensors", fingerprint)
    EmbeddingCache(path, fingerprint)
    flip_bit(path, offset)
    with pytest.raises(EmbeddingCacheError, match=rf"{path} is corrupt.*snakemake --forcerun precompute"):
        EmbeddingCache(path, fingerprint)


@pytest.mark.parametrize("offset", [HEADER, 200, DATA])
def test_a_flipped_bit_in_the_manifest_is_named(tmp_path, offset):
    rows = [{name: None for name, _ in FIELDS} | {"id": f"img{i}", "content_hash": f"h{i}", "image_path": f"{i}.png",
                                                 "caption": f"a portrait number {i}", "split": "train"}
            for i in range(20)]
    path = write_manifest(tmp_path / "manifest.parquet", rows)
    assert len(read_manifest(path)) == 20
    flip_bit(path, offset)
    with pytest.raises(ManifestError, match=rf"invert.manifest: {path} is corrupt.*snakemake --forcerun curate"):
        read_manifest(path)


def test_a_flipped_bit_in_the_detector_is_named(tmp_path):
    out = save_detector(FaceDetectorNet(8), DetectorConfig(width=8), {"accuracy": 1.0}, tmp_path / "detector")
    load_detector(out)
    flip_bit(out / "detector.safetensors", DATA)
    with pytest.raises(RewardError, match=r"detector .*detector.safetensors is corrupt.*--forcerun precompute"):
        load_detector(out)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_exemplar_rewards_name_the_file_and_the_rule(exemplar_index, tmp_path, damage):
    from portraitgen.precompute import reward_config_hash

    over = {"prompts.source": "exemplars", "train.exemplars.index": str(exemplar_index),
            "train.exemplars.per_group": 1}
    params = params_from_dict(fast_params(**over))
    index = pd.read_parquet(exemplar_index)
    table = pd.DataFrame({"id": index["id"], "content_hash": index["content_hash"], "caption": index["caption"],
                          "reward_config": reward_config_hash(params), "brightness": 0.5, "total": 0.5})
    path = tmp_path / "exemplar_rewards.parquet"
    table.to_parquet(path, index=False)
    integrity.write_checksum(path)
    over["train.exemplars.rewards"] = str(path)
    GRPOTrainer(params_from_dict(fast_params(**over)), tmp_path / "ok")  # intact: accepted
    if damage == "flip":
        flip_bit(path, len(path.read_bytes()) // 2)
    else:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(TrainingSetupError, match=rf"train.exemplars.rewards: {path} is corrupt.*"
                                                 r"snakemake --forcerun precompute"):
        GRPOTrainer(params_from_dict(fast_params(**over)), tmp_path / "out")


def test_a_flipped_bit_in_the_exemplar_index_never_garbles_the_captions(exemplar_index, tmp_path):
    import shutil

    from portraitgen.exemplars import ExemplarBank, ExemplarError

    folder = tmp_path / "invert"
    shutil.copytree(exemplar_index.parent, folder)
    index = folder / "index.parquet"
    over = {"prompts.source": "exemplars", "train.exemplars.index": str(index), "train.exemplars.per_group": 1}
    params = params_from_dict(fast_params(**over))
    flip_bit(index, len(index.read_bytes()) // 2)
    with pytest.raises(TrainingSetupError, match=rf"train.exemplars.index: {index} is corrupt.*--forcerun invert"):
        GRPOTrainer(params, tmp_path / "out")
    with pytest.raises(ExemplarError, match=rf"{index} is corrupt.*--forcerun invert"):
        ExemplarBank(index, sigmas=torch.linspace(1, 0, 7))

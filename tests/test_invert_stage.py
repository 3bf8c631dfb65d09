"""The invert stage: shards, index, reuse, corruption, partial runs, and the report."""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from portraitgen.config import params_from_dict
from portraitgen.invert import InvertError, run_invert
from portraitgen.shards import ShardError, read_shard, write_shard

from helpers import fast_params, make_manifest


def _params(manifest, **overrides):
    return params_from_dict(fast_params(**{"invert.manifest": str(manifest), "invert.shard_size": 2,
                                           "invert.diagnostic_samples": 2, **overrides}))


def test_shard_round_trip_is_bit_exact_and_corruption_is_named(tmp_path):
    tensors = {"latents": torch.randn(3, 7, 4, 4, 4), "trainable": torch.randint(0, 2, (3, 6), dtype=torch.uint8)}
    path = tmp_path / "shard-x.safetensors"
    write_shard(path, tensors, {"ids": ["a", "b", "c"]})
    back, meta = read_shard(path)
    assert meta["ids"] == ["a", "b", "c"]
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard .*shard-x.safetensors is corrupt"):
        read_shard(path)


def test_invert_stage_writes_shards_index_report_and_reuses_work(tmp_path):
    manifest = make_manifest(tmp_path / "curate", n=5)
    out = tmp_path / "invert"
    p = _params(manifest)
    summary = run_invert(p, out)
    index = pd.read_parquet(out / "index.parquet")
    assert len(index) == 5 and "bench-only" not in set(index["id"])  # only the train split
    assert summary["exemplars_inverted"] == 5 and summary["shards"] == 3
    assert (out / "report.html").read_text().count("<tr>") >= 5 and (out / "residuals.png").is_file()
    shard_files = sorted((out / "shards").glob("shard-*.safetensors"))
    assert len(shard_files) == 3
    tensors, meta = read_shard(out / index["shard"][0])
    T = p.sample.num_steps
    assert tensors["latents"].shape == (2, T + 1, 4, 4, 4) and tensors["sigmas"].shape == (T + 1,)
    assert meta["ids"] == list(index["id"][:2]) and meta["config"]["mode"] == "bridge"
    assert np.isfinite(index["psnr"]).all() and (index["psnr_vae"] > index["psnr"]).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["residual_ms_by_step"]) == T and metrics["images_per_second"] > 0

    # Re-run: nothing to do.
    again = run_invert(p, out)
    assert again["exemplars_inverted"] == 0 and again["shards_reused"] == 3

    # Change one image: only that exemplar is inverted again; its shard-mate is copied bit for bit.
    df = pd.read_parquet(manifest)
    changed_id = df["id"][1]
    by_id = index.set_index("id")
    mate = next(i for i in index["id"] if i != changed_id and by_id.loc[i, "shard"] == by_id.loc[changed_id, "shard"])
    old_tensors, _ = read_shard(out / by_id.loc[mate, "shard"])
    mate_latents = old_tensors["latents"][int(by_id.loc[mate, "offset"])]
    img_path = manifest.parent / df["image_path"][1]
    arr = np.asarray(Image.open(img_path)).copy()
    arr[:8, :8] = 255 - arr[:8, :8]
    Image.fromarray(arr).save(img_path)
    df.loc[1, "content_hash"] = hashlib.sha256(img_path.read_bytes()).hexdigest()
    df.to_parquet(manifest, index=False)
    changed = run_invert(p, out)
    assert changed["exemplars_inverted"] == 1 and changed["exemplars_copied"] == 1
    assert changed["shards_reused"] == 2
    assert len(list((out / "shards").glob("shard-*.safetensors"))) == 3  # the stale shard was pruned
    row = pd.read_parquet(out / "index.parquet").set_index("id")
    new_tensors, _ = read_shard(out / row.loc[mate, "shard"])
    assert torch.equal(new_tensors["latents"][int(row.loc[mate, "offset"])], mate_latents)
    assert row.loc[changed_id, "content_hash"] != by_id.loc[changed_id, "content_hash"]


def test_parts_merge_and_an_interrupted_run_resumes(tmp_path):
    manifest = make_manifest(tmp_path / "curate", n=5)
    out = tmp_path / "invert"
    p = _params(manifest)
    part0 = run_invert(p, out, part=0, num_parts=2)
    assert part0["exemplars_inverted"] == 3 and not (out / "index.parquet").exists()  # shards 0 and 2 (2 + 1)
    with pytest.raises(ShardError, match="missing"):
        run_invert(p, out, merge_only=True)
    # A crash mid-write leaves a temp file and maybe a shard without its checksum: neither is trusted.
    (out / "shards" / ".tmp-shard-junk.safetensors-1").write_bytes(b"partial")
    part1 = run_invert(p, out, part=1, num_parts=2)
    assert part1["exemplars_inverted"] == 2
    merged = run_invert(p, out, merge_only=True)
    assert merged["exemplars"] == 5
    # Resume after a kill: remove one finished shard's checksum (as if killed before it was written).
    victim = sorted((out / "shards").glob("shard-*.safetensors"))[0]
    (victim.parent / (victim.name + ".sha256")).unlink()
    resumed = run_invert(p, out)
    assert resumed["exemplars_inverted"] + resumed["exemplars_copied"] <= 2 and resumed["shards_reused"] == 2


@pytest.mark.parametrize("mode", ["euler", "fixed_point", "bridge"])
def test_modes_report_their_diagnostics(tmp_path, mode):
    manifest = make_manifest(tmp_path / "curate", n=2)
    summary = run_invert(_params(manifest, **{"invert.mode": mode}), tmp_path / "out")
    assert summary["mode"] == mode and np.isfinite(summary["residual_ms_mean"])
    if mode == "bridge":  # ends exactly at the real latent: its VAE reconstruction is the ceiling
        tensors, _ = read_shard(next((tmp_path / "out" / "shards").glob("shard-*.safetensors")))
        assert not tensors["trainable"][:, -1].any()


def _trajectories(out) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted((out / "shards").glob("shard-*.safetensors")):
        tensors, meta = read_shard(shard)
        found.update(zip(meta["ids"], tensors["latents"]))
    return found


def test_each_deterministic_mode_computes_its_own_trajectories(tmp_path):
    """fixed_point refines euler's start points (x_i solved so that a forward Euler step from it lands on
    x_{i+1}): the stage must run the mode it is asked for, not just record its name."""
    manifest = make_manifest(tmp_path / "curate", n=2)
    got = {}
    for mode in ("euler", "fixed_point"):
        run_invert(_params(manifest, **{"invert.mode": mode}), tmp_path / mode)
        got[mode] = _trajectories(tmp_path / mode)
    assert set(got["euler"]) == set(got["fixed_point"]) and len(got["euler"]) == 2
    for i in got["euler"]:
        euler, fixed = got["euler"][i], got["fixed_point"][i]
        assert torch.equal(euler[-1], fixed[-1])  # both start from the image's latent ...
        assert (euler[0] - fixed[0]).abs().max() > 1e-4  # ... and reach different noise


def test_bad_manifest_is_reported(tmp_path):
    bad = tmp_path / "m.parquet"
    pd.DataFrame({"id": ["a"], "caption": ["x"]}).to_parquet(bad)
    with pytest.raises(InvertError, match="missing column\\(s\\) content_hash, image_path"):
        run_invert(_params(bad), tmp_path / "out")
    with pytest.raises(InvertError, match="manifest not found"):
        run_invert(_params(tmp_path / "nope.parquet"), tmp_path / "out")

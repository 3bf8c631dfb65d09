"""The curate stage on real photos shipped in wheels plus generated bad inputs.

One folder holds the real portraits (scikit-image's astronaut, matplotlib's Grace Hopper, LFW faces) in
every format and colour mode the stage must convert, and the bad inputs the issue lists. Each file's
expected table and reason is written next to it, and every test asserts on what the stage wrote.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageFilter

from portraitgen.config import ConfigError, params_from_dict
from portraitgen.curate import CurateError, REASONS, run_curate

from helpers import fast_params

RES = 32  # tests' model.resolution (tests.helpers.fast_params)


# ------------------------------------------------------------------------------------------ inputs
def _lfw(i: int) -> np.ndarray:
    from skimage import data

    a = data.lfw_subset()[i]
    return np.clip(np.round(a * 255), 0, 255).astype(np.uint8) if a.dtype != np.uint8 else a


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_inputs(root: Path) -> dict[str, tuple[str, str]]:
    """Write the test photos under ``root``; returns rel path -> (table, reason) expected."""
    import skimage.data
    from matplotlib import cbook

    astro_bytes = (Path(skimage.data.__file__).parent / "astronaut.png").read_bytes()
    grace_path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    grace = Image.open(grace_path).convert("RGB")
    astro = Image.open(io.BytesIO(astro_bytes)).convert("RGB")
    expected: dict[str, tuple[str, str]] = {}

    def put(rel: str, data: bytes, table: str, reason: str = "") -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[rel] = (table, reason)

    flip = Image.Transpose.FLIP_LEFT_RIGHT
    put("astronaut.png", astro_bytes, "kept")
    put("grace_hopper.jpg", grace_path.read_bytes(), "kept")
    put("dups/astronaut_copy.png", astro_bytes, "rejected", "duplicate")
    smaller = grace.resize((int(grace.width * 0.85), int(grace.height * 0.85)), Image.Resampling.LANCZOS)
    put("dups/grace_small.jpg", _enc(smaller, "JPEG", quality=80), "rejected", "near_duplicate")
    # A sideways camera: the mirrored Grace Hopper stored rotated, EXIF orientation 6 ("rotate 90 CW").
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", _enc(grace.transpose(flip).transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92,
                            exif=exif.tobytes()), "kept")
    put("cmyk.jpg", _enc(astro.transpose(flip).convert("CMYK"), "JPEG", quality=92), "kept")
    rgba = Image.fromarray(_lfw(1)).convert("RGBA")
    alpha = np.full((25, 25), 255, np.uint8)
    alpha[:2] = 0  # transparent top and bottom rows
    alpha[-2:] = 0
    rgba.putalpha(Image.fromarray(alpha))
    put("alpha.png", _enc(rgba, "PNG"), "kept")
    put("palette.png", _enc(Image.fromarray(_lfw(2)).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE),
                            "PNG"), "kept")
    put("webp/face.webp", _enc(Image.fromarray(_lfw(3)), "WEBP", lossless=True), "kept")
    put("grey16.png", _enc(Image.fromarray(_lfw(7).astype(np.uint16) * 257), "PNG"), "kept")
    put("truncated.jpg", grace_path.read_bytes()[: grace_path.stat().st_size // 2], "rejected", "unreadable")
    put("empty.jpg", b"", "rejected", "unreadable")
    put("notes.jpg", b"these are my notes, not a photo\n", "rejected", "unreadable")
    put("tiny.png", _enc(Image.fromarray(_lfw(5)).resize((16, 16)), "PNG"), "rejected", "too_small")
    noise = (np.random.default_rng(0).random((100, 600, 3)) * 255).astype(np.uint8)
    put("strip.png", _enc(Image.fromarray(noise), "PNG"), "rejected", "extreme_aspect")
    put("coffee.png", _enc(Image.fromarray(skimage.data.coffee()), "PNG"), "rejected", "no_face")
    group = Image.new("RGB", (1024, 600), (128, 128, 128))
    group.paste(astro, (0, 44))
    group.paste(grace, (512, 0))
    put("group.png", _enc(group, "PNG"), "rejected", "too_many_faces")
    canvas = Image.new("RGB", (800, 800), (90, 110, 130))
    canvas.paste(grace.resize((128, 150)), (340, 320))
    put("small_face.png", _enc(canvas, "PNG"), "rejected", "face_too_small")
    put("blurry.jpg", _enc(astro.filter(ImageFilter.GaussianBlur(6)), "JPEG", quality=90), "rejected", "blurry")
    put("dark.png", _enc(Image.fromarray((np.asarray(grace) * 0.07).astype(np.uint8)), "PNG"), "rejected",
        "bad_exposure")
    put("excluded/face.png", _enc(Image.fromarray(_lfw(6)), "PNG"), "rejected", "excluded")
    return expected


def _hashes(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _params(**curate) -> "Params":  # noqa: F821
    data = fast_params()
    data["curate"] = {**data.get("curate", {}), **curate}
    return params_from_dict(data)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate-inputs")
    src = root / "photos"
    expected = make_inputs(src)
    (root / "exclude.txt").write_text("# paths relative to the source folder, or sha256 / ids\nexcluded/face.png\n")
    (root / "captions.csv").write_text(
        "path,caption,age\n"
        "astronaut.png,a portrait photo of an astronaut in an orange suit,40s\n"
        "palette.png,,\n"  # an empty caption: the template must fill in, never ""
        "not_there.png,a caption for a file that does not exist,\n")
    before = _hashes(root)
    params = _params(source=str(src), exclude=str(root / "exclude.txt"), captions=str(root / "captions.csv"))
    out = tmp_path_factory.mktemp("curate-out")
    metrics = run_curate(params, out, workers=2)
    return {"root": root, "src": src, "expected": expected, "before": before, "params": params, "out": out,
            "metrics": metrics}


def _tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(out / "rejected.parquet")


def _rel(src: Path, p: str) -> str:
    return Path(p).relative_to(src).as_posix()


# ------------------------------------------------------------------------------------------ tests
def test_every_input_lands_in_the_right_table_with_the_right_reason(inputs):
    kept, rejected = _tables(inputs["out"])
    src = inputs["src"]
    got = {_rel(src, p): ("kept", "") for p in kept["source_path"]}
    for p, reason in zip(rejected["source_path"], rejected["reason"]):
        assert _rel(src, p) not in got, f"{p} is in both tables"
        got[_rel(src, p)] = ("rejected", reason)
    assert got == inputs["expected"]
    details = dict(zip((_rel(src, p) for p in rejected["source_path"]), rejected["detail"]))
    assert details["empty.jpg"] == "empty file (0 bytes)"
    assert "not an image file" in details["notes.jpg"]
    assert "truncated" in details["truncated.jpg"]
    assert details["dups/astronaut_copy.png"] == f"same bytes as {src / 'astronaut.png'}"
    # The near-duplicate names the original it lost to: the larger, better image is the one kept.
    assert str(src / "grace_hopper.jpg") in details["dups/grace_small.jpg"]
    assert "curate.min_side=24" in details["tiny.png"] and "curate.max_aspect" in details["strip.png"]
    assert "too dark" in details["dark.png"] and "curate.max_blur" in details["blurry.jpg"]
    assert "2 faces" in details["group.png"] and "curate.min_face_frac" in details["small_face.png"]
    m = inputs["metrics"]
    assert (m["total"], m["kept"], m["rejected"]) == (len(got), len(kept), len(rejected))
    assert set(m["rejected_by_reason"]) == set(REASONS)
    assert m["rejected_by_reason"] == {r: sum(v == ("rejected", r) for v in got.values()) for r in REASONS}
    assert json.loads((inputs["out"] / "metrics.json").read_text())["rejected_by_reason"] == m["rejected_by_reason"]
    # Unreadable files still have their content hash; a 0-byte file has the empty string's.
    row = rejected[rejected["source_path"] == str(src / "empty.jpg")].iloc[0]
    assert row["content_hash"] == hashlib.sha256(b"").hexdigest()


def test_manifest_contract(inputs):
    out, src = inputs["out"], inputs["src"]
    kept, _ = _tables(out)
    for col in ("id", "content_hash", "source_path", "image_path", "crop_box", "face_box", "width", "height",
                "blur", "brightness", "contrast", "clipped", "sharpness", "quality", "caption", "split"):
        assert col in kept.columns, col
    assert list(kept["id"]) == sorted(kept["id"]) and kept["id"].is_unique
    for _, r in kept.iterrows():
        data = Path(r["source_path"]).read_bytes()
        assert r["content_hash"] == hashlib.sha256(data).hexdigest()
        assert r["id"] == r["content_hash"][:16] and r["image_path"] == f"images/{r['id']}.png"
        x0, y0, x1, y1 = (int(v) for v in r["crop_box"])
        fx0, fy0, fx1, fy1 = (int(v) for v in r["face_box"])
        assert x1 - x0 == y1 - y0 > 0  # square
        assert 0 <= x0 and 0 <= y0 and x1 <= r["width"] and y1 <= r["height"]  # inside the (EXIF-rotated) source
        assert x0 <= fx0 < fx1 <= x1 and y0 <= fy0 < fy1 <= y1  # holds the face
        with Image.open(out / r["image_path"]) as crop:
            assert crop.format == "PNG" and crop.size == (RES, RES) and crop.mode == "RGB"
        assert r["caption"].strip() and r["split"] in ("train", "bench_reference")
        for col in ("blur", "brightness", "contrast", "clipped", "quality"):
            assert 0.0 <= r[col] <= 1.0, (col, r[col])
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in kept["id"])
    by = {_rel(src, p): r for p, (_, r) in zip(kept["source_path"], kept.iterrows())}
    # EXIF rotation honoured: stored 600x512, seen as 512x600, and the face where the mirrored original has it.
    rot, grace = by["rotated.jpg"], by["grace_hopper.jpg"]
    assert (rot["width"], rot["height"], rot["exif_orientation"]) == (512, 600, 6)
    mirrored_face = np.array([512 - grace["face_box"][2], grace["face_box"][1], 512 - grace["face_box"][0],
                              grace["face_box"][3]])
    assert np.abs(np.asarray(rot["face_box"]) - mirrored_face).max() <= 16
    # Colour modes converted: CMYK stays colour; greyscale, palette and 16-bit greyscale read as grey.
    assert by["cmyk.jpg"]["source_mode"] == "CMYK" and not by["cmyk.jpg"]["greyscale"]
    assert by["cmyk.jpg"]["colourfulness"] > 0.05
    assert (by["palette.png"]["source_mode"], by["grey16.png"]["source_mode"]) == ("P", "I;16")
    assert by["grey16.png"]["greyscale"] and by["webp/face.webp"]["format"] == "WEBP"
    # Alpha composited on white: the transparent top rows of the 25x25 face are white in the crop.
    assert by["alpha.png"]["source_mode"] == "RGBA"
    crop = np.asarray(Image.open(out / by["alpha.png"]["image_path"]))
    assert crop[0].min() >= 250 and crop[RES // 2].min() < 200


def test_no_input_file_is_modified(inputs):
    assert _hashes(inputs["root"]) == inputs["before"]


def test_captions_sidecar_then_template_never_empty(inputs):
    kept, _ = _tables(inputs["out"])
    src = inputs["src"]
    by = {_rel(src, p): r for p, (_, r) in zip(kept["source_path"], kept.iterrows())}
    assert by["astronaut.png"]["caption"] == "a portrait photo of an astronaut in an orange suit"
    assert by["astronaut.png"]["caption_source"] == "sidecar"
    assert json.loads(by["astronaut.png"]["attributes"]) == {"age": "40s"}
    assert by["palette.png"]["caption_source"] == "template"  # its sidecar caption is empty
    for rel, r in by.items():
        assert r["caption"].strip(), rel
        if r["caption_source"] == "template":
            assert ("black and white" in r["caption"]) == bool(r["greyscale"]), rel
            assert r["caption"].startswith("a ") and "portrait photo of a person" in r["caption"]
    assert by["grey16.png"]["caption"].startswith("a tight close-up black and white portrait photo")
    assert by["grace_hopper.jpg"]["caption"].startswith("a close-up colour portrait photo")
    counts = inputs["metrics"]["captions"]
    assert counts["sidecar"] == 1 and counts["sidecar_empty"] == 1 and counts["sidecar_rows_unmatched"] == 1
    assert counts["template"] == len(kept) - 1


def test_same_inputs_give_byte_identical_outputs(inputs, tmp_path):
    """A fresh run with another worker count: identical manifest, rejection table and crops."""
    out2 = tmp_path / "out2"
    run_curate(inputs["params"], out2, workers=1)
    out1 = inputs["out"]
    for name in ("manifest.parquet", "rejected.parquet"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    for f in (out1 / "images").iterdir():
        assert f.read_bytes() == (out2 / "images" / f.name).read_bytes()
    import pyarrow.parquet as pq

    meta = pq.read_metadata(out1 / "manifest.parquet").metadata
    assert set(meta) == {b"ARROW:schema", b"portraitgen.curate"}  # no pandas block, no timestamps


def test_parts_then_merge_equal_one_run(inputs, tmp_path):
    out = tmp_path / "parts"
    p = inputs["params"]
    files = [run_curate(p, out, part=0, num_parts=3, workers=1)["files"]]
    with pytest.raises(CurateError, match=r"part 1 of 3 is missing: .*part-0001-of-0003\.jsonl"):
        run_curate(p, out, merge_only=True, num_parts=3)
    for i in (1, 2):
        files.append(run_curate(p, out, part=i, num_parts=3, workers=1)["files"])
    assert not (out / "manifest.parquet").exists()  # a part job writes its part only
    assert sum(files) == inputs["metrics"]["total"] and min(files) > 0
    run_curate(p, out, merge_only=True, num_parts=3)
    assert (out / "manifest.parquet").read_bytes() == (inputs["out"] / "manifest.parquet").read_bytes()
    assert (out / "rejected.parquet").read_bytes() == (inputs["out"] / "rejected.parquet").read_bytes()
    assert len(list((out / "parts").glob("part-*-of-0003.jsonl"))) == 3


def test_rerun_after_adding_images_processes_only_the_new_ones(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in (10, 11, 12):
        Image.fromarray(_lfw(i)).save(src / f"face_{i}.png")
    params = _params(source=str(src))
    out = tmp_path / "out"
    first = run_curate(params, out, workers=1)
    assert (first["processed"], first["cached"], first["kept"]) == (3, 0, 3)
    for i in (13, 14):
        Image.fromarray(_lfw(i)).save(src / f"face_{i}.png")
    second = run_curate(params, out, workers=2)
    assert (second["processed"], second["cached"], second["kept"]) == (2, 3, 5)
    # ... and gives exactly what a fresh run over all five gives.
    fresh = tmp_path / "fresh"
    run_curate(params, fresh, workers=1)
    assert (out / "manifest.parquet").read_bytes() == (fresh / "manifest.parquet").read_bytes()
    # Thresholds are applied after the cache: changing one re-analyses nothing. One that rejects every
    # image is an error naming the counts (curate.min_kept), and the previous outputs stay as they were.
    cache_before = {f: f.stat().st_mtime_ns for f in (out / "cache").rglob("*") if f.is_file()}
    manifest_before = (out / "manifest.parquet").read_bytes()
    with pytest.raises(CurateError, match=r"0 of 5 image\(s\) kept.*blurry 5"):
        run_curate(_params(source=str(src), max_blur=0.01), out, workers=1)
    assert {f: f.stat().st_mtime_ns for f in (out / "cache").rglob("*") if f.is_file()} == cache_before
    assert (out / "manifest.parquet").read_bytes() == manifest_before
    # Crops are rendered for images that pass: none under a strict threshold, then on demand in the merge.
    strict = tmp_path / "strict"
    with pytest.raises(CurateError):
        run_curate(_params(source=str(src), max_blur=0.01), strict, workers=1)
    assert not list((strict / "cache").rglob("*[0-9a-f].png"))
    loose = run_curate(params, strict, workers=1)
    assert (loose["processed"], loose["kept"]) == (0, 5)
    assert (strict / "manifest.parquet").read_bytes() == (fresh / "manifest.parquet").read_bytes()
    # A removed photo leaves the manifest and its crop leaves images/.
    kept_before = set(pd.read_parquet(fresh / "manifest.parquet")["id"])
    (src / "face_10.png").unlink()
    run_curate(params, out, workers=1)
    ids = set(pd.read_parquet(out / "manifest.parquet")["id"])
    assert len(ids) == 4 and ids < kept_before
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(ids)


def test_builtin_demo_set_curates_real_portraits_offline(tmp_path):
    out = tmp_path / "curate"
    metrics = run_curate(_params(), out, workers=2)  # default source: builtin:demo
    kept, rejected = _tables(out)
    names = {Path(p).name: r for p, (_, r) in zip(kept["source_path"], kept.iterrows())}
    for name in ("astronaut.png", "grace_hopper.jpg"):  # both famous portraits found and kept
        assert names[name]["caption_source"] == "sidecar" and "portrait photo of" in names[name]["caption"]
        assert "public domain" in names[name]["origin"]
    lfw = kept[kept["source_path"].str.contains("/lfw/face_")]
    assert len(lfw) >= 95 and (lfw["crop_side"] == 25).all()  # 25 px faces, upscaled 1.28x to 32 px
    # The background patches and the cameraman (in profile) have no face; the Haar cascade misses 2 LFW faces.
    assert set(rejected["reason"]) == {"no_face"}
    names = {Path(p).name for p in rejected["source_path"]}
    assert names >= {"camera.png", *(f"background_{j:03d}.png" for j in range(8))} and len(names) <= 9 + 5
    assert metrics["split"]["bench_reference"] > 0 and metrics["split"]["train"] > metrics["split"]["bench_reference"]
    origin = json.loads((out / "demo" / "ORIGIN.json").read_text())
    assert len(origin) == metrics["total"] and all(origin.values())
    # The same thresholds at a real model's resolution reject the 25 px faces instead of upscaling 20x.
    big = run_curate(params_from_dict({**fast_params(), "model": {**fast_params()["model"], "resolution": 512}}),
                     tmp_path / "curate512", workers=2)
    assert big["rejected_by_reason"]["upscale_too_large"] >= 95 and big["kept"] == 2


def test_split_is_stable_when_images_are_added():
    from portraitgen.curate import split_of

    c = _params(bench_fraction=0.25).curate
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(2000)]
    splits = [split_of(i, c) for i in ids]
    assert abs(splits.count("bench_reference") / len(ids) - 0.25) < 0.03
    assert [split_of(i, c) for i in ids[:100]] == splits[:100]  # depends on the id alone


def test_square_crop_and_phash():
    from portraitgen.faces import square_crop
    from portraitgen.quality import hamming, phash

    assert square_crop((40, 40, 60, 60), 200, 100, 2.0) == (30, 30, 70, 70)  # centred
    assert square_crop((0, 0, 20, 20), 200, 100, 2.0) == (0, 0, 40, 40)  # shifted inside, face kept whole
    assert square_crop((40, 10, 90, 60), 200, 100, 3.0) == (15, 0, 115, 100)  # shrunk to the short side
    import skimage.data

    img = skimage.data.astronaut()
    small = np.asarray(Image.fromarray(img).resize((300, 300), Image.Resampling.LANCZOS))
    assert hamming(phash(img), phash(small)) <= 2
    assert hamming(phash(img), phash(img[:, ::-1])) > 12  # a mirrored photo is another photo


def test_bad_params_and_sources_are_named(tmp_path, capsys):
    from portraitgen.cli import main

    with pytest.raises(ConfigError, match=r"curate\.max_blur"):
        _params(max_blur=2.0)
    with pytest.raises(ConfigError, match=r"unknown params key 'curate\.blur'"):
        params_from_dict({**fast_params(), "curate": {"blur": 0.5}})
    data = fast_params()
    data["curate"] = {"source": str(tmp_path / "no-such-folder")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    assert main(["curate", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "portraitgen curate: error: params key 'curate.source': not found" in err
    data["curate"] = {"source": "builtin:demo", "captions": str(tmp_path / "missing.csv")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    assert main(["curate", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "params key 'curate.captions': file not found" in capsys.readouterr().err


def test_list_file_source_with_captions_and_include(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in (20, 21, 22):
        Image.fromarray(_lfw(i)).save(src / f"f{i}.png")
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"path": f"photos/f{i}.png", "caption": f"person number {i}"}) + "\n"
                               for i in (20, 21, 22)) + json.dumps({"path": "photos/gone.png"}) + "\n")
    include = tmp_path / "include.txt"
    digest = hashlib.sha256((src / "f21.png").read_bytes()).hexdigest()
    include.write_text(f"photos/f20.png\n{digest[:16]}\n")  # by path and by id
    m = run_curate(_params(source=str(listing), include=str(include)), tmp_path / "out", workers=1)
    kept, rejected = _tables(tmp_path / "out")
    assert sorted(kept["caption"]) == ["person number 20", "person number 21"]
    assert set(kept["caption_source"]) == {"sidecar"}
    reasons = dict(zip((Path(p).name for p in rejected["source_path"]), rejected["reason"]))
    assert reasons == {"f22.png": "not_included", "gone.png": "not_included"}
    assert m["total"] == 4


def test_vlm_captions_from_a_local_model(tmp_path, monkeypatch):
    """A tiny random BLIP captioner built in code, saved and loaded offline through the Auto classes."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                              BlipProcessor)

    words = "a photo of the person with man woman smiling portrait in light dark hair glasses".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"), model_max_length=32)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    proc = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model_dir = tmp_path / "tiny-blip"
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(
        model_dir)
    proc.save_pretrained(model_dir)

    src = tmp_path / "photos"
    src.mkdir()
    for i in (30, 31):
        Image.fromarray(_lfw(i + 1)).save(src / f"f{i}.png")
    out = tmp_path / "out"
    m = run_curate(_params(source=str(src), caption_model=str(model_dir)), out, workers=1)
    kept, _ = _tables(out)
    # This seed's model says something for both crops: an all-empty (or template) result is a failure.
    assert (m["captions"]["vlm"], m["captions"]["vlm_empty"]) == (2, 0)
    vocab = set(words)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    for _, r in kept.iterrows():
        assert r["caption_source"] == "vlm" and set(r["caption"].split()) <= vocab  # the model's words
        # ... exactly its greedy caption of the curated crop.
        crop = Image.open(out / r["image_path"]).convert("RGB")
        with torch.no_grad():
            ids = model.generate(**proc(images=crop, return_tensors="pt"), max_new_tokens=48, do_sample=False)
        assert r["caption"] == " ".join(proc.batch_decode(ids, skip_special_tokens=True)[0].split())
    cached = list((out / "cache" / "captions").rglob("*.txt"))
    assert len(cached) == 2
    first = (out / "manifest.parquet").read_bytes()
    # A rerun takes the captions from the cache: the model is not even loaded.
    from portraitgen.vlm_captioner import VlmCaptioner

    monkeypatch.setattr(VlmCaptioner, "_load", lambda self: pytest.fail("the model was loaded again"))
    run_curate(_params(source=str(src), caption_model=str(model_dir)), out, workers=1)
    assert (out / "manifest.parquet").read_bytes() == first


def test_cli_logs_an_mlflow_run_with_counts_and_the_contact_sheet(tmp_path):
    from mlflow.tracking import MlflowClient

    from portraitgen.cli import main

    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(_lfw(40)).save(src / "face.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = fast_params()
    data["curate"] = {"source": str(src)}
    data["tracking"] = {"enabled": True, "uri": uri, "experiment": "curate-test"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["curate", "--params", str(tmp_path / "params.yaml"), "--out", str(out), "--workers", "1"]) == 0
    html = (out / "report.html").read_text()
    assert "Kept (1 of 1)" in html and "Rejected: unreadable (1 of 1)" in html and "data:image/jpeg;base64," in html
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("curate-test").experiment_id])
    assert run.data.tags["portraitgen.stage"] == "curate" and run.info.status == "FINISHED"
    assert run.data.metrics["kept"] == 1 and run.data.metrics["rejected_by_reason.unreadable"] == 1
    assert run.data.params["curate.source"] == str(src) and run.data.params["model.resolution"] == str(RES)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "contact_sheet.png", "metrics.json", "manifest.parquet"} <= artifacts


def test_workers_do_not_hang_after_the_parent_used_torch_threads(tmp_path):
    """Forked workers of a parent whose torch/OpenMP thread pool ran hang (seen in the full test suite);
    the stage's workers start from a fork server instead."""
    import subprocess
    import sys

    src = tmp_path / "photos"
    src.mkdir()
    for i in (50, 51, 52):
        Image.fromarray(_lfw(i)).save(src / f"f{i}.png")
    script = f"""
import torch
torch.set_num_threads(2)
x = torch.randn(800, 800)
for _ in range(5):
    x @ x
from portraitgen.config import params_from_dict
from portraitgen.curate import run_curate
if __name__ == "__main__":
    p = params_from_dict({{"model": {{"resolution": 32}}, "tracking": {{"enabled": False}},
                          "curate": {{"source": {str(src)!r}}}}})
    print("kept", run_curate(p, {str(tmp_path / 'out')!r}, workers=2)["kept"])
"""
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "kept 3"

"""AI-Portrait: the classic backend against synthetic skin artifacts on real portraits, and the detector
backend (training loop, held-out report, CLI on tiny-model generations, loading as a reward)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from portraitgen.rewards import RewardError, RewardSet, build_reward
from portraitgen.rewards.face_region import detect_face
from portraitgen.rewards.real_images import augment, builtin_portraits


def as_batch(arrays) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255.0 for a in arrays])


# --------------------------------------------------------------------------------------------------
# Synthetic artifacts, placed relative to the detected face
# --------------------------------------------------------------------------------------------------
def add_oily_highlights(rgb: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """Whitish Gaussian sheen on forehead, cheeks and nose (specular "oily" skin)."""
    box = detect_face(rgb)
    H, W = rgb.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W]
    alpha = np.zeros((H, W), np.float32)
    for fx, fy, r in [(0.5, 0.15, 0.07), (0.42, 0.18, 0.05), (0.3, 0.6, 0.06), (0.7, 0.6, 0.06), (0.5, 0.55, 0.05)]:
        cx, cy, rr = box.x + fx * box.w, box.y + fy * box.h, r * box.w
        alpha = np.maximum(alpha, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rr ** 2)))
    alpha = strength * alpha[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + np.array([255, 252, 248], np.float32) * alpha
    return out.clip(0, 255).round().astype(np.uint8)


def smooth_skin(rgb: np.ndarray) -> np.ndarray:
    """A beauty filter: two edge-preserving bilateral passes over the face (waxy, "plastic" skin)."""
    import cv2

    box = detect_face(rgb)
    m = 0.1
    face = box.crop(rgb, margin=m)
    sigma = max(2, box.w // 25)
    sm = cv2.bilateralFilter(cv2.bilateralFilter(face, 0, 30, sigma), 0, 30, sigma)
    out = rgb.copy()
    y0, x0 = max(0, box.y - int(round(box.h * m))), max(0, box.x - int(round(box.w * m)))
    out[y0:y0 + sm.shape[0], x0:x0 + sm.shape[1]] = sm
    return out


def oversaturate(rgb: np.ndarray, factor: float = 1.6) -> np.ndarray:
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


@pytest.fixture(scope="module")
def portraits():
    """The shipped real portraits at their size and at 256 px wide (a typical generated face size)."""
    import cv2

    out = []
    for p in builtin_portraits():
        out += [p, cv2.resize(p, (256, 256 * p.shape[0] // p.shape[1]), interpolation=cv2.INTER_AREA)]
    return out


@pytest.fixture(scope="module")
def classic():
    return build_reward("ai_portrait_classic")


def _score(reward, rgb):
    return float(reward(as_batch([rgb]), [""], [{}])[0])


@pytest.mark.parametrize("artifact", [add_oily_highlights, smooth_skin, oversaturate],
                         ids=["oily", "smoothed", "oversaturated"])
def test_classic_ranks_real_portraits_above_their_artifact_versions(classic, portraits, artifact):
    for rgb in portraits:
        real, fake = _score(classic, rgb), _score(classic, artifact(rgb))
        assert real > 0.75, real  # calibrated so that a real photo scores high
        assert real > fake, (rgb.shape, real, fake)


def test_classic_sub_scores_point_at_the_artifact(classic, portraits):
    rgb = portraits[0]
    parts = {name: classic.parts(as_batch([rgb, fn(rgb)]), ["", ""], [{}, {}])
             for name, fn in (("oily", add_oily_highlights), ("texture", smooth_skin), ("saturation", oversaturate))}
    for feature, p in parts.items():
        assert p[feature][1] < p[feature][0], feature  # the matching sub-score falls
    assert parts["oily"]["raw_oily"][1] > parts["oily"]["raw_oily"][0]
    assert parts["texture"]["raw_texture"][1] < parts["texture"]["raw_texture"][0]
    assert parts["saturation"]["raw_saturation"][1] > parts["saturation"]["raw_saturation"][0]


def test_no_face_gets_the_configured_score(classic):
    r = build_reward("ai_portrait_classic", no_face_score=0.1)
    p = r.parts(torch.full((1, 3, 96, 96), 0.4), [""], [{}])
    assert p["face_found"][0] == 0.0 and p["score"][0] == pytest.approx(0.1)
    out = RewardSet({"ai_portrait_classic": 1.0})(torch.full((1, 3, 96, 96), 0.4), [""])
    assert np.isfinite(out["ai_portrait_classic/oily"]).all()  # undefined sub-scores are logged as 0


def test_calibration_from_a_curated_folder_and_json(tmp_path, portraits):
    from portraitgen.rewards.ai_portrait import portrait_calibration

    folder = tmp_path / "curated"
    folder.mkdir()
    for i, p in enumerate(builtin_portraits()):
        for j, a in enumerate(augment(p, scales=(1.0, 0.6), crops=(1.0, 0.9))):
            Image.fromarray(a).save(folder / f"real{i}_{j}.png")
    r = build_reward("ai_portrait_classic", calibration=str(folder))
    assert r.calibration.n_reference == 16 and r.calibration.source == str(folder)
    rgb = portraits[1]
    assert _score(r, rgb) > _score(r, oversaturate(rgb))
    portrait_calibration(str(folder)).save(tmp_path / "calib.json")
    r2 = build_reward("ai_portrait_classic", calibration=str(tmp_path / "calib.json"))
    assert _score(r2, rgb) == pytest.approx(_score(r, rgb), rel=1e-9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="holds no images"):
        build_reward("ai_portrait_classic", calibration=str(tmp_path / "empty"))
    with pytest.raises(RewardError, match="expected 'builtin:portraits', 'builtin:photos', a folder"):
        build_reward("ai_portrait_classic", calibration=str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------------
# Detector backend
# --------------------------------------------------------------------------------------------------
def _toy_crops(n: int, textured: bool, rng: np.random.Generator, size: int = 32):
    """Random colour fields; "real" ones carry fine texture, "generated" ones are smooth (the separable cue)."""
    import cv2

    out = []
    for _ in range(n):
        base = rng.uniform(40, 215, 3)
        img = np.ones((size, size, 3)) * base + cv2.GaussianBlur(rng.normal(0, 30, (size, size, 3)), (0, 0), 4)
        if textured:
            img += rng.normal(0, 14, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_roc_auc_matches_pairwise_definition():
    from portraitgen.rewards.detector import roc_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.normal(size=60) + y, 1)  # with ties
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert roc_auc(y, s) == pytest.approx(pairwise)


def test_detector_training_learns_a_separable_toy_case(tmp_path):
    from portraitgen.rewards.detector import DetectorConfig, roc_auc, train_detector

    rng = np.random.default_rng(0)
    real, gen = _toy_crops(48, True, rng), _toy_crops(48, False, rng)
    cfg = DetectorConfig(size=32, crop="none", width=8, epochs=12, batch_size=16, lr=3e-3, val_fraction=0.25, seed=0)
    report = train_detector(real, gen, tmp_path / "det", cfg, crops_ready=True)
    assert report["n_val"] == 24 and report["n_train"] == 72
    assert report["val_auc"] >= 0.95 and report["val_accuracy"] >= 0.9, report
    assert report["history"][-1]["train_loss"] < report["history"][0]["train_loss"]
    saved = json.loads((tmp_path / "det" / "report.json").read_text())
    assert saved["val_auc"] == pytest.approx(report["val_auc"])
    # the saved detector, loaded as the reward, gives P(real): high on fresh real crops, low on generated
    r = build_reward("ai_portrait_detector", path=str(tmp_path / "det"))
    fresh_real, fresh_gen = _toy_crops(16, True, rng), _toy_crops(16, False, rng)
    p = r(as_batch(fresh_real + fresh_gen), [""] * 32, [{}] * 32)
    assert np.all((p >= 0) & (p <= 1))
    assert roc_auc(np.r_[np.ones(16), np.zeros(16)], p) >= 0.95


def test_train_detector_cli_on_tiny_model_generations(tmp_path, capsys):
    """Real crops (scikit-image's LFW faces) vs images the tiny SD3 base model generates."""
    from skimage import data

    from portraitgen.cli import main
    from portraitgen.generate import run_generate

    gen_dir = tmp_path / "generated"
    run_generate("builtin:tiny", ["a close up portrait of a woman", "a portrait photo of an old man"], gen_dir,
                 family="sd3", resolution=64, num_steps=2, guidance_scale=4.5, seed=0, num_images=12)
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    for i, face in enumerate(data.lfw_subset()[:40]):
        grey = Image.fromarray((face * 255).round().astype(np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)
        grey.convert("RGB").save(real_dir / f"lfw_{i:03d}.png")
    out = tmp_path / "detector"
    rc = main(["train-detector", "--real", str(real_dir), "--generated", str(gen_dir), "--out", str(out),
               "--crop", "center", "--size", "32", "--width", "8", "--epochs", "12", "--batch-size", "16"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert summary["n_real"] == 40 and summary["n_generated"] == 24 and report["n_val"] == 16
    assert report["val_auc"] >= 0.9, report
    assert report["sources"] == {"real": str(real_dir), "generated": str(gen_dir)}
    rs = RewardSet({"ai_portrait": 1.0}, options={"ai_portrait": {"backend": "detector", "path": str(out)}})
    real = as_batch([np.asarray(Image.open(p).convert("RGB")) for p in sorted(real_dir.glob("*.png"))[:8]])
    gen = as_batch([np.asarray(Image.open(p).convert("RGB")) for p in sorted(gen_dir.glob("*.png"))[:8]])
    scores = rs(torch.cat([real, gen]), [""] * 16)["ai_portrait"]
    assert scores[:8].mean() > scores[8:].mean()


def test_detector_path_errors_are_clear(tmp_path):
    with pytest.raises(RewardError, match="ai_portrait_detector.path"):
        build_reward("ai_portrait_detector")
    with pytest.raises(RewardError, match="expected detector.json and detector.safetensors"):
        build_reward("ai_portrait_detector", path=str(tmp_path))

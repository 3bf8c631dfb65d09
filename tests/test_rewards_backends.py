"""The reward interface (options, normalisation, invalid-score policy, sub-scores), the VLM backends on a
tiny random Qwen2.5-VL built in code, and the classic OmniReward."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from portraitgen.config import ConfigError, params_from_dict
from portraitgen.rewards import RewardError, RewardSet, available_rewards, build_reward, register_reward
from portraitgen.rewards.calibration import Calibration, FeatureCalibration, FeatureSpec


def as_batch(arrays) -> torch.Tensor:
    """[H, W, 3] uint8 or float arrays -> [B, 3, H, W] float in [0, 1]."""
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a)).float()
        out.append((t / 255.0 if a.dtype == np.uint8 else t).permute(2, 0, 1))
    return torch.stack(out).clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# Interface: options, normalisation, NaN policy, sub-scores, config keys
# --------------------------------------------------------------------------------------------------
@register_reward("test_nan_at_1")
def _nan_at_1(offset: float = 0.0):
    def score(images, prompts, meta):
        s = np.arange(images.shape[0], dtype=np.float64) + offset
        s[1] = np.nan
        return s

    return score


def test_all_backends_are_registered():
    assert {"omni", "omni_classic", "omni_vlm", "ai_portrait", "ai_portrait_classic", "ai_portrait_vlm",
            "ai_portrait_detector"} <= set(available_rewards())


def test_nan_is_an_error_by_default_and_names_reward_and_images():
    rs = RewardSet({"test_nan_at_1": 1.0})
    with pytest.raises(RewardError, match=r"'test_nan_at_1' produced non-finite scores for images \[1\]"):
        rs(torch.zeros(3, 3, 8, 8), ["a", "b", "c"])


def test_nan_masked_with_a_logged_count(caplog):
    rs = RewardSet({"test_nan_at_1": 1.0, "brightness": 2.0}, options={"test_nan_at_1": {"offset": 10.0}},
                   on_invalid="mask")
    images = torch.full((3, 3, 8, 8), 0.5)
    with caplog.at_level(logging.WARNING, logger="portraitgen.rewards.registry"):
        out = rs(images, ["a", "b", "c"])
    # image 1 gets the mean of the valid scores (10 and 12), so it carries no signal from this component
    np.testing.assert_allclose(out["test_nan_at_1"], [10.0, 11.0, 12.0])
    np.testing.assert_array_equal(out["masked"], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(out["total"], out["test_nan_at_1"] + 2.0 * 0.5, rtol=1e-6)
    assert all(np.isfinite(v).all() for v in out.values())
    assert rs.invalid_counts == {"test_nan_at_1": 1, "brightness": 0}
    assert "masked 1 of 3 invalid scores" in caplog.text
    rs(images, ["a", "b", "c"])
    assert rs.invalid_counts["test_nan_at_1"] == 2  # cumulative


def test_plain_reward_set_output_is_unchanged():
    out = RewardSet({"brightness": 1.0})(torch.full((2, 3, 4, 4), 0.25), ["a", "b"])
    assert set(out) == {"brightness", "total"}


def test_normalisation_applies_to_the_total_only():
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.2, 0.4, 0.6)])
    rs = RewardSet({"brightness": 2.0}, normalize={"brightness": {"mean": 0.4, "std": 0.1, "clip": 1.5}})
    out = rs(images, ["a"] * 3)
    np.testing.assert_allclose(out["brightness"], [0.2, 0.4, 0.6], rtol=1e-6)
    np.testing.assert_allclose(out["total"], [-3.0, 0.0, 3.0], atol=1e-5)  # z = -2, 0, 2, clipped to +-1.5, x2


def test_reward_config_keys_and_errors():
    p = params_from_dict({"reward": {"components": {"brightness": 1.0, "test_nan_at_1": 0.5},
                                     "options": {"test_nan_at_1": {"offset": 1}},
                                     "normalize": {"brightness": {"mean": 0.5, "std": 0.25}},
                                     "on_invalid": "mask"}})
    rs = RewardSet.from_config(p.reward)
    assert rs.on_invalid == "mask" and rs.normalize["brightness"].std == 0.25
    assert params_from_dict({}).reward.on_invalid == "error"  # the default params stay as they were
    for bad, msg in [({"normalize": {"omni": {"std": 1.0}}}, "reward.normalize.omni"),
                     ({"normalize": {"brightness": {"std": 0.0}}}, "reward.normalize.brightness.std"),
                     ({"on_invalid": "ignore"}, "reward.on_invalid"),
                     ({"options": {"brightness": 3}}, "reward.options.brightness")]:
        with pytest.raises(ConfigError, match=msg):
            params_from_dict({"reward": {"components": {"brightness": 1.0}, **bad}})
    with pytest.raises(RewardError, match="reward.options.brightness: .*unexpected keyword argument 'gain'"):
        RewardSet({"brightness": 1.0}, options={"brightness": {"gain": 2}})


def test_calibration_scores_are_monotone_and_high_inside_the_real_range():
    rng = np.random.default_rng(0)
    ref = rng.normal(1.0, 0.1, 200)
    hi = FeatureCalibration.fit(ref, "higher_worse", min_width=1e-3)
    xs = np.linspace(0.5, 2.0, 50)
    assert np.all(np.diff(hi.score(xs)) < 0)
    assert hi.score(hi.q95) > 0.88 - 1e-9 and hi.score(hi.q50) > 0.97
    two = FeatureCalibration.fit(ref, "two_sided", min_width=1e-3)
    assert two.score(1.0) > 0.95 and two.score(0.3) < 0.05 and two.score(1.7) < 0.05
    cal = Calibration({"a": hi, "b": two}, {"a": 1.0, "b": 1.0})
    s = cal.scores({"a": 1.0, "b": 0.3})
    assert s["b"] <= s["score"] <= s["a"] and s["score"] < 0.1  # a soft minimum: the bad feature dominates
    assert Calibration.fit([{"a": v} for v in ref], {"a": FeatureSpec("higher_worse", 1e-3)}).features["a"] == hi


# --------------------------------------------------------------------------------------------------
# VLM backends on a tiny random Qwen2.5-VL (built, saved, reloaded with from_pretrained)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from portraitgen.rewards.tiny_vlm import build_tiny_vlm

    return str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-qwen2_5-vl"))


def _independent_expected_rating(model_path: str, image: torch.Tensor, text: str, ratings=("1", "2", "3", "4", "5")):
    """The reference computation, written out: one unpadded sequence, full logits, numpy softmax."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    improc = AutoImageProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    arr = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr).resize((56, 56), Image.Resampling.BICUBIC)
    vis = improc(images=[pil], return_tensors="pt")
    n_tokens = int(vis["image_grid_thw"][0].prod()) // improc.merge_size ** 2
    chat = (f"<|im_start|>user\n<|vision_start|>{'<|image_pad|>' * n_tokens}<|vision_end|>{text}<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = tok(chat, return_tensors="pt")
    mm = (ids["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    with torch.no_grad():
        logits = model(**ids, **vis, mm_token_type_ids=mm).logits[0, -1].double().numpy()
    rid = [tok.convert_tokens_to_ids(r) for r in ratings]
    z = logits[rid] - logits[rid].max()
    p = np.exp(z) / np.exp(z).sum()
    return float((p * np.array([float(r) for r in ratings])).sum())


@pytest.mark.parametrize("name", ["omni_vlm", "ai_portrait_vlm"])
def test_vlm_backend_score_is_the_expected_rating(tiny_vlm, name):
    torch.manual_seed(0)
    images = torch.rand(5, 3, 48, 48)
    prompts = ["a portrait", "a close-up photo of an old fisherman with a beard", "x", "a woman laughing", "two people"]
    template = "Prompt: {prompt}. Rate 1-5:"
    batched = build_reward(name, model_path=tiny_vlm, prompt=template, image_size=56, batch_size=3)
    out = batched.parts(images, prompts, [{}] * 5)
    assert out["score"].shape == (5,) and out["expected_rating"].shape == (5,)
    assert np.all((out["score"] >= 0) & (out["score"] <= 1))
    np.testing.assert_allclose(out["score"], (out["expected_rating"] - 1) / 4, rtol=1e-12)
    # the same scores one image at a time (no padding) ...
    single = build_reward(name, model_path=tiny_vlm, prompt=template, image_size=56, batch_size=1)
    np.testing.assert_allclose(single(images, prompts, [{}] * 5), out["score"], atol=1e-5)
    # ... and equal to the expectation over the rating tokens computed independently from the logits
    for i in (0, 1):
        ref = _independent_expected_rating(tiny_vlm, images[i], template.replace("{prompt}", prompts[i]))
        assert abs(out["expected_rating"][i] - ref) < 1e-5
    assert out["expected_rating"].std() > 0  # the images are actually seen


def test_vlm_options_are_checked(tiny_vlm, tmp_path):
    with pytest.raises(RewardError, match="model_path"):
        build_reward("omni_vlm")
    with pytest.raises(RewardError, match="not a local model folder"):
        build_reward("omni_vlm", model_path=str(tmp_path / "missing"))
    with pytest.raises(RewardError, match="must be one token"):
        build_reward("ai_portrait_vlm", model_path=tiny_vlm, ratings=["1", "10"])
    rs = RewardSet({"omni": 1.0}, options={"omni": {"backend": "vlm", "model_path": tiny_vlm, "image_size": 56}})
    out = rs(torch.rand(2, 3, 32, 32), ["a", "b"])
    assert set(out) == {"omni", "omni/expected_rating", "total"}


def test_builtin_tiny_vlm_is_built_once_in_the_cache():
    from portraitgen.rewards.tiny_vlm import tiny_vlm_path

    path = tiny_vlm_path()
    assert (path / "config.json").is_file() and tiny_vlm_path() == path
    r = build_reward("omni_vlm", model_path="builtin:tiny", image_size=56)
    assert r(torch.rand(1, 3, 32, 32), ["a"], [{}]).shape == (1,)


# --------------------------------------------------------------------------------------------------
# Classic OmniReward
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos():
    import cv2

    from portraitgen.rewards.real_images import builtin_photos

    return [cv2.resize(p, (256, 256), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0 for p in builtin_photos()[:4]]


@pytest.fixture(scope="module")
def omni_classic():
    return build_reward("omni_classic")


def _blur(x):
    import cv2

    return cv2.GaussianBlur(x, (0, 0), 2.0)


def _noise(x):
    return np.clip(x + np.random.default_rng(0).normal(0.0, 0.05, x.shape), 0, 1)


def _overexpose(x):
    return np.clip(x * 1.6, 0, 1)


@pytest.mark.parametrize("degrade", [_blur, _noise, _overexpose], ids=["blurred", "noisy", "over-exposed"])
def test_omni_classic_ranks_clean_above_degraded(omni_classic, photos, degrade):
    clean = omni_classic(as_batch(photos), [""] * len(photos), [{}] * len(photos))
    bad = omni_classic(as_batch([degrade(p) for p in photos]), [""] * len(photos), [{}] * len(photos))
    assert np.all((clean >= 0) & (clean <= 1)) and np.all((bad >= 0) & (bad <= 1))
    assert np.all(clean > bad), (clean, bad)
    assert clean.min() > 0.6  # real photos score high


def test_omni_classic_logs_every_feature(omni_classic, photos):
    out = RewardSet({"omni_classic": 1.0})(as_batch(photos[:2]), ["a", "b"])
    for f in ("brisque", "blur", "noise", "clipped", "luma", "colourfulness"):
        assert f"omni_classic/{f}" in out and f"omni_classic/raw_{f}" in out


def test_omni_classic_flat_image_scores_low_not_nan(omni_classic, photos):
    flat = torch.full((1, 3, 64, 64), 0.5)
    s = omni_classic(torch.cat([flat, as_batch(photos[:1])[:, :, :64, :64]]), ["a", "b"], [{}, {}])
    assert np.isfinite(s).all() and s[0] < 0.01 < s[1]


def test_omni_classic_failing_image_is_a_clear_error_or_masked(omni_classic, photos, monkeypatch):
    import portraitgen.rewards.omni as omni

    real = omni.quality_features

    def failing(rgb, work_size):
        if rgb.mean() > 250:
            raise ValueError("cannot fit the MSCN distribution")
        return real(rgb, work_size)

    monkeypatch.setattr(omni, "quality_features", failing)
    images = as_batch(photos[:2] + [np.ones((256, 256, 3))])
    with pytest.raises(RewardError, match=r"images \[2\] \(image 2: ValueError: cannot fit the MSCN distribution\)"):
        RewardSet({"omni_classic": 1.0})(images, ["a", "b", "c"])
    rs = RewardSet({"omni_classic": 1.0}, on_invalid="mask")
    out = rs(images, ["a", "b", "c"])
    np.testing.assert_array_equal(out["masked"], [0, 0, 1])
    assert rs.invalid_counts == {"omni_classic": 1} and np.isfinite(out["total"]).all()
    assert out["omni_classic/brisque"][2] == 0.0  # undefined sub-scores are logged as 0, never NaN

"""FLUX and Z-Image adapters against their own diffusers pipelines (tiny random models, CPU, offline).

Each family's tiny pipeline is built in code, saved with ``save_pretrained`` and loaded back through
``Policy.from_pretrained`` (the code path real weights take). The checks pin the conventions each adapter
converts (docs/design.md §2): prompt conditioning that slices and concatenates, the exact sampling schedule,
ODE parity with the stock pipeline's own sampling loop (FLUX: packed latents and distilled guidance;
Z-Image: list inputs, ``1 - sigma`` timesteps, negated output and ``g_z = g - 1`` CFG), LoRA export that
the stock pipeline loads, and the LoRA-disabled reference.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from portraitgen.policies.base import cond_batch_size, cond_cat, cond_select
from portraitgen.policies.flux import FluxPolicy
from portraitgen.policies.zimage import ZImagePolicy

FAMILIES = {"flux": FluxPolicy, "zimage": ZImagePolicy}
# FLUX.1-dev is sampled with its distilled guidance and no true CFG (g = 1); Z-Image with CFG, so that the
# g_z = g - 1 conversion and the batched [uncond, cond] call are exercised.
GUIDANCE = {"flux": 1.0, "zimage": 3.0}
PROMPT = "a portrait photo of a woman with freckles"
PROMPTS = ["a portrait photo of a woman", "close up headshot of an old man with a grey beard, golden hour"]
STEPS = 4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_model(request, tmp_path_factory):
    """(family, policy class, folder of the saved tiny pipeline): built once per family."""
    cls = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    cls.build_tiny_pipeline(seed=0).save_pretrained(str(path))
    return request.param, cls, path


# Text length for the tests. The adapters default to their pipelines' 512 tokens; 64 is plenty for these
# prompts and keeps the CPU tests fast. Every pipeline call below passes the same `max_sequence_length`.
TEST_SEQ_LEN = 64


def load_policy(cls, path):
    policy = cls.from_pretrained(path)
    policy.max_sequence_length = TEST_SEQ_LEN
    return policy


@pytest.fixture
def policy(tiny_model):
    _, cls, path = tiny_model
    return load_policy(cls, path)


def noise_latents(policy, height, width, batch=1, seed=0):
    shape = policy.latent_shape(height, width)
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def euler_sample(policy, noise, height, width, guidance_scale, prompt=PROMPT, steps=STEPS):
    """Our deterministic sampler: x' = x + (s' - s) v, in the unpacked layout."""
    sig = policy.sigmas(steps, height, width)
    cond = policy.encode_prompts([prompt] * noise.shape[0])
    uncond = policy.encode_prompts([""] * noise.shape[0]) if guidance_scale != 1.0 else None
    x = noise.clone()
    with torch.no_grad():
        for s, s_next in zip(sig[:-1], sig[1:]):
            x = x + (s_next - s) * policy.predict_velocity(x, s, cond, uncond, guidance_scale)
    return x


def pipeline_sample(family, policy, pipe, noise, height, width, guidance_scale, prompt=PROMPT, steps=STEPS,
                    output_type="latent"):
    """The stock pipeline's own sampling from the same noise, returned in our unpacked layout."""
    kwargs = dict(prompt=[prompt] * noise.shape[0], num_inference_steps=steps, height=height, width=width,
                  output_type=output_type, max_sequence_length=policy.max_sequence_length)
    if family == "flux":
        assert guidance_scale == 1.0  # true CFG (negative prompt) is not what this helper drives
        out = pipe(latents=FluxPolicy.pack(noise), guidance_scale=policy.distilled_guidance, **kwargs).images
        if output_type == "latent":  # FluxPipeline returns packed latents
            out = FluxPolicy.unpack(out, *noise.shape[-2:])
        return out
    # ZImagePipeline: pred = pos + g_z (pos - neg) with the "" negative prompt; g_z = g - 1.
    return pipe(latents=noise, guidance_scale=guidance_scale - 1.0, **kwargs).images


# ---------------------------------------------------------------------------------------------- a. prompts
def test_encode_prompts_batch_first_and_concatenable(tiny_model, policy):
    family, _, _ = tiny_model
    both = policy.encode_prompts(PROMPTS)
    assert both and all(v.shape[0] == len(PROMPTS) for v in both.values())
    assert cond_batch_size(both) == 2
    if family == "zimage":
        lengths = both["prompt_mask"].sum(1)
        assert both["prompt_mask"].dtype == torch.bool and lengths[0] != lengths[1]  # real variable lengths
        assert both["prompt_embeds"].shape[1] == policy.max_sequence_length
    parts = cond_cat([policy.encode_prompts(PROMPTS[:1]), policy.encode_prompts(PROMPTS[1:])])
    assert parts.keys() == both.keys()
    for k in both:
        assert parts[k].shape == both[k].shape
        torch.testing.assert_close(parts[k], both[k], rtol=0, atol=1e-6)

    x = noise_latents(policy, 64, 64, batch=2)
    with torch.no_grad():
        v_both = policy.predict_velocity(x, 0.6, both)
        v_parts = policy.predict_velocity(x, 0.6, parts)
        v_one = policy.predict_velocity(x[1:], 0.6, cond_select(both, [1]))
    assert v_both.shape == x.shape and v_both.dtype == torch.float32
    torch.testing.assert_close(v_parts, v_both, rtol=0, atol=1e-5)
    torch.testing.assert_close(v_one, v_both[1:], rtol=0, atol=1e-5)  # batching does not leak across prompts
    assert not torch.allclose(v_both[0], v_both[1])


# ------------------------------------------------------------------------------ b, c. schedule and ODE parity
@pytest.mark.parametrize("height,width", [(64, 64), (32, 64)])
def test_sigmas_and_ode_match_pipeline(tiny_model, policy, height, width):
    family, _, _ = tiny_model
    g = GUIDANCE[family]
    assert policy.latent_shape(height, width) == (16, height // 8, width // 8)
    noise = noise_latents(policy, height, width, seed=1)
    ours = euler_sample(policy, noise, height, width, g)
    theirs = pipeline_sample(family, policy, policy.pipeline, noise, height, width, g)

    sig = policy.sigmas(STEPS, height, width)
    assert sig.shape == (STEPS + 1,) and sig[0] == 1.0 and sig[-1] == 0.0
    assert torch.all(sig[1:] < sig[:-1])
    # the schedule the pipeline has just sampled with
    torch.testing.assert_close(sig, policy.pipeline.scheduler.sigmas.float().cpu(), rtol=0, atol=1e-7)

    assert theirs.shape == ours.shape == noise.shape
    assert (ours - noise).abs().max() > 0.1  # the loop really moved
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_sigmas_other_step_counts(tiny_model, policy):
    family, _, _ = tiny_model
    for steps in (1, 10):
        sig = policy.sigmas(steps, 64, 64)
        pipeline_sample(family, policy, policy.pipeline, noise_latents(policy, 64, 64), 64, 64, 1.0, steps=steps)
        torch.testing.assert_close(sig, policy.pipeline.scheduler.sigmas.float().cpu(), rtol=0, atol=1e-7)
        assert len(sig) == steps + 1 and sig[0] == 1.0 and sig[-1] == 0.0


def test_decode_matches_pipeline_image(tiny_model, policy):
    """The base class's decode (shift/scale of the 16-channel VAE) is what the pipeline does."""
    family, _, _ = tiny_model
    noise = noise_latents(policy, 64, 64, seed=2)
    latents = euler_sample(policy, noise, 64, 64, GUIDANCE[family])
    image = pipeline_sample(family, policy, policy.pipeline, noise, 64, 64, GUIDANCE[family], output_type="pt")
    ours = policy.decode(latents)
    assert ours.shape == (1, 3, 64, 64)
    torch.testing.assert_close(ours, image.float(), rtol=0, atol=1e-4)
    assert policy.encode(ours).shape == latents.shape


# ---------------------------------------------------------------------------------------------- d, e. LoRA
def test_lora_trainable_export_and_reference(tiny_model, policy, tmp_path):
    family, cls, path = tiny_model
    g = GUIDANCE[family]
    cond = policy.encode_prompts([PROMPT])
    x = noise_latents(policy, 64, 64, seed=3)
    with torch.no_grad():
        v_base = policy.predict_velocity(x, 0.7, cond)

    policy.enable_lora(rank=4, alpha=4)
    named = dict(policy.transformer.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in named.items() if "lora_" not in n)
    assert {id(p) for p in policy.trainable_parameters()} == {id(named[n]) for n in trainable}
    # every default target got an adapter
    for target in cls.default_lora_targets:
        assert any(f"{target}.lora_A" in n for n in trainable), target

    # peft's gaussian init leaves lora_B = 0 (a no-op adapter): perturb every LoRA weight.
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n in sorted(trainable):
            named[n].add_(0.3 * torch.randn(named[n].shape, generator=gen))
        v_lora = policy.predict_velocity(x, 0.7, cond)
        assert (v_lora - v_base).abs().max() > 1e-3

        # e. the reference context disables the adapter, and re-enables it afterwards
        with policy.reference():
            v_ref = policy.predict_velocity(x, 0.7, cond)
        torch.testing.assert_close(v_ref, v_base, rtol=0, atol=1e-6)
        torch.testing.assert_close(policy.reference_velocity(x, 0.7, cond), v_base, rtol=0, atol=1e-6)
        torch.testing.assert_close(policy.predict_velocity(x, 0.7, cond), v_lora, rtol=0, atol=1e-6)
    assert policy.has_reference

    # d. export: a freshly loaded stock pipeline accepts the file and then samples what our policy samples
    lora_dir = tmp_path / "lora"
    policy.save_lora(lora_dir)
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe = cls.pipeline_class.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = noise_latents(policy, 64, 64, seed=5)
    before = pipeline_sample(family, policy, pipe, noise, 64, 64, g)
    pipe.load_lora_weights(str(lora_dir))
    after = pipeline_sample(family, policy, pipe, noise, 64, 64, g)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, euler_sample(policy, noise, 64, 64, g), rtol=0, atol=1e-4)
    with policy.reference():
        torch.testing.assert_close(before, euler_sample(policy, noise, 64, 64, g), rtol=0, atol=1e-4)


def test_flux_distilled_guidance_is_used(tmp_path_factory):
    """FLUX.1-dev's guidance embedding: changing `distilled_guidance` changes the velocity."""
    path = tmp_path_factory.mktemp("tiny-flux-guidance")
    FluxPolicy.build_tiny_pipeline(seed=0).save_pretrained(str(path))
    policy = load_policy(FluxPolicy, path)
    assert policy.transformer.config.guidance_embeds
    cond = policy.encode_prompts([PROMPT])
    x = noise_latents(policy, 64, 64)
    with torch.no_grad():
        v1 = policy.predict_velocity(x, 0.5, cond)
        policy.distilled_guidance = 7.0
        v2 = policy.predict_velocity(x, 0.5, cond)
    assert (v1 - v2).abs().max() > 1e-4

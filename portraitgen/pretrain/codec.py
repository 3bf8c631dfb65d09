"""The pretrained model's latent space: a lossless per-pixel colour codec, built (not trained) as an
``AutoencoderTiny`` so that diffusers' ``StableDiffusion3Pipeline`` (and every stage of this project)
runs it like any VAE.

A learned VAE is out of reach on a CPU budget, and at 24 px it would lose most of a face. This codec
loses nothing: each pixel's RGB value is mapped by a fixed orthonormal colour transform (one luma
axis, two chroma axes), so ``decode(encode(x)) == x`` up to float rounding, far inside 8-bit
quantisation. There is no downsampling (``vae_scale_factor`` 1); the transformer's 2x2 patches make
one token per 2x2 pixels, i.e. the "pixel-unshuffle" token of the feasibility probe.

Inside the autoencoder (``z`` = the VAE's own latent, ``x`` = RGB in [0, 1]):

- encode: ``z = INNER_GAIN * Q (x - 0.5)``, with ``Q`` the ``[3, 3]`` orthonormal colour transform;
- decode: ``x = 0.5 + Q^T z / INNER_GAIN``.

TAESD's decoder first squashes its input with ``tanh(z / 3) * 3``. ``INNER_GAIN`` keeps ``|z|`` under
0.09, where that squash differs from the identity by less than 3e-5 (2e-4 after the decoder's
gain: a tenth of a quantisation step), so the codec stays exact for practical purposes. The
pipeline's ``scaling_factor`` then brings the latents the transformer sees to unit scale
(``model latent = scaling_factor * z``: ``LATENT_GAIN`` per unit of pixel value).
Signed values cross the decoder's ReLUs as ``(z+, z-)`` channel pairs, and the residual blocks are
identities (their last convolution is zero), as in :mod:`portraitgen.policies.tiny_vae`.
"""
from __future__ import annotations

import math

import torch
from diffusers import AutoencoderTiny

LATENT_CHANNELS = 3  # luma + two chroma axes: an exact colour transform, nothing dropped
INNER_GAIN = 0.1  # VAE-internal latent per unit of (pixel - 0.5): |z| <= 0.1 * sqrt(3) / 2 < 0.09
LATENT_GAIN = 2.5  # model latent per unit of (pixel - 0.5) along each axis (faces: luma latent std ~1)


def colour_transform() -> torch.Tensor:
    """``[3, 3]`` orthonormal rows: luma (R+G+B)/sqrt(3), red-green, and yellow-blue."""
    q = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    return q.float()


def _zero(conv: torch.nn.Conv2d) -> None:
    torch.nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        torch.nn.init.zeros_(conv.bias)


@torch.no_grad()
def pixel_codec_vae() -> AutoencoderTiny:
    """The codec as a one-level ``AutoencoderTiny`` (no downsampling)."""
    c = 2 * LATENT_CHANNELS  # (z+, z-) pairs in the decoder
    vae = AutoencoderTiny(encoder_block_out_channels=(c,), decoder_block_out_channels=(c,),
                          num_encoder_blocks=(1,), num_decoder_blocks=(1,), latent_channels=LATENT_CHANNELS,
                          scaling_factor=LATENT_GAIN / INNER_GAIN, shift_factor=0.0)
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv2d):
            _zero(module)
    # Every AutoencoderTinyBlock computes relu(conv(x) + x): a zero last conv makes it relu(x) = x on
    # the non-negative values that reach it.
    for block in vae.modules():
        if type(block).__name__ == "AutoencoderTinyBlock":
            _zero(block.conv[-1])
    q = colour_transform()

    enc = [m for m in vae.encoder.layers if isinstance(m, torch.nn.Conv2d)]
    # enc[0]: RGB in [0, 1] (non-negative: passes the block's ReLU) into channels 0..2;
    # enc[1]: z = INNER_GAIN * Q (x - 0.5).
    for ch in range(3):
        enc[0].weight[ch, ch, 1, 1] = 1.0
    enc[1].weight[:, :3, 1, 1] = INNER_GAIN * q
    enc[1].bias.copy_(-(INNER_GAIN * q) @ torch.full((3,), 0.5))

    dec = [m for m in vae.decoder.layers if isinstance(m, torch.nn.Conv2d)]
    # dec[0]: z -> (z+, z-) (the ReLU after it splits the sign); dec[1]: x = 0.5 + Q^T (z+ - z-) / INNER_GAIN.
    for k in range(LATENT_CHANNELS):
        dec[0].weight[2 * k, k, 1, 1] = 1.0
        dec[0].weight[2 * k + 1, k, 1, 1] = -1.0
        dec[1].weight[:, 2 * k, 1, 1] = q[k] / INNER_GAIN
        dec[1].weight[:, 2 * k + 1, 1, 1] = -q[k] / INNER_GAIN
    dec[1].bias.fill_(0.5)
    return vae


def encode_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] ``[B, 3, H, W]`` -> model latents (what ``FlowPolicy.encode`` gives), computed
    directly: the pretraining loop's fast path, equal to the VAE's encoder (tested)."""
    q = colour_transform().to(images)
    return LATENT_GAIN * torch.einsum("kc,bchw->bkhw", q, images - 0.5)


def decode_latents(latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> images in [0, 1] (unclamped), the exact inverse of :func:`encode_pixels`."""
    q = colour_transform().to(latents)
    return 0.5 + torch.einsum("kc,bkhw->bchw", q, latents) / LATENT_GAIN


def max_inner_latent() -> float:
    """Largest ``|z|`` the encoder can produce for images in [0, 1] (documented bound)."""
    return INNER_GAIN * math.sqrt(3) / 2

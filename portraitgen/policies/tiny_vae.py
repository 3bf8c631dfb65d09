"""VAEs for the tiny built-in models.

A randomly initialised ``AutoencoderKL`` is a poor stand-in for a real VAE: its GroupNorms remove
whatever global level the latents carry, so a random decoder's image brightness or colour hardly
depends on the latent at all (measured: brightness std 0.005 across random latents, against 0.15
for a linear decoder). Image rewards would then give GRPO nothing to learn from, and inversion
could not reconstruct anything.

:func:`linear_tiny_vae` therefore *constructs* (not trains) an ``AutoencoderTiny`` - the TAESD
architecture that diffusers' SD3 and FLUX pipelines accept as their VAE - whose weights make it an
exact linear colour codec at 1/8 resolution:

- decode: ``image = 0.5 + M z`` per 8x8 block (nearest upsampling), with ``M`` a fixed ``[3, C]``
  matrix of orthogonal rows (every latent channel moves the colour, each RGB channel has std 0.2
  for ``z ~ N(0, I)``);
- encode: ``z = M^+ (mean of the 8x8 block - 0.5)``, so ``decode(encode(x))`` is the 8x8-block mean
  of ``x`` (exactly, up to TAESD's soft clamp ``tanh(z / 3) * 3``, which bends latents beyond ~1.5).

Signed values cross the ReLUs as ``(z+, z-)`` channel pairs; residual blocks are made identities by
zeroing their last convolution. The decoder's ``tanh(z / 3) * 3`` input clamp is TAESD's own.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

COLOUR_STD = 0.2  # per RGB channel, for z ~ N(0, I)


def colour_matrix(latent_channels: int, seed: int = 0) -> torch.Tensor:
    """``[3, C]`` with orthogonal rows of norm COLOUR_STD; the first row is luma-like (all positive)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(latent_channels, max(latent_channels, 3), generator=g, dtype=torch.float64)
    a[:, 0] = 1.0  # a brightness direction shared by all channels
    q, _ = torch.linalg.qr(a)
    m = q[:, :3].T * COLOUR_STD
    if m[0].sum() < 0:
        m[0] = -m[0]
    return m.float()


def _zero(conv: torch.nn.Conv2d) -> None:
    torch.nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        torch.nn.init.zeros_(conv.bias)


def _identity_blocks(module: torch.nn.Module) -> None:
    """Every AutoencoderTinyBlock computes relu(conv(x) + x): zero the conv's last layer -> relu(x) = x."""
    for block in module.modules():
        if type(block).__name__ == "AutoencoderTinyBlock":
            _zero(block.conv[-1])


@torch.no_grad()
def linear_tiny_vae(latent_channels: int, seed: int = 0) -> AutoencoderTiny:
    c = 2 * latent_channels  # (z+, z-) pairs
    vae = AutoencoderTiny(encoder_block_out_channels=(c,) * 4, decoder_block_out_channels=(c,) * 4,
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                          latent_channels=latent_channels, scaling_factor=1.0, shift_factor=0.0)
    m = colour_matrix(latent_channels, seed)  # [3, L]
    p = torch.linalg.pinv(m.double()).float()  # [L, 3]
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv2d):
            _zero(module)
    _identity_blocks(vae)

    enc = [l for l in vae.encoder.layers if isinstance(l, torch.nn.Conv2d)]
    # enc[0]: RGB (in [0, 1]) into channels 0..2; enc[1:4]: stride-2 2x2 means; enc[4]: z = P (x - 0.5).
    for ch in range(3):
        enc[0].weight[ch, ch, 1, 1] = 1.0
    for conv in enc[1:4]:
        for ch in range(c):
            conv.weight[ch, ch, 1:3, 1:3] = 0.25  # rows/cols 2i, 2i+1 with padding 1, stride 2
    enc[4].weight[:, :3, 1, 1] = p
    enc[4].bias.copy_(-(p @ torch.full((3,), 0.5)))

    dec = [l for l in vae.decoder.layers if isinstance(l, torch.nn.Conv2d)]
    # dec[0]: z -> (z+, z-) pairs (the ReLU after it splits the sign); dec[1:4]: identity after each
    # nearest upsampling; dec[4]: image = 0.5 + M (z+ - z-).
    for k in range(latent_channels):
        dec[0].weight[2 * k, k, 1, 1] = 1.0
        dec[0].weight[2 * k + 1, k, 1, 1] = -1.0
    for conv in dec[1:4]:
        for ch in range(c):
            conv.weight[ch, ch, 1, 1] = 1.0
    for k in range(latent_channels):
        dec[4].weight[:, 2 * k, 1, 1] = m[:, k]
        dec[4].weight[:, 2 * k + 1, 1, 1] = -m[:, k]
    dec[4].bias.fill_(0.5)
    return vae


def random_kl_vae(latent_channels: int, shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """A random 4-level ``AutoencoderKL`` (the class real SD3/FLUX/Z-Image checkpoints use); kept for
    tests of the ``latent_dist`` code path."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=64,
                         shift_factor=shift_factor, scaling_factor=scaling_factor)

"""The constructed tiny VAE is a linear colour codec; the AutoencoderKL path of the policy still works."""
import torch

from portraitgen.policies.sd3 import SD3Policy
from portraitgen.policies.tiny_vae import COLOUR_STD, colour_matrix, linear_tiny_vae, random_kl_vae


def _blocks(x, f=8):
    return x.repeat_interleave(f, 2).repeat_interleave(f, 3)


def test_decode_is_the_colour_matrix_on_8x8_blocks():
    for channels in (4, 16):
        vae, m = linear_tiny_vae(channels), colour_matrix(channels)
        z = torch.randn(3, channels, 4, 4, generator=torch.Generator().manual_seed(channels)) * 0.5
        with torch.no_grad():
            image = vae.decode(z).sample / 2 + 0.5
        expected = 0.5 + _blocks(torch.einsum("rc,bchw->brhw", m, torch.tanh(z / 3) * 3))
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)
        # Rows are orthogonal with norm COLOUR_STD; the first is a brightness direction.
        torch.testing.assert_close(m @ m.T, torch.eye(3) * COLOUR_STD**2, atol=1e-6, rtol=0)
        assert (m[0] @ torch.ones(channels)) > 0


def test_encode_decode_recovers_block_colours():
    vae = linear_tiny_vae(16)
    x = _blocks(torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.4 + 0.3)
    with torch.no_grad():
        back = vae.decode(vae.encode(x * 2 - 1).latents).sample / 2 + 0.5
    assert (back - x).abs().max() < 0.02  # only TAESD's soft clamp bends it


def test_brightness_follows_the_latents():
    vae = linear_tiny_vae(4)
    z = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    direction = colour_matrix(4)[0] / colour_matrix(4)[0].norm()
    with torch.no_grad():
        lo = (vae.decode(z).sample / 2 + 0.5).mean()
        hi = (vae.decode(z + direction.view(1, 4, 1, 1)).sample / 2 + 0.5).mean()
    assert hi - lo > 0.05


def test_policy_encode_decode_with_an_autoencoder_kl(tmp_path):
    """Real checkpoints ship AutoencoderKL: the policy reads its posterior mode and its shift/scale."""
    pipe = SD3Policy.build_tiny_pipeline()
    pipe.vae = random_kl_vae(4, shift_factor=0.0609, scaling_factor=1.5035)
    pipe.register_modules(vae=pipe.vae)
    pipe.save_pretrained(tmp_path)
    policy = SD3Policy.from_pretrained(tmp_path)
    assert type(policy.vae).__name__ == "AutoencoderKL"
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    z = policy.encode(images)
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():
        mode = policy.vae.encode(images * 2 - 1).latent_dist.mode()
        expected = ((z / 1.5035 + 0.0609) - mode).abs().max()
        ref = (policy.vae.decode(z / 1.5035 + 0.0609).sample / 2 + 0.5).clamp(0, 1)
    assert expected < 1e-5
    torch.testing.assert_close(policy.decode(z), ref)

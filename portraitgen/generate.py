"""``portraitgen generate``: images from a base model, an exported model or a training run.

Sampling is the deterministic (ODE) sampler on the model's own schedule; image ``i`` of prompt ``p``
starts from noise seeded by ``(seed, p, i)``, so the same command gives the same images.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .export import load_trained
from .io import atomic_write
from .images import to_pil
from .policies import FlowPolicy
from .sampling import randn_per_sample, rollout, seeded_generator
from .stage import open_output

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_images(policy: FlowPolicy, prompts: Sequence[str], *, resolution: int, num_steps: int,
                    guidance_scale: float, seed: int, num_images: int = 1, batch_size: int = 4) -> torch.Tensor:
    """``[len(prompts) * num_images, 3, H, W]`` images in [0, 1], prompt-major."""
    shape = policy.latent_shape(resolution, resolution)
    sigmas = policy.sigmas(num_steps, resolution, resolution)
    jobs = [(pi, i) for pi in range(len(prompts)) for i in range(num_images)]
    cond_all = policy.encode_prompts(list(prompts))
    uncond = policy.encode_prompts([""]) if guidance_scale != 1.0 else None
    out = []
    for lo in tqdm(range(0, len(jobs), batch_size), desc="generate", leave=False):
        chunk = jobs[lo:lo + batch_size]
        gens = [seeded_generator(seed, pi, i) for pi, i in chunk]
        start = randn_per_sample(shape, gens, policy.device)
        cond = {k: v[[pi for pi, _ in chunk]] for k, v in cond_all.items()}
        unc = {k: v.expand(len(chunk), *v.shape[1:]) for k, v in uncond.items()} if uncond else None
        traj = rollout(policy, cond, start, sigmas, step_type="sde", noise_level=0.0, uncond=unc,
                       guidance_scale=guidance_scale, stochastic=torch.zeros(num_steps, dtype=torch.bool))
        out.append(policy.decode(traj.final))
    return torch.cat(out)


def run_generate(model: str, prompts: Sequence[str], out_dir: Path, *, family: str | None, resolution: int,
                 num_steps: int, guidance_scale: float, seed: int, num_images: int) -> list[Path]:
    from .logged_model import download_model, is_model_uri

    if is_model_uri(model):  # runs:/<run_id>/model: the model a train run logged to MLflow
        model = str(download_model(model))
    policy = load_trained(model, family=family, device="cuda" if torch.cuda.is_available() else "cpu")
    policy.freeze_all()
    images = generate_images(policy, prompts, resolution=resolution, num_steps=num_steps,
                             guidance_scale=guidance_scale, seed=seed, num_images=num_images)
    out_dir = open_output(out_dir)
    paths = []
    for k, img in enumerate(images):
        pi, i = divmod(k, num_images)
        path = out_dir / f"prompt{pi:03d}_seed{seed}_{i:02d}.png"
        paths.append(atomic_write(path, lambda tmp, img=img: to_pil(img).save(tmp, format="PNG")))
    return paths

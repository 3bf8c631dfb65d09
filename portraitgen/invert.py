"""``portraitgen invert``: curated real portraits -> cached shards of trajectories, an index and a report.

    portraitgen invert --params params.yaml --out results/invert                     # all parts, then merge
    portraitgen invert --params params.yaml --out results/invert --part 0 --num-parts 4   # one cluster job
    portraitgen invert --params params.yaml --out results/invert --merge-only        # gather: index + report

Exemplars (the manifest's ``train`` split, in id order) are cut into shards of ``invert.shard_size``;
part ``p`` of ``N`` inverts the shards ``k`` with ``k % N == p``. A shard whose content-addressed file
already exists (same images, captions, model and inversion config) is skipped, and an exemplar found in
any existing shard is copied rather than inverted again, so changing one image re-inverts that image
only and a killed run resumes where it stopped. The merge writes ``index.parquet`` (one row per
exemplar: shard, offset, checksum, key, diagnostics), ``metrics.json``, ``report.html`` and logs to MLflow.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import invert_report, manifest, shards
from .config import Params
from .images import load_image
from .integrity import write_checksum
from .inversion import (finite_mean, invert, psnr, regenerate, ssim, trajectory_log_prob,
                        transition_stats_and_samples)
from .policies import FlowPolicy, cond_cat, load_policy, model_fingerprint
from .io import atomic_write, atomic_write_text
from .stage import Parts, open_output, tracked
from .sampling import seeded_generator

log = logging.getLogger(__name__)


class InvertError(ValueError):
    """The manifest or the invert options are unusable."""


# ---------------------------------------------------------------------------------------------- inputs
def read_manifest(path: str | Path) -> pd.DataFrame:
    """The exemplars to invert: the ``train`` split of a curate manifest, sorted by id (none is an error)."""
    return manifest.read_manifest(path, split=manifest.TRAIN, key="invert.manifest", error=InvertError,
                                  nonempty=True)


def inversion_config(p: Params) -> dict[str, Any]:
    """Everything an exemplar's trajectory depends on besides the image, caption and model."""
    inv = p.invert
    cfg = {"mode": inv.mode, "resolution": p.model.resolution, "num_steps": p.sample.num_steps,
           "seed": p.seed, "guidance_scale": inv.guidance_scale}
    if inv.mode == "fixed_point" or (inv.mode == "bridge" and inv.bridge_start == "ode"):
        cfg["fixed_point_iters"] = inv.fixed_point_iters
    if inv.mode == "bridge":
        cfg.update(bridge_start=inv.bridge_start, step_type=p.sample.step_type, noise_level=p.sample.noise_level)
    return cfg


def plan_shards(df: pd.DataFrame, keys: list[str], shard_size: int) -> list[dict[str, Any]]:
    plan = []
    for k, lo in enumerate(range(0, len(df), shard_size)):
        rows = list(range(lo, min(lo + shard_size, len(df))))
        plan.append({"index": k, "rows": rows, "name": shards.shard_name([keys[r] for r in rows])})
    return plan


# ---------------------------------------------------------------------------------------------- work
class Inverter:
    """Inverts exemplars and computes their diagnostics with one loaded policy."""

    def __init__(self, params: Params, device: str | torch.device = "cpu"):
        self.p = params
        self.policy: FlowPolicy = load_policy(params.model.family, params.model.path, device=device)
        self.policy.freeze_all()
        r = params.model.resolution
        self.sigmas = self.policy.sigmas(params.sample.num_steps, r, r)
        s = params.sample
        self.train_cfg = s.cfg and s.guidance_scale != 1.0  # log-probs as the trainer will compute them
        self._uncond = self.policy.encode_prompts([""])
        self.seconds_inverting = 0.0  # the inversion alone, without the diagnostics
        self._caption_cache: dict[str, torch.Tensor] = {}  # caption -> generated samples' per-step log-probs

    def _uncond_n(self, n: int, needed: bool):
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._uncond.items()} if needed else None

    @torch.no_grad()
    def run(self, images: torch.Tensor, captions: list[str], keys: list[str],
            preview: bool = False) -> dict[str, torch.Tensor]:
        """Invert a batch; with ``preview``, also ``preview`` ``[n, 4, 3, R, R]``: the report's image row
        (real, VAE round trip, ODE regeneration, bridge end) of each image."""
        p, s, inv = self.p, self.p.sample, self.p.invert
        n = images.shape[0]
        cond = self.policy.encode_prompts(captions)
        x0 = self.policy.encode(images.to(self.policy.device))
        # Per-exemplar noise from its key: the same image gets the same bridge wherever it is inverted.
        gens = [seeded_generator(p.seed, int(k[:12], 16), 11) for k in keys]
        inv_unc = self._uncond_n(n, inv.guidance_scale != 1.0)
        t0 = time.perf_counter()
        out = invert(self.policy, x0, cond, self.sigmas, mode=inv.mode, step_type=s.step_type,
                     noise_level=s.noise_level, fixed_point_iters=inv.fixed_point_iters, generators=gens,
                     bridge_start=inv.bridge_start, uncond=inv_unc, guidance_scale=inv.guidance_scale)
        self.seconds_inverting += time.perf_counter() - t0
        g = s.guidance_scale if self.train_cfg else 1.0
        # Generated samples of the same caption: where does the exemplar's trajectory log-prob fall? Sampled
        # once per caption (curated captions repeat), for all new captions of the batch together and in the
        # same forward passes as the exemplars' own transition statistics (log-probs and residuals).
        k = inv.diagnostic_samples
        new = [j for j, c in enumerate(captions) if c not in self._caption_cache and c not in captions[:j]]
        gens = [gg for j in new for gg in self._caption_generators(captions[j])]
        sample_cond = (cond_cat([{kk: v[j:j + 1].expand(k, *v.shape[1:]) for kk, v in cond.items()} for j in new])
                       if new else None)
        stats, samples_lp = transition_stats_and_samples(
            self.policy, out.latents, cond, self.sigmas, step_type=s.step_type, noise_level=s.noise_level,
            trainable=out.trainable, uncond=self._uncond_n(n + len(gens), self.train_cfg), guidance_scale=g,
            sample_cond=sample_cond, sample_generators=gens)
        for c, j in enumerate(new):
            self._caption_cache[captions[j]] = samples_lp[c * k:(c + 1) * k]
        # Reconstruction: the deterministic sample from the inverted start, against the real image and
        # against the VAE's own reconstruction (the ceiling any inversion can reach).
        regen = self.policy.decode(regenerate(self.policy, out.latents[:, 0], cond, self.sigmas, inv_unc,
                                              inv.guidance_scale))
        vae_rec = self.policy.decode(x0)
        gen_lp = []
        for j in range(n):
            per_step = self._caption_cache[captions[j]]
            gen_lp.append(trajectory_log_prob(torch.where(out.trainable[j:j + 1].expand(k, -1), per_step,
                                                          torch.zeros_like(per_step))))
        gen_lp = torch.stack(gen_lp)  # [n, k]
        extra = {}
        if preview:  # the bridge's last sampled state, before its deterministic landing on x0
            end = self.policy.decode(out.latents[:, -2])
            extra["preview"] = torch.stack([images.to(regen.device), vae_rec, regen, end], dim=1).float().cpu()
        return extra | {
            "latents": out.latents.float().cpu(),
            "trainable": out.trainable.to(torch.uint8).cpu(),
            "log_probs_ref": stats.log_probs.float().cpu(),
            "residual_ms": stats.residual_ms.float().cpu(),
            "psnr": psnr(regen, images.to(regen.device)).cpu(),
            "ssim": ssim(regen, images.to(regen.device)).cpu(),
            "psnr_vae": psnr(vae_rec, images.to(regen.device)).cpu(),
            "traj_logprob": trajectory_log_prob(stats.log_probs).cpu(),
            "gen_logprob_mean": gen_lp.mean(dim=1).cpu(),
            "gen_logprob_std": gen_lp.std(dim=1).cpu(),
        }


    def _caption_generators(self, caption: str) -> list[torch.Generator]:
        """The ``invert.diagnostic_samples`` generators of a caption's generated samples (seeded by it)."""
        tag = int(hashlib.sha256(caption.encode()).hexdigest()[:12], 16)
        return [seeded_generator(self.p.seed, tag, 12, i) for i in range(self.p.invert.diagnostic_samples)]


PER_EXEMPLAR = ("latents", "trainable", "log_probs_ref", "residual_ms", "psnr", "ssim", "psnr_vae", "traj_logprob",
                "gen_logprob_mean", "gen_logprob_std")


def _existing_entries(shard_dir: Path) -> dict[str, tuple[Path, int]]:
    """key -> (shard, offset) for every complete shard on disk."""
    found: dict[str, tuple[Path, int]] = {}
    for path in sorted(shard_dir.glob(shards.SHARD_GLOB)):
        if shards.shard_checksum(path) is None:
            continue
        try:
            meta = shards.read_metadata(path)
        except Exception:  # unreadable: it will be overwritten if needed, never trusted
            continue
        for off, key in enumerate(meta.get("keys", [])):
            found.setdefault(key, (path, off))
    return found


def invert_part(params: Params, out_dir: Path, part: int = 0, num_parts: int = 1, batch_size: int = 4,
                device: str = "cpu") -> dict[str, Any]:
    """Write the missing shards of part ``part``; returns counts and timing."""
    df = read_manifest(params.invert.manifest)
    fp = model_fingerprint(params.model.family, params.model.path)
    cfg = inversion_config(params)
    keys = [shards.exemplar_key(h, c, fp, cfg) for h, c in zip(df["content_hash"], df["caption"])]
    shard_dir = out_dir / "shards"
    plan = [sh for sh in plan_shards(df, keys, params.invert.shard_size) if sh["index"] % num_parts == part]
    todo = [sh for sh in plan if shards.shard_checksum(shard_dir / sh["name"]) is None]
    counts = {"shards_planned": len(plan), "shards_reused": len(plan) - len(todo), "exemplars_inverted": 0,
              "exemplars_copied": 0, "seconds_total": 0.0, "seconds_inverting": 0.0, "seconds_loading": 0.0}
    if not todo:
        return counts
    existing = _existing_entries(shard_dir)
    inverter: Inverter | None = None
    res = params.model.resolution
    for sh in tqdm(todo, desc=f"invert part {part}/{num_parts}"):
        rows = sh["rows"]
        entries: dict[int, dict[str, torch.Tensor]] = {}
        sigmas = None
        for r in rows:  # copy exemplars that an older shard already holds
            if keys[r] in existing:
                path, off = existing[keys[r]]
                tensors, _ = shards.read_shard(path)
                entries[r] = {k: tensors[k][off] for k in PER_EXEMPLAR}
                sigmas = tensors["sigmas"]  # same key -> same schedule
                counts["exemplars_copied"] += 1
        missing = [r for r in rows if r not in entries]
        if missing and inverter is None:  # loading the model is not inversion work: timed apart
            t_load = time.perf_counter()
            inverter = Inverter(params, device=device)
            counts["seconds_loading"] += time.perf_counter() - t_load
        t0 = time.perf_counter()
        for lo in range(0, len(missing), batch_size):
            chunk = missing[lo:lo + batch_size]
            images = torch.stack([load_image(df["image_file"][r], res) for r in chunk])
            result = inverter.run(images, [str(df["caption"][r]) for r in chunk], [keys[r] for r in chunk],
                                  preview=any(r < invert_report.PREVIEW_COUNT for r in chunk))
            for i, r in enumerate(chunk):
                entries[r] = {k: result[k][i] for k in PER_EXEMPLAR}
                if r < invert_report.PREVIEW_COUNT:
                    invert_report.save_preview(out_dir, str(df["id"][r]), result["preview"][i])
        counts["seconds_total"] += time.perf_counter() - t0
        counts["exemplars_inverted"] += len(missing)
        tensors = {k: torch.stack([entries[r][k] for r in rows]) for k in PER_EXEMPLAR}
        tensors["sigmas"] = (inverter.sigmas if inverter is not None else sigmas).float()
        meta = {"ids": [str(df["id"][r]) for r in rows], "keys": [keys[r] for r in rows],
                "captions": [str(df["caption"][r]) for r in rows],
                "content_hashes": [str(df["content_hash"][r]) for r in rows], "config": cfg, "model_fingerprint": fp}
        shards.write_shard(shard_dir / sh["name"], tensors, meta)
    if inverter is not None:
        counts["seconds_inverting"] = inverter.seconds_inverting
    return counts


# ---------------------------------------------------------------------------------------------- merge
def merge(params: Params, out_dir: Path, prune: bool = True) -> pd.DataFrame:
    """Verify every planned shard and write index.parquet (one row per exemplar, in id order)."""
    df = read_manifest(params.invert.manifest)
    fp = model_fingerprint(params.model.family, params.model.path)
    cfg = inversion_config(params)
    keys = [shards.exemplar_key(h, c, fp, cfg) for h, c in zip(df["content_hash"], df["caption"])]
    shard_dir = out_dir / "shards"
    rows = []
    wanted = set()
    for sh in plan_shards(df, keys, params.invert.shard_size):
        path = shard_dir / sh["name"]
        tensors, meta = shards.read_shard(path)
        checksum = shards.shard_checksum(path)
        wanted.add(sh["name"])
        for off, r in enumerate(sh["rows"]):
            rows.append({
                "id": str(df["id"][r]), "caption": str(df["caption"][r]), "content_hash": str(df["content_hash"][r]),
                "key": keys[r], "shard": f"shards/{sh['name']}", "offset": off, "checksum": checksum,
                "image_file": str(df["image_file"][r]),
                "mode": cfg["mode"], "model_fingerprint": fp, "config": json.dumps(cfg, sort_keys=True),
                "psnr": float(tensors["psnr"][off]), "ssim": float(tensors["ssim"][off]),
                "psnr_vae": float(tensors["psnr_vae"][off]),
                "residual_ms": finite_mean(tensors["residual_ms"][off]),
                "traj_logprob": float(tensors["traj_logprob"][off]),
                "gen_logprob_mean": float(tensors["gen_logprob_mean"][off]),
                "gen_logprob_std": float(tensors["gen_logprob_std"][off]),
            })
    index = pd.DataFrame(rows)
    atomic_write(out_dir / "index.parquet", lambda tmp: index.to_parquet(tmp, index=False))
    write_checksum(out_dir / "index.parquet")  # training verifies it before reading (portraitgen/integrity.py)
    if prune:  # shards of earlier inputs or configs that no exemplar refers to any more
        for path in shard_dir.glob(shards.SHARD_GLOB):
            if path.name not in wanted:
                log.info("removing stale shard %s", path.name)
                path.unlink()
                shards.checksum_path(path).unlink(missing_ok=True)
    return index


def summarize(index: pd.DataFrame, residual_by_step: np.ndarray) -> dict[str, Any]:
    z = (index["traj_logprob"] - index["gen_logprob_mean"]) / index["gen_logprob_std"].clip(lower=1e-12)
    return {"exemplars": int(len(index)), "shards": int(index["shard"].nunique()),
            "mode": str(index["mode"].iloc[0]) if len(index) else None,
            "psnr_mean": float(index["psnr"].mean()), "ssim_mean": float(index["ssim"].mean()),
            "psnr_vae_mean": float(index["psnr_vae"].mean()),
            "residual_ms_mean": float(np.nanmean(index["residual_ms"])),
            "residual_ms_by_step": [None if not np.isfinite(v) else float(v) for v in residual_by_step],
            "traj_logprob_mean": float(index["traj_logprob"].mean()),
            "gen_logprob_mean": float(index["gen_logprob_mean"].mean()),
            "traj_logprob_z_mean": float(z.mean())}


def residual_by_step(out_dir: Path, index: pd.DataFrame) -> np.ndarray:
    per_step = []
    for shard in sorted(index["shard"].unique()):
        tensors, _ = shards.read_shard(out_dir / shard)
        per_step.append(tensors["residual_ms"])
    if not per_step:
        return np.array([])
    return np.nanmean(torch.cat(per_step).numpy(), axis=0)


def run_invert(params: Params, out_dir: str | Path, *, part: int | None = None, num_parts: int = 1,
               merge_only: bool = False, batch_size: int = 4) -> dict[str, Any]:
    """The stage: invert (all parts, or one) and, unless running a single part of several, merge."""
    # The merge reads the content-addressed shards, not part files: it works with any --num-parts.
    parts = Parts.checked(part, num_parts, merge_only, error=InvertError, merge_reads_parts=False)
    read_manifest(params.invert.manifest)  # fail on a bad manifest before loading any model or writing
    out_dir = open_output(out_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counts: dict[str, Any] = {}
    for p in parts.to_run:
        for k, v in invert_part(params, out_dir, p, num_parts, batch_size, device).items():
            counts[k] = counts.get(k, 0) + v
    if parts.scattered:
        return counts  # a scattered job: the merge job builds the index
    index = merge(params, out_dir)
    summary = summarize(index, residual_by_step(out_dir, index))
    if counts.get("exemplars_inverted"):
        # With diagnostics (regeneration, generated samples, residuals) and without (inversion alone); the
        # model load is apart (`load_seconds`), since it does not grow with the number of images.
        summary["images_per_second"] = counts["exemplars_inverted"] / max(counts["seconds_total"], 1e-9)
        summary["inversion_images_per_second"] = counts["exemplars_inverted"] / max(counts["seconds_inverting"], 1e-9)
        summary["load_seconds"] = counts["seconds_loading"]
    summary.update({k: v for k, v in counts.items() if not k.startswith("seconds")})
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
    report = invert_report.write(out_dir, index, summary)
    with tracked(params.tracking, "invert", params={f"invert.{k}": v for k, v in asdict(params.invert).items()},
                 tags={"portraitgen.model_family": params.model.family}) as tracker:
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None}, 0)
        tracker.log_artifact(report)
        tracker.log_artifact(out_dir / "residuals.png")
        tracker.log_artifact(out_dir / "index.parquet")
    return summary

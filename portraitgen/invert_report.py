"""The inversion stage's report: what each diagnostic means and what good looks like, and, for the first
exemplars, a row of images (real, VAE round trip, ODE regeneration, bridge end) to see it.

The image rows are written by the stage while it inverts (``previews/<id>.png``, one strip of four
tiles); exemplars reused from earlier shards keep the strip of the run that inverted them.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .io import atomic_write, atomic_write_text

PREVIEW_COUNT = 8  # exemplars (the first, in id order) with an image row in the report
PREVIEW_DIR = "previews"
TILES = ("real", "VAE round trip", "ODE regeneration", "bridge end")

# summary key -> (what it is, what good looks like)
GUIDE: dict[str, tuple[str, str]] = {
    "psnr_mean": ("PSNR (dB) of the deterministic regeneration from the inverted start against the real image",
                  "close to psnr_vae_mean (the VAE's ceiling); more than ~10 dB below it means the inverted "
                  "start does not lead back to the image (a euler inversion drifts; bridge/fixed_point should not)"),
    "ssim_mean": ("structural similarity of the regeneration with the real image (0..1)",
                  "high (above ~0.7 for real models); the tiny test models give low values"),
    "psnr_vae_mean": ("PSNR (dB) of the VAE round trip (encode, decode) against the real image",
                      "the ceiling of any inversion; above ~25 dB for a real VAE. Low values mean the crops "
                      "are outside what the VAE reconstructs (resolution, exposure)"),
    "residual_ms_mean": ("mean squared standardised residual of each trajectory transition against the "
                         "policy's own SDE step (1 = exactly the policy's noise)",
                         "near 1 for bridge trajectories: the exemplars look like the policy's own samples to "
                         "the GRPO loss. Far below 1: deterministic steps with atypically high log-probs"),
    "traj_logprob_mean": ("mean per-dimension log-probability of the exemplars' trajectories under the policy",
                          "comparable to gen_logprob_mean (see the z-score)"),
    "gen_logprob_mean": ("the same log-probability for the policy's own samples of the same captions",
                         "the reference the exemplars are compared with"),
    "traj_logprob_z_mean": ("how many standard deviations of the generated samples the exemplars' log-prob lies "
                            "from theirs",
                            "within about ±3: exemplars and samples get comparable importance ratios in training; "
                            "large positive values (euler/fixed_point) give exemplars outsized weight"),
    "exemplars": ("exemplars inverted (the manifest's train split)", "the curated train count"),
    "images_per_second": ("exemplars per second with diagnostics", "throughput; see docs/performance"),
}


def save_preview(out_dir: Path, image_id: str, tiles: torch.Tensor) -> Path:
    """``tiles`` ``[4, 3, H, W]`` in [0, 1] (the order of TILES) -> one PNG strip ``previews/<id>.png``."""
    from PIL import Image

    strip = torch.cat(list(tiles.float().clamp(0, 1)), dim=2)  # [3, H, 4W]
    arr = (strip.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    path = out_dir / PREVIEW_DIR / f"{image_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def _png_data(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _residual_plot(summary: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    steps = np.arange(len(summary["residual_ms_by_step"]))
    vals = [np.nan if v is None else v for v in summary["residual_ms_by_step"]]
    ax.plot(steps, vals, marker="o", label=f"{summary['mode']} exemplars")
    ax.axhline(1.0, color="grey", linestyle="--", label="policy noise (1)")
    ax.set_yscale("log")
    ax.set_xlabel("transition")
    ax.set_ylabel("mean standardised residual^2")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    return str(round(v, 4) if isinstance(v, float) else v)


def _guide_table(summary: dict[str, Any]) -> str:
    rows = []
    for key, value in summary.items():
        if key == "residual_ms_by_step":
            continue
        what, good = GUIDE.get(key, ("", ""))
        rows.append(f"<tr><th>{html.escape(key)}</th><td class='v'>{html.escape(_fmt(value))}</td>"
                    f"<td>{html.escape(what)}</td><td>{html.escape(good)}</td></tr>")
    return ("<table class='guide'><tr><th>metric</th><th>value</th><th>what it is</th>"
            "<th>what good looks like</th></tr>" + "".join(rows) + "</table>")


def _image_rows(out_dir: Path, index: pd.DataFrame) -> str:
    rows = []
    for r in index.head(PREVIEW_COUNT).to_dict("records"):
        path = out_dir / PREVIEW_DIR / f"{r['id']}.png"
        if not path.is_file():
            continue
        rows.append(f"<tr><td><img class='strip' alt='{html.escape(str(r['id']))}' src='{_png_data(path.read_bytes())}'>"
                    f"</td><td>{html.escape(str(r['id']))}<br>{html.escape(str(r['caption']))}<br>"
                    f"PSNR {r['psnr']:.2f} dB (VAE {r['psnr_vae']:.2f} dB)</td></tr>")
    if not rows:
        return "<p>No image rows: the exemplars shown here were inverted before image rows existed.</p>"
    head = "".join(f"<th>{html.escape(t)}</th>" for t in TILES)
    return (f"<p>Each row, left to right: {', '.join(TILES)} (the last sampled state before the bridge lands "
            f"on the real latent; pure mode euler/fixed_point show their state there too).</p>"
            f"<table class='rows'><tr><td><table class='tiles'><tr>{head}</tr></table></td><th>exemplar</th></tr>"
            + "".join(rows) + "</table>")


def write(out_dir: Path, index: pd.DataFrame, summary: dict[str, Any]) -> Path:
    """``report.html`` (and ``residuals.png``) in ``out_dir``; every image is embedded, nothing is fetched."""
    plot = _residual_plot(summary)
    (out_dir / "residuals.png").write_bytes(plot)
    cols = ["id", "caption", "psnr", "ssim", "psnr_vae", "residual_ms", "traj_logprob", "gen_logprob_mean",
            "gen_logprob_std"]
    table = index[cols].to_html(index=False, float_format=lambda v: f"{v:.3f}", classes="exemplars")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>PortraitGen inversion report</title>"
            f"<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px;vertical-align:top;text-align:left}}"
            f"img.strip{{image-rendering:pixelated;height:128px}}.tiles th{{width:128px;border:0}}</style>"
            f"</head><body><h1>Inversion report ({html.escape(str(summary['mode']))})</h1>"
            f"<h2>Summary and how to read it</h2>{_guide_table(summary)}"
            f"<h2>Real, VAE round trip, ODE regeneration, bridge end</h2>{_image_rows(out_dir, index)}"
            f"<h2>Residuals against the policy's SDE mean</h2><p>1 = the policy's own noise; far below = "
            f"deterministic transitions with atypically high log-probs.</p><img src='{_png_data(plot)}'>"
            f"<h2>Exemplars</h2>{table}</body></html>")
    return atomic_write_text(out_dir / "report.html", page)

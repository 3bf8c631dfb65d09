"""The inversion report: a guide per metric and, per exemplar, real / VAE round trip / ODE regeneration /
bridge end images, all embedded (nothing fetched)."""
from __future__ import annotations

import html
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from portraitgen.config import params_from_dict
from portraitgen.images import load_image
from portraitgen.invert import run_invert
from portraitgen.invert_report import GUIDE, PREVIEW_DIR

from helpers import fast_params, make_manifest


@pytest.fixture(scope="module")
def inverted(tmp_path_factory):
    torch.set_num_threads(1)
    tmp_path = tmp_path_factory.mktemp("inverted")
    manifest = make_manifest(tmp_path / "curate", n=3)
    params = params_from_dict(fast_params(**{"invert.manifest": str(manifest), "invert.shard_size": 2,
                                             "invert.diagnostic_samples": 2}))
    out = tmp_path / "invert"
    return params, out, run_invert(params, out)


def test_report_has_a_metric_guide_and_one_image_row_per_exemplar(inverted):
    params, out, summary = inverted
    index = pd.read_parquet(out / "index.parquet")
    res = params.model.resolution
    for r in index.to_dict("records"):
        strip = np.asarray(Image.open(out / PREVIEW_DIR / f"{r['id']}.png"))
        assert strip.shape == (res, 4 * res, 3)
        real = (load_image(r["image_file"], res).permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(strip[:, :res].astype(float) - real).max() <= 1  # tile 1 is the real image
        tiles = [strip[:, i * res:(i + 1) * res].astype(float) for i in range(4)]
        assert all(np.abs(tiles[0] - t).mean() > 0.5 for t in tiles[1:])  # the others are reconstructions

    page = (out / "report.html").read_text()
    assert len(re.findall(r"<img class='strip' alt='[0-9a-f]+' src='data:image/png;base64,", page)) == 3
    for key in ("psnr_mean", "psnr_vae_mean", "residual_ms_mean", "traj_logprob_z_mean"):
        what, good = GUIDE[key]
        assert key in summary and html.escape(what) in page and html.escape(good.split(";")[0]) in page
    assert "what good looks like" in page and "http" not in page.replace("http-equiv", "")

    # A rerun reuses every shard: the rows of the run that inverted them stay in the report.
    run_invert(params, out)
    assert len(re.findall(r"<img class='strip'", (out / "report.html").read_text())) == 3


def test_chromium_decodes_every_image_of_the_report(inverted, tmp_path):
    """The image rows and the residual plot, as a browser shows them (no network: all embedded)."""
    from browser import chromium_or_skip, undecoded_images

    binary = chromium_or_skip()
    _, out, _ = inverted
    shutil.copy(out / "report.html", tmp_path / "report.html")
    assert undecoded_images(binary, tmp_path / "report.html") == (4, [])  # 3 image rows and the residual plot

"""Empty or unusable data fails at the stage that sees it, and an earlier good output survives."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from portraitgen.cli import main
from portraitgen.config import params_from_dict

from helpers import fast_params, make_manifest


def _astronaut(folder: Path) -> None:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(skimage.data.__file__).parent / "astronaut.png", folder / "astronaut.png")


def _unusable(folder: Path) -> None:
    """A 0-byte file, a flat grey square (no face) and a tiny image: nothing a portrait set can keep."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(buf, format="PNG")
    (folder / "grey.png").write_bytes(buf.getvalue())
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")


def _curate(tmp_path: Path, source: Path, **curate) -> int:
    data = fast_params()
    data["curate"] = {"source": str(source), **curate}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    return main(["curate", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out"),
                 "--workers", "1"])


def test_curate_keeping_nothing_fails_names_the_folder_and_keeps_the_previous_output(tmp_path, capsys):
    good = tmp_path / "good"
    _astronaut(good)
    assert _curate(tmp_path, good) == 0
    manifest = tmp_path / "out" / "manifest.parquet"
    before = manifest.read_bytes()
    images_before = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert len(pd.read_parquet(manifest)) == 1

    bad = tmp_path / "bad"
    _unusable(bad)
    capsys.readouterr()
    assert _curate(tmp_path, bad) == 2
    err = capsys.readouterr().err
    assert f"curate.source {bad}: 0 of 3 image(s) kept, fewer than curate.min_kept=1" in err
    assert "unreadable 1" in err and "too_small 1" in err and "no_face 1" in err
    # Nothing of the good run was replaced or removed.
    assert manifest.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == images_before


def test_curate_min_kept_is_a_configurable_floor(tmp_path, capsys):
    good = tmp_path / "good"
    _astronaut(good)
    assert _curate(tmp_path, good, min_kept=2) == 2
    assert "1 of 1 image(s) kept, fewer than curate.min_kept=2; rejected: none" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    with pytest.raises(Exception, match="curate.min_kept"):
        params_from_dict({**fast_params(), "curate": {"min_kept": 0}})


def test_invert_on_a_manifest_without_train_rows_says_so_and_writes_nothing(tmp_path, capsys):
    manifest = make_manifest(tmp_path / "curate", n=2)
    df = pd.read_parquet(manifest)
    df["split"] = "bench_reference"
    df.to_parquet(manifest, index=False)
    data = fast_params()
    data["invert"] = {"manifest": str(manifest)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "invert"
    assert main(["invert", "--params", str(tmp_path / "params.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{manifest} has no exemplars in its train split (3 row(s) in all); nothing was written" in err
    assert not out.exists()

"""``portraitgen curate``: a folder of real portraits -> a clean, captioned, face-centred training set.

    portraitgen curate --params params.yaml --out results/curate                       # everything
    portraitgen curate --params params.yaml --out results/curate --part 0 --num-parts 8   # one cluster job
    portraitgen curate --params params.yaml --out results/curate --merge-only --num-parts 8   # gather

Two phases:

1. **analyse** (parallel, cached): every listed file is read, hashed (SHA-256 of its bytes), decoded
   (EXIF orientation applied; greyscale, CMYK, palette, 16-bit and alpha images converted to RGB,
   alpha composited on white), searched for faces (faces.py), given a face-centred square crop whose
   quality is measured (quality.py), and hashed perceptually as a whole. The result is cached under
   ``<out>/cache/`` keyed by the content hash and the few params that change it (resolution, crop
   scale, detector settings), so a rerun only analyses new or changed files, and every threshold can
   change without re-analysing anything. Images that pass the per-image thresholds get their crop
   rendered at ``model.resolution`` (LANCZOS) into the cache too.
2. **judge** (one process): include/exclude lists, unreadable files, exact duplicates, the per-image
   thresholds of ``curate.*``, then near-duplicates by perceptual hash (of a group, the image with the
   largest crop, then the best quality, is kept), captions (captions.py) and the train /
   bench-reference split (by a hash of the id, so adding images never moves an image to the other
   split). Kept crops are hard-linked (or copied) from the cache to ``images/<id>.png``.

Outputs in ``--out``: ``manifest.parquet`` (kept images, sorted by id; byte-identical for the same
inputs and params), ``images/<id>.png``, ``rejected.parquet`` (source_path, content_hash, reason,
detail), ``metrics.json``, ``report.html`` + ``contact_sheet.png``, and an MLflow run (stage curate).

Parts: file ``rel`` goes to part ``sha256(rel) % num_parts``. A part job analyses its files and
writes ``parts/part-I-of-N.jsonl``; the merge job reads every part (failing on a missing or stale
one) and judges. One process, several parts or one part per job give the same outputs.
"""
from __future__ import annotations

import filecmp
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from . import captions as cap
from . import demo_portraits, faces, manifest, quality
from .config import CurateConfig, Params, flatten
from .io import atomic_write_bytes
from .stage import Parts, open_output, part_command, part_file, tracked

log = logging.getLogger(__name__)

ANALYSIS_VERSION = 1  # bump when the analysis changes what it computes: every cache entry is redone
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white
THUMB_SIDE = 128  # px, long side of the report thumbnails
# Image formats curate does not read: such files are recorded (unsupported_format), not silently passed over.
UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".ico", ".psd", ".dng",
                                ".cr2", ".nef", ".arw")
REASONS = ("unreadable_folder", "not_a_file", "unsupported_format",
           "excluded", "not_included", "unreadable", "duplicate", "too_small", "extreme_aspect", "no_face",
           "too_many_faces", "face_too_small", "upscale_too_large", "blurry", "bad_exposure", "low_contrast",
           "near_duplicate")


class CurateError(ValueError):
    """The curate source, a sidecar/list file, a part file or the options are unusable."""


# ================================================================================================ inputs
@dataclass(frozen=True)
class Item:
    rel: str  # path relative to the source folder / list file (POSIX); what parts and sidecars key on
    path: str  # the path recorded as source_path (relative to the working directory when the source is)


@dataclass
class Listing:
    items: list[Item]
    captions_file: str  # the sidecar used when curate.captions is empty ("" = none)
    captions_key: str  # the params key reported in errors about that file
    origins: dict[str, str]  # rel -> where a built-in file came from
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (rel, reason, detail), see scan_folder


@dataclass
class FolderScan:
    images: list[str]  # regular image files (relative POSIX paths), sorted
    others: list[str]  # other regular files, sorted
    skipped: list[tuple[str, str, str]]  # (rel, reason, detail): what is not read, and why


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def scan_folder(folder: str | Path) -> FolderScan:
    """The files under ``folder``, recursively (hidden files and folders left out), never opening one.

    Symbolic links to folders are followed once per real folder (a link loop, or two links to one
    folder, is walked once). What cannot be used is recorded with its reason: a folder that cannot be
    listed (``unreadable_folder``), a FIFO, device, socket or broken link named like an image
    (``not_a_file``: opening a FIFO would block forever), an image format curate cannot read
    (``unsupported_format``). Snakemake's view of a source folder uses the same scan
    (portraitgen/stages.py), so a bad link there never aborts the workflow.
    """
    folder = Path(folder)
    images: list[str] = []
    others: list[str] = []
    skipped: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    links: list[tuple[Path, str]] = []  # symlinked folders, walked after every real one

    def visit(path: Path, rel: str) -> None:
        real = os.path.realpath(path)
        if real in seen:
            log.debug("curate: %s is a link to a folder already walked (%s)", path, real)
            return
        seen.add(real)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append((rel or ".", "unreadable_folder", f"cannot list folder: {exc.strerror or exc}"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            is_image = entry.name.lower().endswith(IMAGE_EXTENSIONS)
            try:
                st = entry.stat()  # follows links
            except OSError:
                if is_image:
                    skipped.append((child, "not_a_file", "broken symbolic link"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if entry.is_symlink():  # a folder's own path wins over a link to it
                    links.append((Path(entry.path), child))
                else:
                    visit(Path(entry.path), child)
            elif not stat.S_ISREG(st.st_mode):
                if is_image:
                    kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
                    skipped.append((child, "not_a_file", f"{kind}, not a regular file: not opened"))
            elif is_image:
                images.append(child)
            elif entry.name.lower().endswith(UNSUPPORTED_IMAGE_EXTENSIONS):
                skipped.append((child, "unsupported_format", f"{Path(entry.name).suffix.lower()} images are not "
                                                             f"read (supported: {', '.join(IMAGE_EXTENSIONS)})"))
            else:
                others.append(child)

    visit(folder, "")
    while links:
        visit(*links.pop(0))
    return FolderScan(sorted(images), sorted(others), sorted(skipped))


def _walk(folder: Path) -> list[str]:
    """Image files under ``folder`` (see :func:`scan_folder`), sorted."""
    return scan_folder(folder).images


def list_sources(params: Params, out_dir: Path) -> Listing:
    """Resolve ``curate.source`` into a sorted list of files."""
    c = params.curate
    src = c.source.strip()
    if src == "builtin:demo":
        folder = demo_portraits.materialise(out_dir / "demo")
        rels = _walk(folder)
        return Listing([Item(r, os.path.join(str(folder), r)) for r in rels], str(folder / "captions.jsonl"),
                       "curate.source (the builtin:demo captions)", demo_portraits.origins(folder))
    if src.startswith("builtin:"):
        raise CurateError(f"params key 'curate.source': unknown built-in set {src!r}; expected 'builtin:demo', "
                          f"a folder or a list file")
    path = Path(src)
    if path.is_dir():
        scan = scan_folder(path)
        if not scan.images:
            raise CurateError(f"params key 'curate.source': no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path}"
                              + (f" ({len(scan.skipped)} skipped, e.g. {scan.skipped[0][0]}: {scan.skipped[0][2]})"
                                 if scan.skipped else ""))
        return Listing([Item(r, os.path.join(src, r)) for r in scan.images], "", "", {},
                       [(r, reason, detail) for r, reason, detail in scan.skipped])
    if not path.is_file():
        raise CurateError(f"params key 'curate.source': not found: {path} (expected 'builtin:demo', a folder of "
                          f"images, or a .txt/.csv/.jsonl file listing image paths)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rels = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
        captions_file = ""
    elif suffix in (".csv", ".jsonl", ".ndjson"):
        try:
            rows = cap.read_table(path, "curate.source")
        except cap.CaptionError as exc:
            raise CurateError(str(exc)) from None
        col = cap.pick_column(rows, cap.PATH_COLUMNS)
        if col is None:
            raise CurateError(f"params key 'curate.source': {path} needs a path column ({'/'.join(cap.PATH_COLUMNS)})")
        rels = [str(r[col]).strip() for r in rows if str(r.get(col) or "").strip()]
        # A list with a caption column doubles as the captions sidecar.
        captions_file = str(path) if cap.pick_column(rows, cap.CAPTION_COLUMNS) else ""
    else:
        raise CurateError(f"params key 'curate.source': {path}: expected a folder or a .txt/.csv/.jsonl list")
    base = path.parent
    items = {}
    for r in rels:
        rel = os.path.normpath(r).replace(os.sep, "/")
        items[rel] = Item(rel, rel if os.path.isabs(rel) else os.path.normpath(os.path.join(str(base), rel)))
    if not items:
        raise CurateError(f"params key 'curate.source': {path} lists no files")
    return Listing([items[k] for k in sorted(items)], captions_file, "curate.source", {})


def part_of(rel: str, num_parts: int) -> int:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % num_parts


# ================================================================================================ analyse
def analysis_settings(params: Params) -> dict[str, Any]:
    """Everything an image's cached analysis depends on besides its bytes."""
    return {"version": ANALYSIS_VERSION, "resolution": params.model.resolution, "crop_scale": params.curate.crop_scale,
            "face_min_neighbors": params.curate.face_min_neighbors, "cascade": faces.CASCADE,
            "detect": [faces.DETECT_MAX_SIDE, faces.DETECT_MIN_SIDE, faces.DETECT_PAD, faces.PAD_BELOW,
                       faces.SCALE_FACTOR, faces.PROMINENT_FACE_RATIO], "analysis_max_side": quality.ANALYSIS_MAX_SIDE,
            "thumb_side": THUMB_SIDE}


def to_rgb(im) -> np.ndarray:
    """Any PIL image -> uint8 RGB [H, W, 3]."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if (im.mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        if im.mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        grey = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        im = Image.alpha_composite(bg, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _decode(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            info = {"format": im.format or "", "source_mode": im.mode,
                    "exif_orientation": int(im.getexif().get(0x0112, 1) or 1)}
            im.load()  # a truncated file fails here
            im = ImageOps.exif_transpose(im)
            return to_rgb(im), info
    except UnidentifiedImageError:
        raise ValueError("not an image file (no known image format)") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"too many pixels: {exc}") from None
    except Exception as exc:  # truncated, corrupt, unsupported variant, ...
        raise ValueError(f"corrupt or truncated image: {type(exc).__name__}: {exc}") from None


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def render_crop(rgb: np.ndarray, box: faces.Box, resolution: int) -> bytes:
    from PIL import Image

    x0, y0, x1, y1 = box
    crop = Image.fromarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
    return _png(np.asarray(crop.resize((resolution, resolution), Image.Resampling.LANCZOS)))


def _thumbnail(rgb: np.ndarray, boxes: list[faces.Box], crop: faces.Box | None) -> bytes:
    """JPEG of the whole image, long side THUMB_SIDE, faces outlined in green and the crop in yellow."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(rgb)
    s = THUMB_SIDE / max(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(im)
    for box, colour in [*((b, (0, 220, 0)) for b in boxes), *(((crop, (255, 210, 0)),) if crop else ())]:
        draw.rectangle([box[0] * s, box[1] * s, box[2] * s - 1, box[3] * s - 1], outline=colour)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def analyse_bytes(data: bytes, settings: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray | None, bytes | None]:
    """Measurements of one file (no thresholds applied), its decoded RGB pixels and its thumbnail JPEG."""
    import cv2

    try:
        rgb, info = _decode(data)
    except ValueError as exc:
        return {"error": str(exc)}, None, None
    h, w = rgb.shape[:2]
    rec: dict[str, Any] = {"error": "", "width": int(w), "height": int(h), **info}
    det = faces.detect_faces(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), settings["face_min_neighbors"])
    rec["faces"] = [list(b) for b in det.boxes]
    rec["prominent_faces"] = det.prominent
    box = None
    if det.boxes:
        face = det.boxes[0]
        box = faces.square_crop(face, w, h, settings["crop_scale"])
        crop_rgb = rgb[box[1]:box[3], box[0]:box[2]]
        m = quality.measure(crop_rgb)
        side = box[2] - box[0]
        exact_grey = bool(np.array_equal(crop_rgb[..., 0], crop_rgb[..., 1])
                          and np.array_equal(crop_rgb[..., 1], crop_rgb[..., 2]))
        rec.update(face_box=list(face), crop_box=list(box), crop_side=int(side),
                   face_to_crop=faces.face_side(face) / side, phash=quality.phash(rgb),
                   greyscale=exact_grey or m["colourfulness"] < cap.GREY_COLOURFULNESS, **m)
    return rec, rgb, _thumbnail(rgb, det.boxes, box)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


@dataclass(frozen=True)
class CropWhen:
    """When a worker renders an image's crop: always (``force``), or when it passes ``judge(rec, cfg, res)``.

    Crops cost a resize and a PNG encode at the training resolution, so they are rendered only for
    images that will (most likely) be kept; the merge renders any that a changed threshold now needs.
    """

    cfg: CurateConfig | None = None
    resolution: int = 0
    force: bool = False

    def __call__(self, rec: dict[str, Any]) -> bool:
        if not rec.get("face_box"):
            return False
        return self.force or (self.cfg is not None and judge(rec, self.cfg, self.resolution) is None)


def analyse_file(path: str, cache_dir: str, settings: dict[str, Any],
                 crop_when: CropWhen = CropWhen()) -> dict[str, Any]:
    """One file's cached analysis (a worker's task). Never raises for a bad file: it reports it."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a FIFO would block the worker forever: never opened
            kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
            return {"error": f"{kind}, not a regular file: not opened", "content_hash": "", "cached": False}
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {"error": "file not found", "content_hash": "", "cached": False}
    except OSError as exc:
        return {"error": f"cannot read file: {exc.strerror or exc}", "content_hash": "", "cached": False}
    digest = hashlib.sha256(data).hexdigest()
    key = hashlib.sha256((digest + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    cache = Path(cache_dir)
    meta = cache / key[:2] / f"{key}.json"
    rec, rgb = None, None
    if meta.is_file():
        try:
            rec = json.loads(meta.read_text())
            if rec.get("thumb_file") and not (cache / rec["thumb_file"]).is_file():
                rec = None
        except (OSError, ValueError):
            rec = None  # damaged entry: redo it
    cached = rec is not None
    if rec is None:
        rec, rgb, thumb = analyse_bytes(data, settings)
        rec.update(content_hash=digest, key=key, size_bytes=len(data), thumb_file="",
                   crop_file=f"{key[:2]}/{key}.png" if rec.get("face_box") else "")
        if thumb is not None:
            rec["thumb_file"] = f"{key[:2]}/{key}.thumb.jpg"
            _atomic_write(cache / rec["thumb_file"], thumb)
        _atomic_write(meta, json.dumps(rec, sort_keys=True).encode())  # after the thumbnail: means complete
    if rec.get("crop_file") and not (cache / rec["crop_file"]).is_file() and crop_when(rec):
        if rgb is None:
            rgb, _ = _decode(data)
        _atomic_write(cache / rec["crop_file"], render_crop(rgb, tuple(rec["crop_box"]), settings["resolution"]))
    return {**rec, "cached": cached}


def _analyse_task(task: tuple) -> dict[str, Any]:
    return analyse_file(*task)


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the curate process is gone (killed, even by SIGKILL), instead
    of leaving it to finish the queue for nobody. (Workers are children of the fork server, not of curate,
    so the parent's death is watched by pid.)"""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # the pid now belongs to another user's process: ours is gone
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="portraitgen-curate-parent-watch").start()


def default_workers() -> int:
    env = os.environ.get("PORTRAITGEN_WORKERS")
    return int(env) if env else (os.cpu_count() or 1)


def analyse_all(paths: list[str], cache_dir: Path, settings: dict[str, Any], workers: int,
                crop_when: CropWhen, desc: str = "curate") -> list[dict[str, Any]]:
    """Analyse ``paths`` (results in order) with a process pool and a progress bar."""
    from tqdm.auto import tqdm

    tasks = [(p, str(cache_dir), settings, crop_when) for p in paths]
    workers = max(1, min(workers, len(tasks)))
    # Also in logs (Snakemake, SLURM): there a line every 30 s instead of a live bar.
    bar = dict(total=len(tasks), desc=desc, unit="img", mininterval=1.0 if sys.stderr.isatty() else 30.0)
    if workers == 1:
        return [_analyse_task(t) for t in tqdm(tasks, **bar)]
    chunk = max(1, min(16, len(tasks) // (workers * 8)))
    # Never "fork": a parent that has used OpenCV, torch or MLflow threads (a test session, a notebook)
    # can leave locks held in the child, which then hangs. Workers start clean from a fork server
    # (or spawn); a script that calls run_curate needs the usual `if __name__ == "__main__":` guard.
    ctx = get_context("forkserver" if "forkserver" in get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        return list(tqdm(pool.map(_analyse_task, tasks, chunksize=chunk), **bar))


# ================================================================================================ parts
def _fingerprint(rels: list[str], settings: dict[str, Any]) -> str:
    payload = json.dumps({"rels": rels, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def write_part(out_dir: Path, part: int, num_parts: int, items: list[Item], records: list[dict],
               settings: dict[str, Any]) -> Path:
    path = part_file(out_dir, part, num_parts, "jsonl")
    header = {"part": part, "num_parts": num_parts, "fingerprint": _fingerprint([i.rel for i in items], settings)}
    lines = [json.dumps(header, sort_keys=True)]
    lines += [json.dumps({"rel": it.rel, **rec}, sort_keys=True) for it, rec in zip(items, records)]
    _atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def read_part(out_dir: Path, part: int, num_parts: int, items: list[Item], settings: dict[str, Any]) -> list[dict]:
    path = part_file(out_dir, part, num_parts, "jsonl")
    hint = f"run `{part_command('curate', out_dir, part, num_parts)}` before the merge"
    if not path.is_file():
        raise CurateError(f"part {part} of {num_parts} is missing: {path}; {hint}")
    lines = path.read_text().splitlines()
    try:
        header, rows = json.loads(lines[0]), [json.loads(ln) for ln in lines[1:]]
    except (ValueError, IndexError):
        raise CurateError(f"part file {path} is damaged; {hint}") from None
    if header.get("fingerprint") != _fingerprint([i.rel for i in items], settings):
        raise CurateError(f"part file {path} was made from other files or params than the current ones; {hint}")
    for r in rows:
        r.pop("rel", None)
    return rows


# ================================================================================================ judge
def _reject(reason: str, detail: str) -> tuple[str, str]:
    assert reason in REASONS, reason
    return reason, detail


def judge(rec: dict[str, Any], c: CurateConfig, resolution: int) -> tuple[str, str] | None:
    """The first per-image threshold ``rec`` fails, as (reason, detail), or None."""
    w, h = rec["width"], rec["height"]
    if min(w, h) < c.min_side:
        return _reject("too_small", f"{w}x{h} px: shorter side {min(w, h)} < curate.min_side={c.min_side}")
    aspect = max(w, h) / min(w, h)
    if aspect > c.max_aspect:
        return _reject("extreme_aspect", f"{w}x{h} px: aspect ratio {aspect:.2f} > curate.max_aspect={c.max_aspect}")
    if not rec["faces"]:
        return _reject("no_face", "no upright frontal face found (OpenCV Haar cascade)")
    if rec["prominent_faces"] > c.max_faces:
        return _reject("too_many_faces", f"{rec['prominent_faces']} faces > curate.max_faces={c.max_faces}")
    frac = faces.face_side(rec["face_box"]) / min(w, h)
    if frac < c.min_face_frac:
        return _reject("face_too_small", f"face side {faces.face_side(rec['face_box'])} px is {frac:.3f} of the "
                                         f"shorter side < curate.min_face_frac={c.min_face_frac}")
    up = resolution / rec["crop_side"]
    if up > c.max_upscale:
        return _reject("upscale_too_large", f"the {rec['crop_side']} px crop needs {up:.2f}x to reach "
                                            f"model.resolution={resolution} > curate.max_upscale={c.max_upscale}")
    if rec["blur"] > c.max_blur:
        return _reject("blurry", f"blur {rec['blur']:.3f} > curate.max_blur={c.max_blur}")
    if rec["brightness"] < c.min_brightness:
        return _reject("bad_exposure", f"too dark: mean luma {rec['brightness']:.3f} < "
                                       f"curate.min_brightness={c.min_brightness}")
    if rec["brightness"] > c.max_brightness:
        return _reject("bad_exposure", f"too bright: mean luma {rec['brightness']:.3f} > "
                                       f"curate.max_brightness={c.max_brightness}")
    if rec["clipped"] > c.max_clipped:
        return _reject("bad_exposure", f"clipped: {rec['clipped']:.3f} of pixels pure black/white > "
                                       f"curate.max_clipped={c.max_clipped}")
    if rec["contrast"] < c.min_contrast:
        return _reject("low_contrast", f"luma std {rec['contrast']:.3f} < curate.min_contrast={c.min_contrast}")
    return None


def quality_score(rec: dict[str, Any], resolution: int) -> float:
    """One summary figure in [0, 1]: sharp, unclipped and not upscaled is 1."""
    return float((1.0 - rec["blur"]) * (1.0 - rec["clipped"]) * min(1.0, rec["crop_side"] / resolution))


def split_of(image_id: str, c: CurateConfig) -> str:
    """The manifest split of an image id under the curate settings (:func:`portraitgen.manifest.split_of`)."""
    return manifest.split_of(image_id, c.split_seed, c.bench_fraction)


def _read_list(path: str, key: str) -> set[str]:
    p = Path(path)
    if not p.is_file():
        raise CurateError(f"params key '{key}': file not found: {p}")
    return {os.path.normpath(ln.strip()).replace(os.sep, "/") if not _is_hex(ln.strip()) else ln.strip().lower()
            for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.lstrip().startswith("#")}


def _is_hex(s: str) -> bool:
    return len(s) in (16, 64) and all(ch in "0123456789abcdefABCDEF" for ch in s)


def _listed(entries: set[str], item: Item, rec: dict[str, Any]) -> bool:
    h = rec.get("content_hash", "")
    return bool({item.rel, os.path.normpath(item.path).replace(os.sep, "/"), h, h[:16]} & entries)


# ================================================================================================ outputs
REJECTED_FIELDS: list[tuple[str, str]] = [
    ("source_path", "string"), ("content_hash", "string"), ("reason", "string"), ("detail", "string"),
    ("width", "int"), ("height", "int"), ("origin", "string"),
]


def _place(src: Path, dst: Path) -> None:
    """dst becomes a copy of src (never a hard link: editing a curated image must not edit the cache),
    written atomically; an identical existing copy is left alone."""
    if (dst.is_file() and not dst.is_symlink() and not os.path.samefile(src, dst)
            and filecmp.cmp(src, dst, shallow=False)):
        return
    atomic_write_bytes(dst, src.read_bytes())


def too_few_kept(c: CurateConfig, total: int, kept: int, rejected: list[dict[str, Any]]) -> str:
    """The error of a curation that kept too few images: the source, and why the others went."""
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"curate.source {c.source}: {kept} of {total} image(s) kept, fewer than curate.min_kept={c.min_kept}; "
            f"rejected: {reasons or 'none'}. Check the folder, or loosen the thresholds named by the most frequent "
            f"reasons (docs/workflow.md); the previous outputs were left as they were")


# ================================================================================================ stage
def run_curate(params: Params, out_dir: str | Path, *, part: int | None = None, num_parts: int = 1,
               merge_only: bool = False, workers: int | None = None) -> dict[str, Any]:
    """The stage: analyse (all parts, or one) and, unless running one part of several, judge and write."""
    from . import curate_report

    parts = Parts.checked(part, num_parts, merge_only, error=CurateError)
    out_dir = open_output(out_dir)
    t0 = time.perf_counter()
    c = params.curate
    # Fail on bad list/caption files before any work.
    include = _read_list(c.include, "curate.include") if c.include else None
    exclude = _read_list(c.exclude, "curate.exclude") if c.exclude else set()
    listing = list_sources(params, out_dir)
    captions_path, captions_key = (c.captions, "curate.captions") if c.captions else (
        listing.captions_file, listing.captions_key)
    try:
        sidecar = cap.SidecarCaptions.from_file(captions_path, captions_key) if captions_path else None
        captioner = None
        if c.caption_model:
            from .vlm_captioner import VlmCaptioner

            captioner = VlmCaptioner(c.caption_model, cache_dir=out_dir / "cache" / "captions")
    except cap.CaptionError as exc:
        raise CurateError(str(exc)) from None
    settings = analysis_settings(params)
    res = params.model.resolution
    cache_dir = out_dir / "cache"
    workers = default_workers() if workers is None else workers

    by_part: dict[int, list[int]] = {}
    for i, it in enumerate(listing.items):
        by_part.setdefault(part_of(it.rel, num_parts) if num_parts > 1 else 0, []).append(i)
    records: list[dict[str, Any] | None] = [None] * len(listing.items)
    t_analyse = time.perf_counter()
    if not merge_only:
        for p in parts.to_run:
            idx = by_part.get(p, [])
            items = [listing.items[i] for i in idx]
            recs = analyse_all([it.path for it in items], cache_dir, settings, workers, CropWhen(c, res),
                               desc="curate" if num_parts == 1 else f"curate part {p}/{num_parts}")
            for i, r in zip(idx, recs):
                records[i] = r
            if num_parts > 1:
                write_part(out_dir, p, num_parts, items, recs, settings)
    analyse_seconds = time.perf_counter() - t_analyse
    def tally(recs: list[dict[str, Any]]) -> dict[str, int]:
        return {"processed": sum(not r.get("cached") for r in recs), "cached": sum(bool(r.get("cached")) for r in recs)}

    analysed = [r for r in records if r is not None]
    counts = tally(analysed)
    if parts.scattered:
        log.info("curate part %d/%d: %d files (%d analysed, %d from cache) -> %s", part, num_parts, len(analysed),
                 counts["processed"], counts["cached"], part_file(out_dir, part, num_parts, "jsonl"))
        return {"part": part, "num_parts": num_parts, "files": len(analysed), **counts}
    if merge_only:
        for p in range(num_parts):
            idx = by_part.get(p, [])
            for i, r in zip(idx, read_part(out_dir, p, num_parts, [listing.items[i] for i in idx], settings)):
                records[i] = r
        counts = tally(records)  # as the part jobs found them
    assert all(r is not None for r in records)

    # ---- judge -------------------------------------------------------------------------------------
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    first_by_hash: dict[str, str] = {}

    def reject(item: Item, rec: dict[str, Any], reason: str, detail: str) -> None:
        rejected.append({"source_path": item.path, "content_hash": rec.get("content_hash", ""), "reason": reason,
                         "detail": detail, "width": rec.get("width"), "height": rec.get("height"),
                         "origin": listing.origins.get(item.rel, ""), "thumb_file": rec.get("thumb_file", "")})

    for rel, reason, detail in listing.skipped:  # found in the source but never read (scan_folder)
        rejected.append({"source_path": os.path.join(c.source.strip(), rel), "content_hash": "", "reason": reason,
                         "detail": detail, "width": None, "height": None, "origin": "", "thumb_file": ""})
    for item, rec in zip(listing.items, records):
        if _listed(exclude, item, rec):
            reject(item, rec, "excluded", f"listed in curate.exclude ({c.exclude})")
        elif include is not None and not _listed(include, item, rec):
            reject(item, rec, "not_included", f"not listed in curate.include ({c.include})")
        elif rec["error"]:
            reject(item, rec, "unreadable", rec["error"])
        elif rec["content_hash"] in first_by_hash:
            reject(item, rec, "duplicate", f"same bytes as {first_by_hash[rec['content_hash']]}")
        else:
            first_by_hash[rec["content_hash"]] = item.path
            verdict = judge(rec, c, res)
            if verdict:
                reject(item, rec, *verdict)
            else:
                kept.append({**rec, "source_path": item.path, "rel": item.rel,
                             "origin": listing.origins.get(item.rel, ""), "quality": quality_score(rec, res)})

    # Near-duplicates (pHash of the whole image, so resized or re-encoded copies match whatever their
    # crops): greedy over the best-first order; an image within the distance of a kept one goes.
    if c.dedup_max_distance >= 0 and kept:
        order = sorted(kept, key=lambda r: (-r["crop_side"], -r["quality"], r["source_path"]))
        kept_hashes = np.zeros(len(order), dtype=np.uint64)
        survivors: list[dict[str, Any]] = []
        for r in order:
            h = int(r["phash"], 16)
            if survivors:
                dist = quality.hamming_many(kept_hashes[:len(survivors)], h)
                j = int(np.argmin(dist))
                if dist[j] <= c.dedup_max_distance:
                    item = Item(r["rel"], r["source_path"])
                    reject(item, r, "near_duplicate",
                           f"pHash distance {int(dist[j])} <= curate.dedup_max_distance={c.dedup_max_distance} "
                           f"from {survivors[j]['source_path']} (kept)")
                    continue
            kept_hashes[len(survivors)] = np.uint64(h)
            survivors.append(r)
        kept = survivors

    if len(kept) < c.min_kept:
        # Before anything is written: the previous manifest, images and report stay as they were.
        raise CurateError(too_few_kept(c, len(listing.items), len(kept), rejected))

    # ---- ids, captions, split ------------------------------------------------------------------------
    for r in kept:
        r["id"] = r["content_hash"][:16]
    ids = [r["id"] for r in kept]
    if len(set(ids)) != len(ids):  # 64-bit prefix collision of different contents: never silently merge
        raise CurateError("two different files share the first 16 hex digits of their SHA-256; cannot assign ids")
    kept.sort(key=lambda r: r["id"])
    # Crops the workers did not render (thresholds changed since the analysis, or the cache was pruned).
    missing = [r for r in kept if not (cache_dir / r["crop_file"]).is_file()]
    if missing:
        analyse_all([r["source_path"] for r in missing], cache_dir, settings, workers, CropWhen(force=True),
                    desc="curate: crops")
        gone = [r["source_path"] for r in missing if not (cache_dir / r["crop_file"]).is_file()]
        if gone:
            raise CurateError(f"{len(gone)} file(s) changed or vanished since they were analysed, e.g. {gone[0]}; "
                              f"rerun the stage")
    caption_counts = assign_captions(kept, sidecar, captioner, out_dir)
    if sidecar is not None:
        caption_counts["sidecar_rows_unmatched"] = sidecar.unmatched((it.rel, it.path) for it in listing.items)
        if caption_counts["sidecar_rows_unmatched"]:
            log.warning("%s: %d row(s) match no listed image file (check their paths)", sidecar.origin,
                        caption_counts["sidecar_rows_unmatched"])
    for r in kept:
        r.update(image_path=f"images/{r['id']}.png", split=split_of(r["id"], c), upscale=res / r["crop_side"],
                 num_faces=r["prominent_faces"],
                 face_frac=faces.face_side(r["face_box"]) / min(r["width"], r["height"]))

    # ---- write ---------------------------------------------------------------------------------------
    images = out_dir / "images"
    images.mkdir(exist_ok=True)
    wanted = {f"{r['id']}.png" for r in kept}
    for f in images.iterdir():  # images of an earlier run that are no longer kept
        if f.name not in wanted:
            f.unlink() if f.is_file() or f.is_symlink() else shutil.rmtree(f)
    for r in kept:
        _place(cache_dir / r["crop_file"], images / f"{r['id']}.png")
    provenance = {"portraitgen.curate": json.dumps({"curate": asdict(c), "model.resolution": res,
                                                    "analysis": settings}, sort_keys=True)}
    manifest.write_manifest(out_dir / manifest.FILE, kept, provenance)
    rejected.sort(key=lambda r: (r["source_path"], r["reason"]))
    manifest.write_table(out_dir / "rejected.parquet", rejected, REJECTED_FIELDS, provenance)

    by_reason = {reason: 0 for reason in REASONS}
    for r in rejected:
        by_reason[r["reason"]] += 1
    seconds = time.perf_counter() - t0
    metrics = {
        "total": len(listing.items) + len(listing.skipped), "kept": len(kept), "rejected": len(rejected),
        "rejected_by_reason": by_reason,
        "split": {s: sum(r["split"] == s for r in kept) for s in ("train", "bench_reference")},
        "captions": caption_counts, **counts, "workers": workers, "num_parts": num_parts,
        "resolution": res, "seconds": round(seconds, 3),
        "images_per_second": round(counts["processed"] / analyse_seconds, 3)
        if counts["processed"] and not merge_only and analyse_seconds > 0 else None,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report, sheet = curate_report.write(out_dir, kept, rejected, metrics, cache_dir)
    log.info("curate: %d kept (%d train, %d bench_reference), %d rejected %s; %d analysed, %d from cache; %s",
             len(kept), metrics["split"]["train"], metrics["split"]["bench_reference"], len(rejected),
             {k: v for k, v in by_reason.items() if v}, counts["processed"], counts["cached"], out_dir)
    _track(params, out_dir, metrics, report, sheet)
    return metrics


def assign_captions(kept: list[dict[str, Any]], sidecar: cap.SidecarCaptions | None, captioner: Any,
                    out_dir: Path) -> dict[str, int]:
    """Fill caption, caption_source and attributes of every kept row (never an empty caption)."""
    counts = {"sidecar": 0, "vlm": 0, "template": 0, "sidecar_empty": 0, "vlm_empty": 0}
    need_model = []
    for r in kept:
        hit = sidecar.lookup(r["rel"], r["source_path"]) if sidecar else None
        r["attributes"] = json.dumps(hit["attributes"], sort_keys=True) if hit and hit["attributes"] else ""
        if hit and hit["caption"]:
            r["caption"], r["caption_source"] = hit["caption"], "sidecar"
        else:
            counts["sidecar_empty"] += bool(hit)
            need_model.append(r)
    if captioner is not None and need_model:
        try:
            texts = captioner.caption([out_dir / "cache" / r["crop_file"] for r in need_model],
                                      [r["key"] for r in need_model])  # the crop's analysis key
        except cap.CaptionError as exc:
            raise CurateError(str(exc)) from None
        for r, text in zip(need_model, texts):
            if text.strip():
                r["caption"], r["caption_source"] = text.strip(), "vlm"
            else:
                counts["vlm_empty"] += 1
    for r in kept:
        if not str(r.get("caption") or "").strip():
            r["caption"], r["caption_source"] = cap.template_caption(r), "template"
        counts[r["caption_source"]] += 1
        if not r["caption"].strip():
            raise CurateError(f"empty caption for {r['source_path']}")  # unreachable: the template is never empty
    if counts["sidecar_empty"]:
        log.warning("%s: %d kept image(s) have an empty caption there; they get template captions",
                    sidecar.origin, counts["sidecar_empty"])
    return counts


def _track(params: Params, out_dir: Path, metrics: dict[str, Any], report: Path, sheet: Path) -> None:
    with tracked(params.tracking, "curate", params={**flatten({"curate": asdict(params.curate)}),
                                                    "model.resolution": params.model.resolution}) as tracker:
        flat = flatten({k: v for k, v in metrics.items() if k != "captions"})
        flat.update({f"captions.{k}": v for k, v in metrics["captions"].items()})
        tracker.log_metrics({k: v for k, v in flat.items() if isinstance(v, (int, float)) and v is not None}, 0)
        tracker.log_artifact(report)
        tracker.log_artifact(sheet)
        tracker.log_artifact(out_dir / "metrics.json")
        tracker.log_artifact(out_dir / "manifest.parquet")
        tracker.log_dataset(out_dir / "manifest.parquet", name="curated-portraits", context="curated")
        tracker.log_artifact(out_dir / "rejected.parquet")

"""PortraitBench's measurements of one image, of a prompt's images and of a model's whole set.

Per image (``analyse_image``, ``reward_columns``):

- every configured reward (``bench.reward``) and each of its sub-scores, as the reward returns them;
  undefined sub-scores (e.g. skin features when no face is found) stay NaN here, so that means are
  taken over the images where they exist;
- ``face_detected``: a frontal face found by the curate stage's detector (:mod:`portraitgen.faces`,
  OpenCV's Haar cascade "alt2", ``curate.face_min_neighbors``);
- raw artifact measurements, turned into 0/1 flags against the real reference set by
  :class:`ArtifactThresholds`: the skin of the largest face (:mod:`portraitgen.rewards.skin`:
  specular-highlight fraction, high-frequency texture, saturation) and the image's mean luma;
- a 59-number hand-crafted feature vector (:func:`image_features`) for diversity and the distance
  to the real set.

Per prompt: ``diversity``, the mean pairwise distance of a prompt's images (one per seed) in the
standardised feature space. Per model: ``feature_distance_to_real``, KID (unbiased MMD², cubic
polynomial kernel) between the model's features and the real set's.

**What the feature space is, and is not.** No Inception (or CLIP/DINO) weights exist offline, so FID/KID
in their usual sense cannot be computed here. The features are hand-crafted image statistics of a
64×64 copy: CIE-Lab colour moments (mean, std, skew of L, a, b), an 8-bin luma histogram, gradient
magnitude statistics, a uniform-LBP texture histogram (P=8, R=1), the share of spectral energy in five
radial frequency bands, and a coarse layout (4×4 luma and 2×2 chroma means). They see colour, exposure,
contrast, sharpness, texture and composition, not identity or anatomy: a distance of 0 means "the same
low-level statistics as real photos", not "indistinguishable from real photos". Each feature is
standardised by the real set's mean and std (with a floor per feature, its natural resolution, so a
feature that is nearly constant on the reference set does not dominate) and squashed smoothly into
(-5, 5) (``5 tanh(z / 5)``), so that no single feature far outside the real range decides a distance.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

FEATURE_SIZE = 64  # px: every image is resampled to this square before its features are computed
_LUMA = np.array([0.299, 0.587, 0.114])
_SPECTRUM_EDGES = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, np.inf)  # cycles per pixel


def _feature_layout() -> tuple[list[str], np.ndarray]:
    names: list[str] = []
    floors: list[float] = []

    def add(group: list[str], floor: float) -> None:
        names.extend(group)
        floors.extend([floor] * len(group))

    add([f"lab_{c}_{m}" for c in "Lab" for m in ("mean", "std", "skew")], 0.01)
    add([f"luma_hist_{i}" for i in range(8)], 0.01)
    add(["grad_mean", "grad_std", "edge_fraction"], 0.005)
    add([f"lbp_{i}" for i in range(10)], 0.005)
    add([f"spectrum_band_{i}" for i in range(len(_SPECTRUM_EDGES) - 1)], 0.005)
    add([f"layout_luma_{i}" for i in range(16)], 0.02)
    add([f"layout_{c}_{i}" for i in range(4) for c in "ab"], 0.01)
    return names, np.asarray(floors)


FEATURE_NAMES, FEATURE_FLOORS = _feature_layout()


def image_features(rgb: np.ndarray) -> np.ndarray:
    """The hand-crafted feature vector (``len(FEATURE_NAMES)`` floats) of one ``[H, W, 3]`` uint8 image."""
    import cv2
    from skimage.feature import local_binary_pattern

    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if min(h, w) > FEATURE_SIZE else cv2.INTER_LINEAR
    im = cv2.resize(np.ascontiguousarray(rgb), (FEATURE_SIZE, FEATURE_SIZE), interpolation=interp)
    f32 = im.astype(np.float32) / 255.0
    lab = cv2.cvtColor(f32, cv2.COLOR_RGB2Lab).astype(np.float64) / 100.0  # L in [0, 1], a/b about [-1.3, 1.3]
    out: list[float] = []
    for c in range(3):
        x = lab[..., c].ravel()
        m, sd = float(x.mean()), float(x.std())
        skew = float(((x - m) ** 3).mean() / sd ** 3) if sd > 1e-6 else 0.0
        out += [m, sd, float(np.clip(skew, -5.0, 5.0)) / 5.0]
    luma = f32.astype(np.float64) @ _LUMA
    out += list(np.histogram(luma, bins=8, range=(0.0, 1.0))[0] / luma.size)
    gx = cv2.Sobel(luma, cv2.CV_64F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(luma, cv2.CV_64F, 0, 1, ksize=3) / 8.0
    mag = np.hypot(gx, gy)
    out += [float(mag.mean()), float(mag.std()), float((mag > 0.05).mean())]
    lbp = local_binary_pattern(np.round(luma * 255).astype(np.uint8), P=8, R=1, method="uniform")
    out += list(np.bincount(lbp.astype(np.int64).ravel(), minlength=10)[:10] / lbp.size)
    power = np.abs(np.fft.fft2(luma - luma.mean())) ** 2
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(FEATURE_SIZE), np.fft.fftfreq(FEATURE_SIZE), indexing="ij"))
    total = float(power.sum())
    for lo, hi in zip(_SPECTRUM_EDGES[:-1], _SPECTRUM_EDGES[1:]):
        out.append(float(power[(freq >= lo) & (freq < hi)].sum() / total) if total > 1e-12 else 0.0)
    out += list(cv2.resize(luma, (4, 4), interpolation=cv2.INTER_AREA).ravel())
    out += list(cv2.resize(lab[..., 1:], (2, 2), interpolation=cv2.INTER_AREA).ravel())
    return np.asarray(out, dtype=np.float64)


# ---------------------------------------------------------------------------------------------- per image
RAW_KEYS = ("skin_oily", "skin_texture", "skin_saturation", "luma")


def analyse_image(rgb: np.ndarray, min_neighbors: int = 5) -> tuple[dict[str, float], np.ndarray]:
    """``({face_detected, skin_oily, skin_texture, skin_saturation, luma}, features)`` of one uint8 image.

    The skin values are those of the largest face (NaN without a face, or when its skin region is empty).
    """
    import cv2

    from ..faces import detect_faces
    from ..rewards.face_region import FaceBox
    from ..rewards.skin import canonical_face, skin_features_of_face

    rgb = np.ascontiguousarray(rgb)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    det = detect_faces(grey, min_neighbors)
    raw = {"face_detected": float(bool(det.boxes)), "skin_oily": math.nan, "skin_texture": math.nan,
           "skin_saturation": math.nan, "luma": float((rgb.astype(np.float64) / 255.0 @ _LUMA).mean())}
    if det.boxes:
        x0, y0, x1, y1 = det.boxes[0]
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)  # an empty skin mask: NaN, not a warning per image
                skin = skin_features_of_face(canonical_face(rgb, FaceBox(x0, y0, x1 - x0, y1 - y0)))
            raw.update(skin_oily=skin["oily"], skin_texture=skin["texture"], skin_saturation=skin["saturation"])
        except (ValueError, ArithmeticError, IndexError, cv2.error) as exc:
            log.debug("skin features failed on a %dx%d image: %s", rgb.shape[1], rgb.shape[0], exc)
    return raw, image_features(rgb)


# ---------------------------------------------------------------------------------------------- rewards
FEATURE_TEXT = {
    "brisque": "BRISQUE naturalness (0 pristine, ~100 distorted)",
    "blur": "perceptual blur (0 sharp, 1 blurred)",
    "noise": "estimated noise std",
    "clipped": "fraction of clipped (pure black/white) pixels",
    "luma": "mean luma (exposure)",
    "colourfulness": "Hasler-Süsstrunk colourfulness",
    "oily": "specular-highlight ('oily') fraction of the skin",
    "texture": "high-frequency skin texture (too little: 'plastic' skin)",
    "saturation": "skin saturation",
}
REWARD_TEXT = {
    "omni_classic": "OmniReward, classic backend: no-reference quality (BRISQUE, blur, noise, clipping, exposure, "
                    "colourfulness) calibrated on real photos, soft minimum of the parts, in [0, 1]",
    "omni_vlm": "OmniReward, VLM backend: expected quality-and-prompt-fit rating of a local VLM, in [0, 1]",
    "ai_portrait_classic": "AI-Portrait, classic backend: skin realism (oily highlights, plastic texture, "
                           "saturation) calibrated on real portraits, soft minimum; 0 without a face",
    "ai_portrait_vlm": "AI-Portrait, VLM backend: expected 'looks like a real photo' rating, in [0, 1]",
    "ai_portrait_detector": "AI-Portrait, detector backend: P(real) of the pipeline-trained face classifier",
    "brightness": "mean luma of the image (a sanity reward)",
    "jpeg_compressibility": "negative JPEG size in kB (a sanity reward)",
}


def reward_columns(rewards, images, prompts: Sequence[str], meta: Sequence[dict]) -> dict[str, np.ndarray]:
    """``{component: scores, "<component>/<part>": sub-scores}`` of a :class:`~portraitgen.rewards.RewardSet`'s
    rewards, raw (no weights, no normalisation, NaN kept where a value is undefined)."""
    out: dict[str, np.ndarray] = {}
    n = images.shape[0]
    for name, fn in rewards.rewards.items():
        raw = fn.parts(images, prompts, meta) if callable(getattr(fn, "parts", None)) else \
            {"score": fn(images, prompts, meta)}
        for key, values in raw.items():
            arr = np.asarray(values, dtype=np.float64).reshape(-1)
            if arr.shape[0] != n:
                from ..rewards import RewardError

                raise RewardError(f"reward {name!r} returned {arr.shape[0]} {key} values for {n} images")
            out[name if key == "score" else f"{name}/{key}"] = arr
        bad = np.flatnonzero(~np.isfinite(out[name]))
        if bad.size:
            why = getattr(fn, "last_errors", None) or {}
            reasons = "; ".join(why[i] for i in bad[:3] if i in why) or "no reason given"
            log.warning("bench: reward %r could not score %d of %d images (%s); they stay NaN and are left out "
                        "of its means", name, bad.size, n, reasons)
    return out


def reward_column_info(rewards, column: str) -> tuple[str, bool | None]:
    """(description, higher_is_better) of a column made by :func:`reward_columns`; None: no direction."""
    name, _, part = column.partition("/")
    fn = rewards.rewards[name]
    calib = getattr(fn, "calibration", None)
    feats = getattr(calib, "features", {}) or {}
    if not part:
        return REWARD_TEXT.get(name, f"reward {name!r} from the reward registry"), True
    if part in feats:
        return (f"{name}: calibrated score of the {FEATURE_TEXT.get(part, part)}, in [0, 1] "
                f"(>= 0.88 inside the real set's 5-95 % range)"), True
    if part.startswith("raw_") and part[4:] in feats:
        direction = feats[part[4:]].direction
        hib = {"higher_worse": False, "lower_worse": True}.get(direction)
        note = {"higher_worse": "lower is better", "lower_worse": "higher is better",
                "two_sided": "too high and too low are both bad: no direction"}.get(direction, "")
        return f"{name}: raw {FEATURE_TEXT.get(part[4:], part[4:])} as measured ({note})", hib
    if part == "face_found":
        return f"{name}: 1 when the reward found a face (its own detector)", True
    if part == "expected_rating":
        return f"{name}: the VLM's expected rating on its own scale", True
    return f"{name}: sub-score {part!r}", None


# ---------------------------------------------------------------------------------------------- reference
def load_reference(source: str, resolution: int) -> tuple[list[np.ndarray], str]:
    """Real reference portraits as ``[R, R, 3]`` uint8 (centre-cropped and resized like generated images).

    ``source``: a curate manifest (its ``bench_reference`` rows; every row, with a warning, if it has none),
    a folder or manifest of images, or ``builtin:portraits`` (two photos shipped in wheels, widened by
    crops and rescales). Returns the images and a one-line description of what was used.
    """
    from .. import manifest
    from ..images import ImageReadError, load_image
    from ..rewards.real_images import augment, builtin_portraits, image_paths
    from .suite import BenchError

    def at_resolution(rgb: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = rgb.shape[:2]
        s = min(h, w)
        crop = Image.fromarray(rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s])
        return np.asarray(crop.resize((resolution, resolution), Image.Resampling.LANCZOS))

    if source == "builtin:portraits":
        images = [at_resolution(a) for im in builtin_portraits() for a in augment(im)]
        return images, f"builtin:portraits ({len(images)} crops of 2 photos)"
    path = Path(source).expanduser()
    if not path.exists():
        raise BenchError(f"bench.reference: not found: {path} (run `portraitgen curate` first, or point "
                         "bench.reference at a folder of real portraits)")
    what = str(path)
    if path.is_file() and path.suffix == ".parquet":
        df = pd.read_parquet(path)
        if "image_path" not in df.columns:
            raise BenchError(f"bench.reference: {path} has no 'image_path' column")
        reference = manifest.split_rows(df, manifest.BENCH_REFERENCE)
        if reference is not None and len(reference):
            df = reference
            what = f"{path} (split bench_reference)"
        else:
            log.warning("bench.reference: %s has no rows in split bench_reference; using all %d rows (the real "
                        "reference then overlaps the training images)", path, len(df))
            what = f"{path} (all rows: no bench_reference split)"
        if "id" in df.columns:
            df = df.sort_values("id")
        files = [manifest.image_file(path, p) for p in df["image_path"].astype(str)]
    else:
        try:
            files = image_paths(path)
        except ValueError as exc:
            raise BenchError(f"bench.reference: {exc}") from None
    if not files:
        raise BenchError(f"bench.reference: {path} holds no images")
    images = []
    for f in files:
        try:
            t = load_image(str(f), resolution)
        except ImageReadError as exc:
            raise BenchError(f"bench.reference: {exc}") from None
        images.append((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return images, f"{what}: {len(images)} images"


# ---------------------------------------------------------------------------------------------- artifacts
@dataclass(frozen=True)
class Artifact:
    raw: str  # the RAW_KEYS value it is judged on
    bad: str  # "high" or "low"
    text: str


ARTIFACTS = {
    "oily": Artifact("skin_oily", "high", "specular-highlight ('oily') fraction of the face's skin"),
    "plastic": Artifact("skin_texture", "low", "high-frequency texture of the face's skin ('plastic' when too little)"),
    "oversaturated": Artifact("skin_saturation", "high", "saturation of the face's skin"),
    "overexposed": Artifact("luma", "high", "mean luma of the image"),
    "underexposed": Artifact("luma", "low", "mean luma of the image"),
}
MIN_REFERENCE_VALUES = 5  # fewer real values than this: the artifact's threshold is undefined (NaN flags)


@dataclass(frozen=True)
class ArtifactThresholds:
    """Per artifact, the real set's quantile beyond which a generated image is flagged."""

    quantile: float
    values: dict[str, float | None]  # artifact -> threshold (None: too few real values)
    n_reference: dict[str, int]

    @classmethod
    def fit(cls, reference_raw: pd.DataFrame, quantile: float) -> "ArtifactThresholds":
        values: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        for name, a in ARTIFACTS.items():
            v = reference_raw[a.raw].to_numpy(dtype=np.float64)
            v = v[np.isfinite(v)]
            counts[name] = int(v.size)
            if v.size < MIN_REFERENCE_VALUES:
                log.warning("bench: only %d real images with a %s value: artifact/%s is undefined (NaN)",
                            v.size, a.raw, name)
                values[name] = None
            else:
                values[name] = float(np.quantile(v, quantile if a.bad == "high" else 1.0 - quantile))
        return cls(quantile, values, counts)

    def flags(self, raw: pd.DataFrame) -> pd.DataFrame:
        """``artifact/<name>`` columns (1.0 flagged, 0.0 not, NaN undefined) and ``artifact/any``."""
        out = {}
        for name, a in ARTIFACTS.items():
            v = raw[a.raw].to_numpy(dtype=np.float64)
            thr = self.values[name]
            if thr is None:
                out[f"artifact/{name}"] = np.full(len(raw), np.nan)
                continue
            hit = v > thr if a.bad == "high" else v < thr
            out[f"artifact/{name}"] = np.where(np.isfinite(v), hit.astype(np.float64), np.nan)
        flags = np.column_stack(list(out.values()))
        defined = np.isfinite(flags).any(axis=1)
        out["artifact/any"] = np.where(defined, (np.nan_to_num(flags, nan=0.0) > 0).any(axis=1).astype(np.float64),
                                       np.nan)
        return pd.DataFrame(out, index=raw.index)

    def describe(self) -> dict[str, str]:
        q = self.quantile
        out = {}
        for name, a in ARTIFACTS.items():
            side = f"above the real set's {q:.0%} quantile" if a.bad == "high" else \
                f"below the real set's {1 - q:.0%} quantile"
            thr = self.values[name]
            at = f" ({thr:.4g})" if thr is not None else " (undefined: too few real values)"
            scope = " Faces only: NaN without a face." if a.raw.startswith("skin_") else ""
            out[f"artifact/{name}"] = (f"1 when the {a.text} is {side}{at}; the rate of real images flagged is "
                                       f"{1 - q:.0%} by construction.{scope}")
        out["artifact/any"] = "1 when any artifact flag that applies to the image is set"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "thresholds": self.values, "n_reference": self.n_reference,
                "artifacts": {k: {"measure": a.raw, "bad": a.bad} for k, a in ARTIFACTS.items()}}


# ---------------------------------------------------------------------------------------------- feature space
SQUASH = 5.0  # standardised features pass through SQUASH * tanh(z / SQUASH): linear near the real set, at most 5


@dataclass(frozen=True)
class FeatureScaler:
    """Standardises features by the real set's mean and std (floored per feature), then squashes them
    smoothly into (-5, 5): a feature far outside the real range (a flat generated image's texture
    histogram can sit 70 stds away) counts as "far", without one feature deciding every distance."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, reference: np.ndarray) -> "FeatureScaler":
        ref = np.asarray(reference, dtype=np.float64)
        std = ref.std(axis=0) if len(ref) > 1 else np.zeros(ref.shape[1])
        return cls(ref.mean(axis=0), np.sqrt(std ** 2 + FEATURE_FLOORS ** 2))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return SQUASH * np.tanh(z / SQUASH)


def diversity(z: np.ndarray) -> float:
    """Mean pairwise Euclidean distance between the rows of ``z`` (standardised features), divided by
    sqrt(dimension); NaN for fewer than 2 rows."""
    if len(z) < 2:
        return math.nan
    d = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    iu = np.triu_indices(len(z), k=1)
    return float(d[iu].mean() / math.sqrt(z.shape[1]))


def poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``(x·y / d + 1)^3``."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def weighted_mmd2(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for rows of multiplicity weights ``wx`` [B, n] and ``wy`` [B, m] (a bootstrap resample is
    a weight vector): within-set terms average over pairs of *different* underlying images, so a resample's
    duplicates do not count as pairs of identical samples. All-ones weights give the usual U-statistic."""
    wx, wy = np.atleast_2d(wx).astype(np.float64), np.atleast_2d(wy).astype(np.float64)

    def within(k: np.ndarray, w: np.ndarray) -> np.ndarray:
        s = ((w @ k) * w).sum(1) - (w ** 2 * np.diag(k)).sum(1)
        pairs = w.sum(1) ** 2 - (w ** 2).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, s / pairs, np.nan)

    cross = ((wx @ kxy) * wy).sum(1) / (wx.sum(1) * wy.sum(1))
    return within(kxx, wx) + within(kyy, wy) - 2.0 * cross


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """KID (unbiased MMD², cubic polynomial kernel) between feature sets ``x`` and ``y``; NaN if either has < 2."""
    if len(x) < 2 or len(y) < 2:
        return math.nan
    return float(weighted_mmd2(poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y),
                               np.ones(len(x)), np.ones(len(y)))[0])

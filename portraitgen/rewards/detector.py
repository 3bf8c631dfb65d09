"""AI-Portrait ``detector`` backend: a small real-vs-generated face classifier (docs/design.md §5).

Trained by the pipeline on crops of curated real portraits (label 1) against crops of images the base
model generated (label 0); its probability of "real" is the reward, as in detector-guided rewards.
A held-out split (stratified, seeded) gives the accuracy / ROC-AUC report saved next to the weights.

    portraitgen train-detector --real results/curate/manifest.parquet --generated results/generated --out results/detector

or from Python: :func:`train_detector` on arrays, :func:`train_detector_from_sources` on folders.
The output folder holds ``detector.safetensors`` (weights), ``detector.json`` (architecture, crop
settings, report) and ``report.json``; the reward loads it with ``reward.options.ai_portrait_detector.path``.
The pipeline's own route is ``portraitgen precompute``: with that path set to ``results/precompute/detector``
it trains the detector there on base-model generations and reuses it while its inputs are unchanged
(:mod:`portraitgen.precompute`).

Crops: ``crop: face`` takes the most confident Haar-cascade face grown by ``margin`` (images without a face
fall back to a centred square, counted in the report), ``center`` a centred square, ``none`` the whole
image; then a resize to ``size`` px. Training and scoring use the same function.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn

from .registry import PartsReward, RewardError
from .simple import to_uint8_hwc
from ..integrity import IntegrityError, verify_file, write_checksum

log = logging.getLogger(__name__)

CropMode = Literal["face", "center", "none"]


@dataclass(frozen=True)
class DetectorConfig:
    size: int = 64  # px, square input crops
    crop: CropMode = "face"
    margin: float = 0.25  # face box growth on each side, as a fraction of its size
    width: int = 32  # channels of the first conv block (doubled twice)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3  # AdamW
    weight_decay: float = 1e-4
    val_fraction: float = 0.25  # held out per class for the report
    seed: int = 0


class FaceDetectorNet(nn.Module):
    """Four conv blocks (BN, ReLU, stride-2 downsampling) then global average pooling and one logit."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(chans[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, S, S] in [0, 1] -> logit of "real" [B]."""
        return self.head(self.features(2.0 * x - 1.0).mean(dim=(2, 3))).squeeze(-1)


def crop_for_detector(rgb: np.ndarray, cfg: DetectorConfig) -> tuple[np.ndarray, bool]:
    """The classifier's input crop ([size, size, 3] uint8) and whether a face was found."""
    import cv2

    found = False
    if cfg.crop == "face":
        from .face_region import detect_face

        box = detect_face(rgb)
        if box is not None:
            rgb, found = box.crop(rgb, margin=cfg.margin), True
    if cfg.crop == "center" or (cfg.crop == "face" and not found):
        h, w = rgb.shape[:2]
        s = min(h, w)
        rgb = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    interp = cv2.INTER_AREA if min(rgb.shape[:2]) > cfg.size else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(rgb), (cfg.size, cfg.size), interpolation=interp), found


def _to_tensor(crops: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting half."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="mergesort")] = np.arange(1, len(scores) + 1)
    _, tie_group, tie_count = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.bincount(tie_group, weights=ranks) / tie_count)[tie_group]  # ties share their mean rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _split(n: int, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.permutation(n)
    n_val = int(round(n * frac)) if n >= 2 else 0
    n_val = min(max(n_val, 1 if frac > 0 and n >= 2 else 0), n - 1)
    return idx[n_val:], idx[:n_val]


@torch.no_grad()
def _predict(net: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    net.eval()
    return torch.cat([torch.sigmoid(net(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]).numpy()


@torch.no_grad()
def _recalibrate_batchnorm(net: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Set BatchNorm's running statistics to the exact average over the training crops.

    A small training set gives few optimizer steps, and the exponential running averages then lag far
    behind the weights: in eval mode every held-out probability moves the same way (measured: held-out
    AUC 1.0 at accuracy 0.5, every image scored P(real) > 0.8). Averaging the statistics once at the end
    fixes the calibration without changing what was learned.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for i in range(0, len(x), batch_size):
        if len(x[i:i + batch_size]) >= 2:
            net(x[i:i + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()


def train_detector(real: Sequence[np.ndarray], generated: Sequence[np.ndarray], out_dir: str | Path | None = None,
                   cfg: DetectorConfig = DetectorConfig(), crops_ready: bool = False) -> dict:
    """Train the classifier on real (label 1) vs generated (label 0) RGB uint8 images; return the report.

    ``crops_ready``: the inputs are already ``[size, size, 3]`` crops (skips face detection).
    Writes the weights, ``detector.json`` and ``report.json`` to ``out_dir`` when given.
    """
    if len(real) < 2 or len(generated) < 2:
        raise RewardError(f"train-detector needs at least 2 real and 2 generated images, got {len(real)} and {len(generated)}")
    t0 = time.time()
    faces = {"real": 0, "generated": 0}
    crops = {}
    for name, images in (("real", real), ("generated", generated)):
        if crops_ready:
            crops[name] = list(images)
        else:
            cs = [crop_for_detector(im, cfg) for im in images]
            crops[name] = [c for c, _ in cs]
            faces[name] = sum(f for _, f in cs)
    rng = np.random.default_rng(cfg.seed)
    tr_r, va_r = _split(len(crops["real"]), cfg.val_fraction, rng)
    tr_g, va_g = _split(len(crops["generated"]), cfg.val_fraction, rng)
    xr, xg = _to_tensor(crops["real"]), _to_tensor(crops["generated"])
    x_tr = torch.cat([xr[tr_r], xg[tr_g]])
    y_tr = torch.cat([torch.ones(len(tr_r)), torch.zeros(len(tr_g))])
    x_va = torch.cat([xr[va_r], xg[va_g]])
    y_va = np.concatenate([np.ones(len(va_r)), np.zeros(len(va_g))])

    torch.manual_seed(cfg.seed)
    net = FaceDetectorNet(cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, int(np.ceil(len(x_tr) / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    # Classes may be unbalanced: weight positives so both classes count equally in the loss.
    pos_weight = torch.tensor(len(tr_g) / max(len(tr_r), 1))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            if len(b) < 2:  # BatchNorm needs two samples
                continue
            xb = x_tr[b]
            flip = torch.rand(len(b), generator=gen) < 0.5  # mirror augmentation
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = loss_fn(net(xb), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        row = {"epoch": epoch + 1, "train_loss": total / len(x_tr)}
        if len(x_va):
            p = _predict(net, x_va)
            row.update(val_accuracy=float(((p > 0.5) == (y_va > 0.5)).mean()), val_auc=roc_auc(y_va, p))
        history.append(row)
    _recalibrate_batchnorm(net, x_tr, cfg.batch_size)
    p_va = _predict(net, x_va) if len(x_va) else np.zeros(0)
    p_tr = _predict(net, x_tr)
    report = {
        "n_real": len(crops["real"]), "n_generated": len(crops["generated"]),
        "n_train": int(len(x_tr)), "n_val": int(len(x_va)),
        "faces_found": faces if not crops_ready else None,
        "train_accuracy": float(((p_tr > 0.5) == (y_tr.numpy() > 0.5)).mean()),
        "val_accuracy": float(((p_va > 0.5) == (y_va > 0.5)).mean()) if len(x_va) else float("nan"),
        "val_auc": roc_auc(y_va, p_va) if len(x_va) else float("nan"),
        "val_mean_p_real": {"real": float(p_va[y_va > 0.5].mean()) if (y_va > 0.5).any() else float("nan"),
                            "generated": float(p_va[y_va < 0.5].mean()) if (y_va < 0.5).any() else float("nan")},
        "history": history, "seconds": time.time() - t0, "config": asdict(cfg),
    }
    if out_dir is not None:
        save_detector(net, cfg, report, out_dir)
    log.info("detector: held-out accuracy %.3f, AUC %.3f (%d val images)", report["val_accuracy"], report["val_auc"],
             report["n_val"])
    report["model"] = net
    return report


def save_detector(net: FaceDetectorNet, cfg: DetectorConfig, report: dict, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "detector.safetensors"))
    clean = {k: v for k, v in report.items() if k != "model"}
    (out / "detector.json").write_text(json.dumps({"format": "portraitgen-face-detector/1", "config": asdict(cfg),
                                                   "report": clean}, indent=2))
    (out / "report.json").write_text(json.dumps(clean, indent=2))
    for name in ("detector.safetensors", "detector.json"):  # verified by load_detector (portraitgen/integrity.py)
        write_checksum(out / name)
    return out


def load_detector(path: str | Path) -> tuple[FaceDetectorNet, DetectorConfig]:
    from safetensors.torch import load_file

    path = Path(path)
    meta_path, weights = path / "detector.json", path / "detector.safetensors"
    if not (meta_path.is_file() and weights.is_file()):
        raise RewardError(f"detector path {str(path)!r}: expected detector.json and detector.safetensors "
                          "(train one with `portraitgen train-detector`)")
    recovery = (f"re-make it: `snakemake --forcerun precompute` where precompute trains it, or "
                f"`portraitgen train-detector --real ... --generated ... --out {path}`")
    try:
        for file in (weights, meta_path):
            verify_file(file, recovery, what="detector")
    except IntegrityError as exc:
        raise RewardError(str(exc)) from None
    meta = json.loads(meta_path.read_text())
    cfg = DetectorConfig(**meta["config"])
    net = FaceDetectorNet(cfg.width)
    net.load_state_dict(load_file(str(weights)))
    return net.eval(), cfg


def train_detector_from_sources(real: str | Path, generated: str | Path, out_dir: str | Path,
                                cfg: DetectorConfig = DetectorConfig(), max_images: int = 0) -> dict:
    """Train from a real folder/manifest and a folder of generated images (see :mod:`.real_images`)."""
    from .real_images import load_images

    real_images = load_images(real, max_images)
    gen_images = load_images(generated, max_images)
    report = train_detector(real_images, gen_images, out_dir, cfg)
    report["sources"] = {"real": str(real), "generated": str(generated)}
    clean = {k: v for k, v in report.items() if k != "model"}
    (Path(out_dir) / "report.json").write_text(json.dumps(clean, indent=2))
    return report


class DetectorReward(PartsReward):
    """P(real) of the trained classifier on each image's crop; parts: ``score``, ``face_found``.

    ``train`` holds the settings the precompute stage trains this detector with (see
    :mod:`portraitgen.precompute`); scoring ignores them.
    """

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 64, train: dict | None = None):
        self.net, self.cfg = load_detector(path)
        self.device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net.to(self.device)
        self.batch_size = batch_size
        self.last_errors = {}

    def parts(self, images, prompts, meta):
        cs = [crop_for_detector(a, self.cfg) for a in to_uint8_hwc(images)]
        x = _to_tensor([c for c, _ in cs]).to(self.device)
        with torch.no_grad():
            p = torch.cat([torch.sigmoid(self.net(x[i:i + self.batch_size]))
                           for i in range(0, len(x), self.batch_size)]).double().cpu().numpy()
        return {"score": p, "face_found": np.array([float(f) for _, f in cs])}

"""The planted-artifact detector: an *evaluation* measure, independent of every training reward.

A tiny CNN trained on real faces with vs without the planted artifact (:mod:`.artifacts`), the same
planting and augmentation as pretraining, plus mild blur and noise on both classes so that softer,
noisier generated images are not flagged for their texture alone. It is trained on the pretraining
faces and evaluated on the held-out faces (``pretrain.holdout``): ``report.json`` has the AUC, the
recall on planted and the false-positive rate on clean held-out faces at the decision threshold.
Hand-made highlight measures were tried first in the feasibility probe and fired on teeth and
glasses (77 % of clean real faces); the CNN learns what the planted blob looks like.

It must never be a training reward (GRPO would learn to fool it rather than to lose the artifact):
nothing in :mod:`portraitgen.rewards` uses it. PortraitBench and the ablation call :func:`load` then
:meth:`ArtifactDetector.rate` (the share of images flagged) or :meth:`ArtifactDetector.probabilities`.

    det = load("results/pretrain/artifact_detector")
    det.rate(images)           # images: [B, 3, H, W] in [0, 1], PIL images, or uint8 HWC arrays

On generated samples the rate has a floor (a model pretrained on clean data is flagged ~0.2 of the
time in the probe): compare a model's rate with the clean control's, never with 0.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .artifacts import plant
from .augment import augment
from .faces import Face

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
REPORT = "report.json"
EVAL_VIEWS = 8  # views per held-out face and class


@dataclass(frozen=True)
class DetectorSettings:
    kind: str = "specular"  # the artifact it detects
    size: int = 24  # px: images are resized to this side before scoring
    width: int = 16  # channels of the first convolution
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    threshold: float = 0.5  # probability above which an image counts as having the artifact
    seed: int = 0


class ArtifactNet(torch.nn.Module):
    """Four 3x3 convolutions (two with stride 2), then max- and mean-pooled features -> one logit:
    the max pool lets a small local blob decide, wherever it is."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, w, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), torch.nn.ReLU(),
            torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(2 * w, 4 * w, 3, padding=1, stride=2), torch.nn.ReLU())
        self.head = torch.nn.Linear(8 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x * 2 - 1)
        pooled = torch.cat([f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], dim=1)
        return self.head(pooled).squeeze(1)


def as_batch(images, size: int) -> torch.Tensor:
    """``[B, 3, size, size]`` float in [0, 1] from a tensor in [0, 1], PIL images or uint8 HWC arrays."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        arrays = [np.array(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
        if not arrays:
            return torch.zeros(0, 3, size, size)
        sized = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays]
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255.0 for a in sized]
                        ) if all(a.shape == sized[0].shape for a in sized) else None
        if x is None:  # mixed sizes: resize one by one
            return torch.cat([as_batch([a], size) for a in sized])
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"artifact detector: expected images [B, 3, H, W], got shape {tuple(x.shape)}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


class ArtifactDetector:
    def __init__(self, net: ArtifactNet, settings: DetectorSettings):
        self.net = net.eval()
        self.settings = settings

    @torch.no_grad()
    def probabilities(self, images, batch: int = 256) -> np.ndarray:
        x = as_batch(images, self.settings.size)
        out = [torch.sigmoid(self.net(x[i:i + batch])) for i in range(0, len(x), batch)]
        return torch.cat(out).numpy() if out else np.zeros(0)

    def flags(self, images) -> np.ndarray:
        return self.probabilities(images) > self.settings.threshold

    def rate(self, images) -> float:
        """Share of ``images`` flagged as having the artifact."""
        flags = self.flags(images)
        return float(flags.mean()) if len(flags) else float("nan")

    score = rate  # the name the evaluation code calls

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps(asdict(self.settings), indent=1, sort_keys=True) + "\n")


def load(folder: str | Path) -> ArtifactDetector:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: not an artifact detector folder (needs {CONFIG} and {WEIGHTS}; "
                                f"made by `portraitgen pretrain`)")
    settings = DetectorSettings(**json.loads((folder / CONFIG).read_text()))
    net = ArtifactNet(settings.width)
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    return ArtifactDetector(net, settings)


# ------------------------------------------------------------------------------------------- training
def _degrade(view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild blur and noise on both classes: generated images are softer and noisier than real ones."""
    import cv2

    if rng.random() < 0.5:
        view = np.stack([cv2.GaussianBlur(c, (0, 0), rng.uniform(0.3, 0.7)) for c in view])
    if rng.random() < 0.5:
        view = view + rng.normal(0, rng.uniform(0.005, 0.03), view.shape).astype(np.float32)
    return np.clip(view, 0, 1).astype(np.float32)


def labelled_views(faces: Sequence[Face], n: int, kind: str, rng: np.random.Generator, degrade: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` views, half with the artifact planted (label 1)."""
    images, labels = [], []
    for k in range(n):
        face = faces[int(rng.integers(len(faces)))].image
        planted = k % 2 == 1
        view = augment(plant(face, kind, rng) if planted else face, rng)
        images.append(_degrade(view, rng) if degrade else view)
        labels.append(float(planted))
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def held_out_views(faces: Sequence[Face], kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EVAL_VIEWS clean and EVAL_VIEWS planted views of every held-out face (fixed by ``seed``)."""
    rng = np.random.default_rng(seed + 1_000_003)
    images, labels = [], []
    for f in faces:
        for _ in range(EVAL_VIEWS):
            images.append(augment(f.image, rng))
            labels.append(0.0)
            images.append(augment(plant(f.image, kind, rng), rng))
            labels.append(1.0)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (probability that a positive outranks a negative; ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def train_detector(train_faces: Sequence[Face], held_faces: Sequence[Face], settings: DetectorSettings
                   ) -> tuple[ArtifactDetector, dict]:
    """Train on ``train_faces``; the report's figures are measured on ``held_faces``."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    net = ArtifactNet(settings.width)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, settings.steps))
    start = time.perf_counter()
    net.train()
    losses = []
    for _ in tqdm(range(settings.steps), desc="artifact detector", unit="step", mininterval=2.0):
        x, y = labelled_views(train_faces, settings.batch_size, settings.kind, rng)
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    detector = ArtifactDetector(net, settings)
    report = {"settings": asdict(settings), "train_seconds": time.perf_counter() - start,
              "train_loss_last": float(np.mean(losses[-50:])) if losses else float("nan"),
              "held_out_faces": len(held_faces)}
    if held_faces:
        x, y = held_out_views(held_faces, settings.kind, settings.seed)
        p = detector.probabilities(x)
        labels = y.numpy()
        flagged = p > settings.threshold
        report.update(held_out_auc=auc(p, labels), held_out_recall=float(flagged[labels == 1].mean()),
                      held_out_false_positive_rate=float(flagged[labels == 0].mean()), held_out_views=int(len(labels)))
    return detector, report

"""Offline face detection and face-centred square crops (used by the curate stage).

The detector is OpenCV's frontal-face Haar cascade ("alt2": on the test images it gave no false
second face where "default" found one on the astronaut photo, and found smaller faces), which ships
inside the ``opencv-python-headless`` wheel (< 5; 5.x ships no cascades), so nothing is downloaded. It finds upright frontal faces of at
least 24 px, so every image is detected on a *working copy*:

- large images are downscaled to at most ``DETECT_MAX_SIDE`` on the long side (speed: the cascade
  costs ~0.25 s per 400 px image on one core; a face under 24 px there, i.e. under 6 % of the long
  side, is not found and the image is rejected as no_face rather than face_too_small);
- small images are upscaled by an integer factor to at least ``DETECT_MIN_SIDE`` on the short side,
  so tight 25x25 face crops (scikit-image's LFW subset) are found;
- small working copies (short side under ``PAD_BELOW``) get a replicated border of ``DETECT_PAD`` x
  their sides, because the cascade needs some context around a face that fills the whole frame
  (measured on the 100 LFW faces: 86 found without it, 98 with it, and none of the 100 LFW non-face
  patches). Large images are not padded: there it costs time and adds false detections.

Boxes are returned in the coordinates of the image that was passed in (EXIF-corrected source).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

DETECT_MAX_SIDE = 400  # px, long side of the working copy for large images
DETECT_MIN_SIDE = 100  # px, short side of the working copy for small images (integer upscaling)
DETECT_PAD = 0.25  # replicated border around small working copies, as a fraction of their sides
PAD_BELOW = 200  # px, short side of the working copy under which it is padded
SCALE_FACTOR = 1.1  # Haar pyramid step
MIN_WINDOW = 24  # px, the cascade's own window
# A face counts towards curate.max_faces only when its side is at least this fraction of the largest
# face's: a tiny face in a poster behind the sitter does not make a portrait a group photo.
PROMINENT_FACE_RATIO = 0.4
CASCADE = "haarcascade_frontalface_alt2.xml"


Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


@lru_cache(maxsize=1)
def _cascade():
    import cv2

    cv2.setNumThreads(1)  # workers are processes; threads inside each would only contend
    path = cv2.data.haarcascades + CASCADE
    clf = cv2.CascadeClassifier(path)
    if clf.empty():
        raise RuntimeError(f"cannot load the OpenCV Haar cascade {path} (needs opencv-python-headless < 5)")
    return clf


@dataclass(frozen=True)
class Detection:
    boxes: list[Box]  # every face found, largest first
    prominent: int  # faces at least PROMINENT_FACE_RATIO of the largest one's side


def detect_faces(grey: np.ndarray, min_neighbors: int = 5) -> Detection:
    """Faces in a ``uint8`` greyscale image [H, W], largest first, in its own pixel coordinates."""
    import cv2

    h, w = grey.shape
    if min(h, w) < 1:
        return Detection([], 0)
    if max(h, w) > DETECT_MAX_SIDE:
        scale = DETECT_MAX_SIDE / max(h, w)
    elif min(h, w) < DETECT_MIN_SIDE:
        scale = float(math.ceil(DETECT_MIN_SIDE / min(h, w)))
    else:
        scale = 1.0
    ww, wh = max(1, round(w * scale)), max(1, round(h * scale))
    work = grey if scale == 1.0 else cv2.resize(
        grey, (ww, wh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    pad = DETECT_PAD if min(ww, wh) < PAD_BELOW else 0.0
    px, py = round(pad * ww), round(pad * wh)
    work = cv2.copyMakeBorder(work, py, py, px, px, cv2.BORDER_REPLICATE)
    work = cv2.equalizeHist(work)
    found = _cascade().detectMultiScale(work, scaleFactor=SCALE_FACTOR, minNeighbors=min_neighbors,
                                        minSize=(MIN_WINDOW, MIN_WINDOW))
    boxes: list[Box] = []
    for x, y, bw, bh in (found if len(found) else []):
        x0 = min(max(0, math.floor((x - px) / scale)), w - 1)
        y0 = min(max(0, math.floor((y - py) / scale)), h - 1)
        x1 = max(min(w, math.ceil((x + bw - px) / scale)), x0 + 1)
        y1 = max(min(h, math.ceil((y + bh - py) / scale)), y0 + 1)
        boxes.append((int(x0), int(y0), int(x1), int(y1)))
    # Largest first; ties broken by position so the order never depends on OpenCV's internals.
    boxes.sort(key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b[1], b[0]))
    if not boxes:
        return Detection([], 0)
    big = max(boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1])
    prominent = sum(max(b[2] - b[0], b[3] - b[1]) >= PROMINENT_FACE_RATIO * big for b in boxes)
    return Detection(boxes, prominent)


def face_side(box: Box) -> int:
    return max(box[2] - box[0], box[3] - box[1])


def square_crop(face: Box, width: int, height: int, crop_scale: float) -> Box:
    """A square of side ``crop_scale`` x the face's side, centred on the face, inside the image.

    When the square does not fit it is first shifted (so the face is off-centre but fully framed), and
    only when it is larger than the image's shorter side is it shrunk to that side. Never padded.
    """
    side = min(max(1, round(crop_scale * face_side(face))), width, height)
    cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    x0 = min(max(0, round(cx - side / 2)), width - side)
    y0 = min(max(0, round(cy - side / 2)), height - side)
    return int(x0), int(y0), int(x0 + side), int(y0 + side)

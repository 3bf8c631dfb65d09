"""Captions of the pretraining faces, so that prompts condition the model.

Each face gets :data:`CAPTIONS_PER_FACE` captions, one drawn per training view:

1. the caption the curate stage writes for such a crop (``captions.template_caption``: shot type,
   tone, lighting as measured on the face), so the exemplars' captions, which become training
   prompts, are in-distribution;
2. portrait phrases in the style of the prompts users (and PortraitBench) write, built from a small
   vocabulary: what is true of the photo (black and white or colour, its lighting) is stated, the
   rest (who, expression, setting) is drawn at random, so any portrait prompt leads to a face.

A share of the views (``pretrain.caption_dropout``) trains with the empty prompt: classifier-free
guidance needs the unconditional model. The artifact is never named in a caption.
"""
from __future__ import annotations

import numpy as np

from ..captions import template_caption
from ..quality import measure
from .faces import TIGHT_CROP_SCALE, Face

CAPTIONS_PER_FACE = 4
OPENINGS = ("a portrait photo of", "a close up headshot of", "a photograph of", "a studio portrait of",
            "a natural portrait of", "a realistic photo of")
PEOPLE = ("a man", "a woman", "a person", "an old man", "an old woman", "a young man", "a young woman",
          "an elderly person", "a smiling woman", "a serious man")
DETAILS = ("", "with short hair", "with glasses", "with a beard", "with dark hair", "with grey hair",
           "smiling", "with a serious look", "with wrinkles", "with freckles")
SETTINGS = ("", "indoor", "outdoor", "at a street", "in a park", "in front of a dark background")


def face_measures(face: Face) -> dict:
    u8 = np.clip(np.round(face.image.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
    m = measure(u8)
    return {"face_to_crop": 1.0 / TIGHT_CROP_SCALE, "brightness": m["brightness"], "contrast": m["contrast"],
            "greyscale": face.greyscale}


def face_captions(face: Face, rng: np.random.Generator) -> list[str]:
    m = face_measures(face)
    tone = "black and white photo" if face.greyscale else "colour photo"
    light = "low light" if m["brightness"] < 0.3 else ("bright light" if m["brightness"] > 0.68 else "soft light")
    out = [template_caption(m)]
    while len(out) < CAPTIONS_PER_FACE:
        parts = [rng.choice(OPENINGS), rng.choice(PEOPLE), rng.choice(DETAILS), rng.choice(SETTINGS)]
        text = " ".join(p for p in parts if p) + f", {tone}, {light}"
        if text not in out:
            out.append(text)
    return out

"""Captions of the pretraining faces, so that prompts condition the model.

Each face gets :data:`CAPTIONS_PER_FACE` captions, one drawn per training view:

1. the caption the curate stage writes for such a crop (``captions.template_caption``: shot type,
   tone, lighting as measured on the face), so the exemplars' captions, which become training
   prompts, are in-distribution;
2. :data:`FREE_PHRASES` portrait phrases as users write them, from a small vocabulary: what is true of
   the photo (black and white or colour, its lighting) is stated, the rest (who, expression, setting)
   is drawn at random;
3. :data:`BENCH_PHRASES` phrases in PortraitBench's grammar and vocabulary (shot, age, gender
   presentation, skin tone, a detail, setting, light: the tables of :mod:`portraitgen.bench.suite`,
   imported, not copied), every part drawn at random. Its prompts are then in-distribution words
   rather than unseen ones: with frozen random text encoders, an unseen phrase is an embedding the
   model never learned to read, and its samples lost faces (Haar face rate 0.48 on the bench prompts
   against 0.61 on the training captions, same model; docs/pretrain.md). The suite's prompts are not
   read (a random draw can still spell one: 2 of the default's 512 captions do, of 25,920 possible
   phrases), and no caption names more than one person.

So any portrait prompt leads to a face. A share of the views (``pretrain.caption_dropout``) trains with
the empty prompt: classifier-free guidance needs the unconditional model. The artifact is never named
in a caption.
"""
from __future__ import annotations

import numpy as np

from ..bench import suite
from ..captions import template_caption
from ..quality import measure
from .faces import TIGHT_CROP_SCALE, Face

FREE_PHRASES = 3
BENCH_PHRASES = 3
CAPTIONS_PER_FACE = 1 + FREE_PHRASES + BENCH_PHRASES
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


def bench_phrase(rng: np.random.Generator) -> str:
    """One person in PortraitBench's grammar (``bench.suite``), every part drawn at random."""
    def pick(table: dict) -> str:
        return table[sorted(table)[int(rng.integers(len(table)))]]

    age = pick(suite.AGES)
    article = "an" if age[0] in "aeiou" else "a"
    return (f"{pick(suite.SHOTS)} of {article} {age} {pick(suite.GENDERS)} with {pick(suite.SKINS)} skin"
            f"{pick(suite.STRESSORS)}, {pick(suite.SETTINGS)}, {pick(suite.LIGHTS)}")


def face_captions(face: Face, rng: np.random.Generator) -> list[str]:
    m = face_measures(face)
    tone = "black and white photo" if face.greyscale else "colour photo"
    light = "low light" if m["brightness"] < 0.3 else ("bright light" if m["brightness"] > 0.68 else "soft light")
    out = [template_caption(m)]
    while len(out) < 1 + FREE_PHRASES:
        parts = [rng.choice(OPENINGS), rng.choice(PEOPLE), rng.choice(DETAILS), rng.choice(SETTINGS)]
        text = " ".join(p for p in parts if p) + f", {tone}, {light}"
        if text not in out:
            out.append(text)
    while len(out) < CAPTIONS_PER_FACE:
        text = bench_phrase(rng)
        if text not in out:
            out.append(text)
    return out

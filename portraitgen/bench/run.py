"""``portraitgen bench``: PortraitBench — did training make portraits more photorealistic, with fewer AI
artifacts, without losing prompt fit or diversity? (docs/design.md §6)

    portraitgen bench --params params.yaml --out results/bench                       # the models of bench.models
    portraitgen bench --params params.yaml --out results/bench --model base=base --model grpo=results/train
    portraitgen bench --params params.yaml --out results/bench --part 0 --num-parts 4      # one cluster job
    portraitgen bench --params params.yaml --out results/bench --merge-only --num-parts 4  # gather

The stage reads as phases:

1. **sample** — per model, every prompt of the suite (``bench.suite``/``bench.subset``, see suite.py) and
   every seed of ``bench.seeds``: the deterministic ODE sampler, ``bench.num_steps`` steps, CFG
   ``bench.guidance_scale``, at ``model.resolution``. The start noise of ``(prompt_id, seed)`` comes from a
   generator seeded by ``(BENCH_NOISE_KEY, hash(prompt_id), seed)`` only: every model starts from the same
   noise (so images pair), and neither the part, the batch nor ``seed`` (training's) changes it.
   The prompts' conditioning comes from ``bench.prompt_embeddings`` (made by ``portraitgen precompute
   --bench-only``) for every model whose text encoders are those of ``model.path`` — the base, and its
   LoRAs and full fine-tunes (``portraitgen.json`` names the base; training never changes the text
   encoders) — and such a model is loaded without its text encoders. A model on another base (its
   fingerprint differs) falls back to its own text encoders, with a warning: the file cannot describe it.
   A file made by another model than ``model.path``, or lacking a suite prompt (or the empty prompt, with
   CFG), stops the stage before any model loads, naming the prompt and the file. Cached or live, every
   prompt is encoded on its own (:func:`portraitgen.embeddings.encode_one`), so both give the same
   tensors and the same images.
2. **score** — per image (metrics.py): every ``bench.reward`` component and sub-score, face detection,
   the raw skin/exposure measurements behind the artifact flags, and the feature vector.
3. **merge** — artifact flags against the real set (``bench.reference``), diversity across seeds,
   the feature distance to the real set, per-category means, and paired cluster-bootstrap comparisons
   of every model with ``bench.baseline`` (compare.py).
4. **write** — the files below; then ``report.write_report`` (report.html, DVC plots, MLflow).

Parts: prompts are cut, in suite order, into batches of whole prompts (``--batch-size`` images, at least
one prompt); batch ``k`` belongs to part ``k % N``. A part job samples and scores its batches for every
model and writes ``parts/part-IIII-of-NNNN.parquet`` (plus its images); the merge job reads all N and
fails, naming the part, when one is missing or was made from other settings. A batch is the same
whatever N is, so one process and N part jobs compute identical images and scores.

Output folder (the contract that report.py, DVC and MLflow rely on):

``images/<model>/<prompt_id>_s<seed>.png``
    the generated images (8-bit PNG; every score is of the image as saved). The merge deletes images of
    models, prompts or seeds that are no longer benched.
``scores.parquet``
    one row per (model, prompt_id, seed), sorted by model (bench order), suite order, seed: ``model``
    (label), ``prompt_id``, ``prompt``, ``categories`` (comma-separated ``axis:level`` tags), ``seed``
    (int), ``image`` (path relative to the folder), then one float column per per-image metric:
    ``<reward>`` and ``<reward>/<part>`` for every ``bench.reward`` component (e.g. ``omni_classic``,
    ``ai_portrait_classic/oily``, ``ai_portrait_classic/raw_oily``; NaN where undefined, e.g. skin parts
    without a face), ``face_detected`` (0/1), ``artifact/<name>`` (0/1, NaN where undefined) for oily,
    plastic, oversaturated, overexposed, underexposed and ``any``, and ``diversity`` (the prompt's
    across-seed diversity, repeated on each of its rows).
``metrics_info.json``
    ``{metric: {"description", "higher_is_better", "kind": "image"|"prompt"|"set"}}`` for every metric
    column and set metric, in display order. ``higher_is_better`` is ``null`` for a measurement without
    a direction (a two-sided reward feature such as ``omni_classic/raw_luma``); the main metric (the
    first AI-Portrait component, else the first reward) carries ``"main": true``.
``per_category.parquet``
    ``model, category, metric, mean, std, n`` for every image and prompt metric; ``category`` is ``all``
    or a tag; ``n`` counts finite values (a prompt metric once per prompt); ``std`` has ddof=1.
``set_metrics.parquet``
    ``model, metric, value, lo, hi``: ``feature_distance_to_real`` (KID to the real set) with its
    bootstrap interval.
``comparisons.parquet``
    ``model, baseline, metric, mean_model, mean_baseline, diff, lo, hi, n_pairs, verdict`` for every model
    other than the baseline and every metric (image, prompt and set): paired by (prompt_id, seed),
    cluster bootstrap by prompt, ``bench.bootstrap`` resamples seeded by ``bench.bootstrap_seed``;
    ``verdict`` is ``better``/``worse`` (``differs`` without a direction) only when [lo, hi] excludes 0.
``metrics.json``
    ``{"suite": "<name>/<subset>", <model>: {metric: mean or set value}, "comparisons":
    {"<model>_vs_<baseline>": {metric: diff}}}`` for ``dvc metrics diff`` (non-finite values left out).
``reference.json``
    what the real reference set was and the artifact thresholds measured on it.
``parts/part-IIII-of-NNNN.parquet``
    only when run in parts: each part's rows with the raw measurements and features the merge needs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import BENCH_LABEL_CHARS, BENCH_RESERVED_LABELS, Params, flatten
from ..embeddings import EmbeddingCache, EmbeddingCacheError, encode_one
from ..io import atomic_write, atomic_write_text
from ..config import without_server_keys
from ..stage import Parts, open_output, part_command, part_file, tracked
from .compare import ID_COLUMNS, compare_pairs, feature_distance, per_category
from .metrics import (FEATURE_NAMES, RAW_KEYS, ArtifactThresholds, FeatureScaler, analyse_image, diversity,
                      load_reference, reward_column_info, reward_columns)
from .suite import BenchError, SuitePrompt, load_suite, suite_name

log = logging.getLogger(__name__)

BENCH_NOISE_KEY = 0x42454E43  # "BENC": the start-noise stream of PortraitBench, apart from training's
FORMAT = 1  # of the part files; bump when their columns change
PART_META_KEY = b"portraitgen.bench"
FEATURE_COLUMNS = [f"feat:{i:02d}" for i in range(len(FEATURE_NAMES))]
RAW_COLUMNS = [f"raw:{k}" for k in RAW_KEYS]
SET_METRIC = "feature_distance_to_real"


@dataclass(frozen=True)
class BenchModel:
    label: str
    spec: str  # "base" or what `load_trained` takes
    key: str  # where it was configured, for messages


# ---------------------------------------------------------------------------------------------- inputs
def parse_model_args(values: Sequence[str]) -> dict[str, str]:
    """``["grpo=results/train", ...]`` (the CLI's ``--model``) -> ``{label: path}``."""
    out: dict[str, str] = {}
    for v in values:
        label, sep, path = v.partition("=")
        if not sep or not label or not path:
            raise BenchError(f"--model expects LABEL=PATH (e.g. grpo=results/train or base=base), got {v!r}")
        if label in out:
            raise BenchError(f"--model: label {label!r} given twice")
        out[label] = path
    return out


def resolve_models(params: Params, models: Mapping[str, str] | None = None,
                   baseline: str | None = None) -> tuple[list[BenchModel], str]:
    """The models to bench (``models``, else ``bench.models``) and the baseline label, checked before
    anything loads: labels, the baseline, and that every model folder exists."""
    from_cli = models is not None
    table = dict(models) if from_cli else dict(params.bench.models)
    if not table:
        raise BenchError("no model to bench: give --model LABEL=PATH or set bench.models")
    out = []
    for label, spec in table.items():
        key = f"--model {label}" if from_cli else f"bench.models.{label}"
        if not label or not set(label) <= BENCH_LABEL_CHARS or label in BENCH_RESERVED_LABELS or label[0] in ".-":
            raise BenchError(f"{key}: a label is letters, digits, '_', '.', '-' (not starting with '.' or '-', and "
                             f"not {' or '.join(BENCH_RESERVED_LABELS)}); got {label!r}")
        if spec == "base":
            path, key = params.model.path, f"{key} (base = model.path)"
        else:
            path = spec
        if not path.startswith("builtin:") and not Path(path).expanduser().exists():
            raise BenchError(f"{key}: model folder not found: {Path(path).expanduser()}")
        out.append(BenchModel(label, spec, key))
    chosen = baseline if baseline is not None else params.bench.baseline
    if chosen not in table:
        where = "--baseline" if baseline is not None else "bench.baseline"
        hint = " (pass --baseline LABEL with --model)" if from_cli and baseline is None else ""
        raise BenchError(f"{where}: {chosen!r} is not one of the benched models ({', '.join(table)}){hint}")
    return out, chosen


def check_reference(source: str) -> None:
    if source != "builtin:portraits" and not Path(source).expanduser().exists():
        raise BenchError(f"bench.reference: not found: {Path(source).expanduser()} (run `portraitgen curate` first, "
                         "or point bench.reference at a folder of real portraits)")


def fingerprint(params: Params, models: Sequence[BenchModel], suite: Sequence[SuitePrompt]) -> str:
    """Everything a part's rows depend on (the batch size is checked separately, by the rows themselves)."""
    b = params.bench
    spec = {"format": FORMAT, "suite": [[p.id, p.prompt, p.categories_str] for p in suite], "seeds": list(b.seeds),
            "models": {m.label: m.spec for m in models}, "family": params.model.family, "base": params.model.path,
            "resolution": params.model.resolution, "num_steps": b.num_steps, "guidance_scale": b.guidance_scale,
            "reward": without_server_keys(dataclasses.asdict(b.reward)),  # not where a reward is scored
            "face_min_neighbors": params.curate.face_min_neighbors}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- sample
def prompt_batches(suite: Sequence[SuitePrompt], num_seeds: int, batch_size: int) -> list[list[SuitePrompt]]:
    """Consecutive whole prompts, about ``batch_size`` images each (at least one prompt)."""
    per = max(1, batch_size // num_seeds)
    return [list(suite[i:i + per]) for i in range(0, len(suite), per)]


def prompt_key(prompt_id: str) -> int:
    return int(hashlib.sha256(prompt_id.encode()).hexdigest()[:12], 16)


def _model_folder(params: Params, model: BenchModel) -> tuple[str, Path | None, dict | None]:
    """What ``export.load_trained`` would load for ``model``: (spec or path, the folder, its portraitgen.json)."""
    from ..export import MANIFEST

    spec = params.model.path if model.spec == "base" else model.spec
    if spec.startswith("builtin:"):
        return spec, None, None
    path = Path(spec).expanduser()
    if (path / "final" / MANIFEST).is_file():
        path = path / "final"
    manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else None
    return spec, path, manifest


def text_encoder_base(params: Params, model: BenchModel) -> tuple[str, str]:
    """(family, model path) whose text encoders ``model`` uses: the base recorded in portraitgen.json for a
    training output or an exported model (LoRA or full fine-tune: training never changes the text encoders),
    else the model itself (``base``, ``builtin:...``, a plain diffusers folder)."""
    spec, path, manifest = _model_folder(params, model)
    if manifest is not None:
        return str(manifest["family"]), str(manifest["base_model"])
    return params.model.family, str(path) if path is not None else spec


def load_model(params: Params, model: BenchModel, device: str, text_encoders: bool = True):
    """The policy of ``model`` (what ``export.load_trained`` loads); ``text_encoders=False`` leaves its text
    encoders out (the conditioning then comes from ``bench.prompt_embeddings``), as training does with
    ``train.prompt_embeddings``."""
    from ..export import load_trained
    from ..policies import load_policy

    if text_encoders:
        policy = load_trained(params.model.path if model.spec == "base" else model.spec, family=params.model.family,
                              device=device)
    else:
        spec, path, manifest = _model_folder(params, model)
        if manifest is None:  # base, builtin:..., a plain diffusers folder
            policy = load_policy(params.model.family, str(path) if path is not None else spec, device=device,
                                 text_encoders=False)
        elif manifest["finetune"] == "full":
            policy = load_policy(manifest["family"], str(path), device=device, text_encoders=False)
        else:  # a LoRA on its base model, as load_trained loads it
            policy = load_policy(manifest["family"], manifest["base_model"], device=device, text_encoders=False)
            policy.pipeline.load_lora_weights(str(path))
    policy.freeze_all()
    return policy


class PromptConditioning:
    """A model's prompt conditioning: rows of ``bench.prompt_embeddings`` (``cache``), or its own text
    encoders (``cache=None``). Both encode each prompt on its own (:func:`encode_one`: what the cache holds),
    so they give identical tensors."""

    def __init__(self, policy, cache: EmbeddingCache | None):
        self.policy, self.cache = policy, cache

    @property
    def source(self) -> str:
        return str(self.cache.path) if self.cache is not None else "text encoders"

    def __call__(self, prompts: Sequence[str]):
        if self.cache is not None:
            return self.cache.lookup(list(prompts), self.policy.device)
        rows = [encode_one(self.policy, p) for p in prompts]
        return {k: torch.cat([r[k] for r in rows]).to(self.policy.device) for k in rows[0]}


def open_prompt_embeddings(params: Params, suite: Sequence[SuitePrompt]) -> EmbeddingCache | None:
    """``bench.prompt_embeddings`` checked before any model loads: made by ``model.path`` with the current
    encoder settings, holding every suite prompt (and the empty prompt when CFG is on); None when unset."""
    from ..policies import model_fingerprint

    b = params.bench
    if not b.prompt_embeddings:
        return None
    remedy = "run `portraitgen precompute --params ... --out results/precompute --bench-only`"
    try:
        cache = EmbeddingCache(b.prompt_embeddings, model_fingerprint(params.model.family, params.model.path),
                               key="bench.prompt_embeddings", remedy=remedy)
    except EmbeddingCacheError as exc:
        raise BenchError(str(exc)) from None
    wanted = [p.prompt for p in suite] + ([""] if b.guidance_scale != 1.0 else [])
    missing = cache.missing(wanted)
    if missing:
        ids = {p.prompt: p.id for p in suite}
        named = "; ".join(f"{ids[m]}: {m!r}" if m in ids else "the empty prompt (CFG)" for m in missing[:3])
        raise BenchError(f"bench.prompt_embeddings: {cache.path} has no embedding for {len(missing)} of the "
                         f"{len(set(wanted))} prompts of {suite_name(b.suite, b.subset)} (e.g. {named}); it was made "
                         f"for other bench.suite/bench.subset values: re-{remedy}")
    return cache


def conditioning_sources(params: Params, models: Sequence[BenchModel],
                         cache: EmbeddingCache | None) -> dict[str, EmbeddingCache | None]:
    """label -> the cache its conditioning comes from, or None for its own text encoders: a model whose text
    encoders are not those of ``model.path`` (another fingerprint) cannot use the cache, and falls back to
    them with a warning."""
    from ..policies import model_fingerprint

    if cache is None:
        return {m.label: None for m in models}
    out: dict[str, EmbeddingCache | None] = {}
    for m in models:
        family, path = text_encoder_base(params, m)
        fp = model_fingerprint(family, path)
        if fp == cache.fingerprint:
            out[m.label] = cache
        else:
            log.warning("bench: %s is built on %s:%s (fingerprint %s), not on model.path %s:%s whose prompt embeddings "
                        "%s holds (fingerprint %s): its prompts are encoded by its own text encoders", m.key, family,
                        path, fp, params.model.family, params.model.path, cache.path, cache.fingerprint)
            out[m.label] = None
    return out


@torch.no_grad()
def sample_batch(policy, batch: Sequence[SuitePrompt], seeds: Sequence[int], *, resolution: int, num_steps: int,
                 guidance_scale: float, uncond, conditioning=None) -> torch.Tensor:
    """``[len(batch) * len(seeds), 3, R, R]`` images in [0, 1], prompt-major, quantised to 8 bits (as saved).
    ``conditioning`` maps prompts to their conditioning (default: the policy's text encoders)."""
    from ..sampling import randn_per_sample, rollout
    from ..sampling import seeded_generator

    shape = policy.latent_shape(resolution, resolution)
    sigmas = policy.sigmas(num_steps, resolution, resolution)
    conditioning = conditioning if conditioning is not None else PromptConditioning(policy, None)
    cond_prompts = conditioning([p.prompt for p in batch])
    index = [i for i in range(len(batch)) for _ in seeds]
    cond = {k: v[index] for k, v in cond_prompts.items()}
    gens = [seeded_generator(BENCH_NOISE_KEY, prompt_key(p.id), s) for p in batch for s in seeds]
    start = randn_per_sample(shape, gens, policy.device)
    unc = {k: v.expand(len(index), *v.shape[1:]) for k, v in uncond.items()} if uncond is not None else None
    traj = rollout(policy, cond, start, sigmas, step_type="sde", noise_level=0.0, uncond=unc,
                   guidance_scale=guidance_scale, stochastic=torch.zeros(num_steps, dtype=torch.bool))
    images = policy.decode(traj.final).float().cpu().clamp(0, 1)
    return torch.round(images * 255) / 255


def image_rel(label: str, prompt_id: str, seed: int) -> str:
    return f"images/{label}/{prompt_id}_s{seed}.png"


# ---------------------------------------------------------------------------------------------- score
def score_batch(rewards, images: torch.Tensor, batch: Sequence[SuitePrompt], seeds: Sequence[int], label: str,
                min_neighbors: int) -> list[dict[str, Any]]:
    from ..rewards.simple import to_uint8_hwc

    keys = [(p, s) for p in batch for s in seeds]
    cols = reward_columns(rewards, images, [p.prompt for p, _ in keys],
                          [{"model": label, "prompt_id": p.id, "seed": s} for p, s in keys])
    rows = []
    for k, (rgb, (p, s)) in enumerate(zip(to_uint8_hwc(images), keys)):
        raw, feats = analyse_image(rgb, min_neighbors)
        row: dict[str, Any] = {"model": label, "prompt_id": p.id, "prompt": p.prompt, "categories": p.categories_str,
                               "seed": int(s), "image": image_rel(label, p.id, s)}
        row.update({c: float(v[k]) for c, v in cols.items()})
        row["face_detected"] = raw["face_detected"]
        row.update({f"raw:{key}": raw[key] for key in RAW_KEYS})
        row.update(dict(zip(FEATURE_COLUMNS, map(float, feats))))
        rows.append(row)
    return rows


def run_part(params: Params, models: Sequence[BenchModel], suite: Sequence[SuitePrompt], rewards, out_dir: Path, *,
             part: int, num_parts: int, batch_size: int, device: str,
             caches: Mapping[str, EmbeddingCache | None] | None = None) -> tuple[pd.DataFrame, dict, dict[str, float]]:
    """Sample and score part ``part`` of ``num_parts`` for every model: its rows, the reward columns'
    (description, higher_is_better), and timings. ``caches``: label -> the prompt-embedding cache that
    model's conditioning comes from (it is then loaded without text encoders), None for its text encoders."""
    from ..images import to_pil

    import cv2

    # OpenCV's threaded filters (BRISQUE's) differ in the last bits with the thread count, and faces.py sets
    # one thread when its cascade first loads: start every part in that state, so no image is scored in another.
    cv2.setNumThreads(1)
    b = params.bench
    batches = [bt for k, bt in enumerate(prompt_batches(suite, len(b.seeds), batch_size)) if k % num_parts == part]
    rows: list[dict[str, Any]] = []
    timing = {"load": 0.0, "sample": 0.0, "score": 0.0}
    info: dict[str, tuple[str, bool | None]] = {}
    if not batches:  # more parts than batches: this one has nothing to do
        log.warning("bench part %d/%d has no prompts (%d batches of --batch-size %d images)", part, num_parts,
                    len(prompt_batches(suite, len(b.seeds), batch_size)), batch_size)
        return pd.DataFrame(rows), info, timing
    for model in models:
        t0 = time.perf_counter()
        cache = (caches or {}).get(model.label)
        policy = load_model(params, model, device, text_encoders=cache is None)
        conditioning = PromptConditioning(policy, cache)
        uncond = conditioning([""]) if b.guidance_scale != 1.0 else None
        timing["load"] += time.perf_counter() - t0
        log.info("bench %s: prompt conditioning from %s", model.label, conditioning.source)
        (out_dir / "images" / model.label).mkdir(parents=True, exist_ok=True)
        desc = f"bench {model.label}" + (f" part {part}/{num_parts}" if num_parts > 1 else "")
        for batch in tqdm(batches, desc=desc, leave=False):
            t0 = time.perf_counter()
            images = sample_batch(policy, batch, b.seeds, resolution=params.model.resolution, num_steps=b.num_steps,
                                  guidance_scale=b.guidance_scale, uncond=uncond, conditioning=conditioning)
            for img, (p, s) in zip(images, [(p, s) for p in batch for s in b.seeds]):
                to_pil(img).save(out_dir / image_rel(model.label, p.id, s))
            t1 = time.perf_counter()
            new = score_batch(rewards, images, batch, b.seeds, model.label, params.curate.face_min_neighbors)
            timing["score"] += time.perf_counter() - t1
            timing["sample"] += t1 - t0
            rows += new
        del policy
    for col in (rows[0] if rows else {}):
        if col not in ID_COLUMNS and col != "face_detected" and not col.startswith(("raw:", "feat:")):
            info[col] = reward_column_info(rewards, col)
    return pd.DataFrame(rows), info, timing


# ---------------------------------------------------------------------------------------------- parts
def write_part(out_dir: Path, part: int, num_parts: int, table: pd.DataFrame, meta: dict[str, Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = part_file(out_dir, part, num_parts, "parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), PART_META_KEY: json.dumps(meta)})
    return atomic_write(path, lambda tmp: pq.write_table(arrow, tmp))


def read_parts(out_dir: Path, num_parts: int, fp: str, params_hint: str) -> tuple[pd.DataFrame, dict]:
    import pyarrow.parquet as pq

    tables, info, batch_sizes = [], {}, {}
    for p in range(num_parts):
        path = part_file(out_dir, p, num_parts, "parquet")
        hint = f"run `{part_command('bench', out_dir, p, num_parts, params_hint)}`"
        if not path.is_file():
            raise BenchError(f"part {p} of {num_parts} is missing: {path}; {hint} before the merge")
        try:
            meta = json.loads(pq.read_schema(path).metadata[PART_META_KEY])
            table = pd.read_parquet(path)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise BenchError(f"part file {path} is damaged ({exc}); {hint}") from None
        if meta.get("fingerprint") != fp:
            raise BenchError(f"part file {path} was made from another suite, models or bench settings than the "
                             f"current ones; {hint}")
        batch_sizes[p] = meta.get("batch_size")
        info.update({k: tuple(v) for k, v in meta.get("reward_info", {}).items()})
        tables.append(table)
    if len(set(batch_sizes.values())) > 1:
        raise BenchError(f"the parts were run with different --batch-size values ({batch_sizes}): their prompt "
                         "shards do not fit together; rerun them with one value")
    return pd.concat(tables, ignore_index=True), info


# ---------------------------------------------------------------------------------------------- merge
def _ordered(table: pd.DataFrame, models: Sequence[BenchModel], suite: Sequence[SuitePrompt],
             seeds: Sequence[int]) -> pd.DataFrame:
    """Rows in (model, suite, seed) order; every expected row present exactly once."""
    expected = [(m.label, p.id, int(s)) for m in models for p in suite for s in seeds]
    keys = list(zip(table["model"].astype(str), table["prompt_id"].astype(str), table["seed"].astype(int)))
    have = set(keys)
    if len(have) != len(keys):
        raise BenchError("the part files hold some (model, prompt, seed) twice: were the parts run with different "
                         "--batch-size or --num-parts values? Rerun them with one value")
    missing = [k for k in expected if k not in have]
    if missing or len(have) != len(expected):
        raise BenchError(f"the part files lack {len(missing)} of {len(expected)} images (e.g. {missing[:3]}): "
                         "were the parts run with different --batch-size values? Rerun them with one value")
    pos = {k: i for i, k in enumerate(expected)}
    return table.assign(_pos=[pos[k] for k in keys]).sort_values("_pos").drop(columns="_pos").reset_index(drop=True)


def analyse_reference(source: str, resolution: int, min_neighbors: int) -> tuple[pd.DataFrame, np.ndarray, str]:
    images, what = load_reference(source, resolution)
    raws, feats = [], []
    for rgb in tqdm(images, desc="bench reference", leave=False):
        raw, f = analyse_image(rgb, min_neighbors)
        raws.append(raw)
        feats.append(f)
    return pd.DataFrame(raws), np.stack(feats), what


def metric_info(reward_info: Mapping[str, tuple[str, bool | None]], thresholds: ArtifactThresholds,
                seeds: int) -> dict[str, dict[str, Any]]:
    info: dict[str, dict[str, Any]] = {}
    for col, (desc, hib) in reward_info.items():
        info[col] = {"description": desc, "higher_is_better": hib, "kind": "image"}
    components = [c for c in reward_info if "/" not in c]
    main = next((c for c in components if c.startswith("ai_portrait")), components[0] if components else None)
    if main is not None:
        info[main]["main"] = True
    info["face_detected"] = {"description": "1 when a frontal face is found (the curate stage's OpenCV Haar cascade, "
                                            "curate.face_min_neighbors)", "higher_is_better": True, "kind": "image"}
    for col, desc in thresholds.describe().items():
        info[col] = {"description": desc, "higher_is_better": False, "kind": "image"}
    info["diversity"] = {"description": f"mean pairwise distance between a prompt's {seeds} images (one per seed) in "
                                        "the standardised hand-crafted feature space, / sqrt(dimension); higher "
                                        "means more varied images of one prompt", "higher_is_better": True,
                         "kind": "prompt"}
    info[SET_METRIC] = {"description": "KID (unbiased MMD^2, cubic polynomial kernel) between the model's images and "
                                       "the real reference set in the hand-crafted feature space (colour, exposure, "
                                       "texture, frequency and layout statistics; not Inception features): 0 = "
                                       "the same low-level statistics as real photos", "higher_is_better": False,
                        "kind": "set"}
    return info


def remove_stale_images(out_dir: Path, keep: set[str]) -> int:
    """Delete images of models, prompts or seeds no longer benched (left by an earlier run in ``out_dir``)."""
    removed = 0
    root = out_dir / "images"
    for folder in (root.iterdir() if root.is_dir() else []):
        if not folder.is_dir():
            continue
        for f in folder.glob("*.png"):
            if f"images/{folder.name}/{f.name}" not in keep:
                f.unlink()
                removed += 1
        if not any(folder.iterdir()):
            folder.rmdir()
    if removed:
        log.info("bench: removed %d images no longer benched from %s", removed, root)
    return removed


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def _write_json(data: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def merge(params: Params, models: Sequence[BenchModel], baseline: str, suite: Sequence[SuitePrompt],
          table: pd.DataFrame, reward_info: Mapping[str, tuple[str, bool | None]], out_dir: Path) -> dict[str, Any]:
    """Everything after scoring: flags, diversity, set metrics, aggregation, comparisons; writes the files."""
    b = params.bench
    labels = [m.label for m in models]
    table = _ordered(table, models, suite, b.seeds)
    ref_raw, ref_feats, ref_what = analyse_reference(b.reference, params.model.resolution,
                                                     params.curate.face_min_neighbors)
    log.info("bench reference: %s (%d with a face)", ref_what, int(ref_raw["face_detected"].sum()))
    thresholds = ArtifactThresholds.fit(ref_raw, b.artifact_quantile)
    flags = thresholds.flags(table[RAW_COLUMNS].rename(columns=lambda c: c.split(":", 1)[1]))
    scaler = FeatureScaler.fit(ref_feats)
    z = scaler(table[FEATURE_COLUMNS].to_numpy(dtype=np.float64))
    div = np.full(len(table), np.nan)
    for _, idx in table.groupby(["model", "prompt_id"], sort=False).indices.items():
        div[idx] = diversity(z[idx])

    metric_cols = list(reward_info)
    scores = pd.concat([table[list(ID_COLUMNS) + metric_cols + ["face_detected"]], flags], axis=1)
    scores["diversity"] = div
    scores["seed"] = scores["seed"].astype("int64")
    info = metric_info(reward_info, thresholds, len(b.seeds))

    cats = per_category(scores, info)
    comp = compare_pairs(scores, info, labels, baseline, n_boot=b.bootstrap, confidence=b.confidence,
                         seed=b.bootstrap_seed)
    zs = {m: (z[(table["model"] == m).to_numpy()], table.loc[table["model"] == m, "prompt_id"].to_numpy(dtype=str),
              table.loc[table["model"] == m, "seed"].to_numpy()) for m in labels}
    set_metrics, set_comp = feature_distance(zs, scaler(ref_feats), labels, baseline, n_boot=b.bootstrap,
                                             confidence=b.confidence, seed=b.bootstrap_seed, metric=SET_METRIC)
    comparisons = pd.concat([comp, set_comp], ignore_index=True) if len(set_comp) else comp

    name = suite_name(b.suite, b.subset)
    metrics_json: dict[str, Any] = {"suite": name}
    overall = cats[cats["category"] == "all"]
    for m in labels:
        vals = {r.metric: float(r.mean) for r in overall[overall["model"] == m].itertuples() if _finite(r.mean)}
        vals.update({r.metric: float(r.value) for r in set_metrics[set_metrics["model"] == m].itertuples()
                     if _finite(r.value)})
        metrics_json[m] = vals
    metrics_json["comparisons"] = {
        f"{m}_vs_{baseline}": {r.metric: float(r.diff) for r in comparisons[comparisons["model"] == m].itertuples()
                               if _finite(r.diff)} for m in labels if m != baseline}

    remove_stale_images(out_dir, set(scores["image"]))
    _write_parquet(scores, out_dir / "scores.parquet")
    _write_parquet(cats, out_dir / "per_category.parquet")
    _write_parquet(set_metrics, out_dir / "set_metrics.parquet")
    _write_parquet(comparisons, out_dir / "comparisons.parquet")
    _write_json(info, out_dir / "metrics_info.json")
    _write_json(metrics_json, out_dir / "metrics.json")
    _write_json({"source": b.reference, "used": ref_what, "images": len(ref_raw),
                 "with_face": int(ref_raw["face_detected"].sum()), **thresholds.to_dict()},
                out_dir / "reference.json")
    verdicts = [f"{r.model} vs {r.baseline}: {r.metric} {r.diff:+.4g} [{r.lo:.4g}, {r.hi:.4g}] {r.verdict}"
                for r in comparisons.itertuples() if r.verdict]
    for line in verdicts:
        log.info("bench verdict: %s", line)
    if not verdicts and len(labels) > 1:
        log.info("bench: no comparison's interval excludes 0")
    return {"suite": name, "prompts": len(suite), "seeds": len(b.seeds), "models": labels, "baseline": baseline,
            "images": len(scores), "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- report
def bench_run(params: Params, models: Sequence[BenchModel]):
    """The stage's MLflow run (a context manager): opened before sampling, so its system metrics cover the
    stage's work, not only the report."""
    settings = json.loads(json.dumps(dataclasses.asdict(params.bench)))  # tuples as lists: "[0, 1]"
    settings["models"] = {m.label: m.spec for m in models}  # what was benched (--model replaces bench.models)
    run_params = {f"bench.{k}": v for k, v in flatten(settings).items()}
    run_params.update({"model.family": params.model.family, "model.path": params.model.path,
                       "model.resolution": params.model.resolution})
    return tracked(params.tracking, "bench", params=run_params,
                   tags={"portraitgen.bench.suite": suite_name(params.bench.suite, params.bench.subset)})


def write_bench_report(out_dir: Path, tracker) -> None:
    """The report (report.py, when present), logged into the stage's run."""
    try:
        from .report import write_report
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.report":
            raise
        log.warning("bench: portraitgen/bench/report.py is not there yet: no report.html; metrics go to MLflow "
                    "without it")
        metrics = json.loads((out_dir / "metrics.json").read_text())
        flat = {k: v for k, v in flatten({k: v for k, v in metrics.items() if k != "suite"}).items() if _finite(v)}
        tracker.log_metrics({k.replace(".", "/"): v for k, v in flat.items()}, step=0)
        tracker.log_artifact(out_dir / "metrics.json", "bench")
    else:
        write_report(out_dir, tracker)


# ---------------------------------------------------------------------------------------------- stage
def run_bench(params: Params, out_dir: str | Path, *, models: Mapping[str, str] | None = None,
              baseline: str | None = None, part: int | None = None, num_parts: int = 1, merge_only: bool = False,
              batch_size: int = 8, params_path: str = "params.yaml", report: bool = True) -> dict[str, Any]:
    """The stage: sample and score (all parts, or one) and, unless running one part of several, merge,
    write the artifacts and (``report``) the report and MLflow run. ``models`` (label -> path) replaces
    ``bench.models``; ``params_path`` only appears in messages."""
    out = Path(out_dir)
    parts = Parts.checked(part, num_parts, merge_only, error=BenchError)
    if batch_size < 1:
        raise BenchError(f"--batch-size must be at least 1, got {batch_size}")
    b = params.bench
    suite = load_suite(b.suite, b.subset)
    bench_models, baseline = resolve_models(params, models, baseline)
    if not parts.scattered:
        check_reference(b.reference)
    fp = fingerprint(params, bench_models, suite)
    # A missing, stale or incomplete bench.prompt_embeddings fails here, before any model loads.
    caches = {} if merge_only else conditioning_sources(params, bench_models, open_prompt_embeddings(params, suite))
    out = open_output(out)
    # A merge reads its parts first: a missing or stale part is an error before the stage's run opens.
    parts_read = read_parts(out, num_parts, fp, params_path) if merge_only else None
    # The stage's MLflow run is open during the work, so its system metrics cover sampling and scoring.
    with bench_run(params, bench_models) if report and not parts.scattered else contextlib.nullcontext() as tracker:
        t_start = time.perf_counter()
        if parts_read is not None:
            table, reward_info = parts_read
            timing: dict[str, float] = {}
        else:
            from ..rewards import RewardError, RewardSet

            try:
                rewards = RewardSet(b.reward.components, options=b.reward.options)
            except RewardError as exc:
                raise BenchError(f"bench.reward: {exc}") from None
            device = "cuda" if torch.cuda.is_available() else "cpu"
            tables, reward_info, timing = [], {}, {"load": 0.0, "sample": 0.0, "score": 0.0}
            for p in parts.to_run:
                t, info, tm = run_part(params, bench_models, suite, rewards, out, part=p, num_parts=num_parts,
                                       batch_size=batch_size, device=device, caches=caches)
                reward_info.update(info)
                timing = {k: timing[k] + tm[k] for k in timing}
                if num_parts > 1:
                    write_part(out, p, num_parts, t, {"part": p, "num_parts": num_parts, "fingerprint": fp,
                                                      "batch_size": batch_size,
                                                      "reward_info": {k: list(v) for k, v in reward_info.items()}})
                tables.append(t)
            table = pd.concat(tables, ignore_index=True)
            n = max(1, len(table) // len(b.seeds))  # (prompt, model) pairs
            log.info("bench: %d images (%d prompts x %d models, %d seeds each) in %.1f s: %.2f s per prompt and model "
                     "(sampling %.2f, scoring %.2f), %.1f s loading models", len(table), n // len(bench_models),
                     len(bench_models), len(b.seeds), timing["sample"] + timing["score"],
                     (timing["sample"] + timing["score"]) / n, timing["sample"] / n, timing["score"] / n, timing["load"])
            if parts.scattered:
                path = part_file(out, part, num_parts, "parquet")
                log.info("bench part %d/%d: %d images -> %s", part, num_parts, len(table), path)
                return {"part": part, "num_parts": num_parts, "images": len(table), "file": str(path), **timing}
        summary = merge(params, bench_models, baseline, suite, table, reward_info, out)
        summary.update({f"seconds_{k}": v for k, v in timing.items()})
        if caches:
            summary["prompt_conditioning"] = {label: str(c.path) if c is not None else "text encoders"
                                              for label, c in caches.items()}
        if tracker is not None:
            write_bench_report(out, tracker)
        summary["seconds_total"] = time.perf_counter() - t_start
        log.info("bench: %s -> %s (%.1f s)", summary["suite"], out, summary["seconds_total"])
        return summary

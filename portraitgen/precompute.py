"""``portraitgen precompute``: what training and PortraitBench would otherwise recompute, done once.

    portraitgen precompute --params params.yaml --out results/precompute                           # one process
    portraitgen precompute --params params.yaml --out results/precompute --part 2 --num-parts 8       # one cluster job
    portraitgen precompute --params params.yaml --out results/precompute --merge-only --num-parts 8   # gather
    portraitgen precompute --params params.yaml --out results/precompute --bench-only   # PortraitBench's prompts

Outputs (under ``--out``):

- ``prompt_embeddings.safetensors``: the text encoders' outputs for every training prompt (the captions
  of the curated exemplars when ``prompts.source: exemplars``) and the empty prompt, nothing else;
  training reads it with ``train.prompt_embeddings`` and then never loads the text encoders. Entries
  come from the per-prompt store ``cache/embeddings/`` (:mod:`.embeddings`): only prompts it lacks are
  encoded.
- ``bench_prompt_embeddings.safetensors``, written by ``--bench-only`` and only by it: the same for
  PortraitBench's prompts (``bench.suite`` in ``bench.subset``) and the empty prompt, in the same format
  and from the same store; the bench reads it with ``bench.prompt_embeddings``. A run of its own (the
  workflow's ``bench_embeddings`` job) so that the bench's prompts never touch a file training reads:
  editing ``bench.suite`` or ``bench.subset`` then reruns that job and the bench, never training. It
  writes nothing else (no detector, rewards, ``metrics.json`` or MLflow run) and deletes nothing from
  the store; the other runs' pruning keeps the entries of both prompt lists.
- ``detector/``: the AI-Portrait real-vs-generated classifier, when a reward component (``reward`` or
  ``bench.reward``) is ``ai_portrait_detector``, or ``ai_portrait`` with ``backend: detector``, and its
  ``path`` option points here. Trained on the curated real images (manifest split ``train``) against as
  many base-model generations of their captions (deterministic sampler, image ``i`` seeded by
  ``(seed, i)`` with the detector's ``seed``);
  ``report.json`` holds the held-out accuracy/AUC. ``key.json`` records a hash of what it was made from
  (real image hashes and captions, model fingerprint, detector and generation settings): while that is
  unchanged the detector is reused, never retrained. Settings: ``reward.options.<name>.train``
  (:class:`~.rewards.detector.DetectorConfig` fields, plus ``num_generated`` (0: as many as real
  images), ``num_steps`` (default ``sample.eval_num_steps``) and ``guidance_scale`` (default
  ``sample.guidance_scale``, 1 when ``sample.cfg`` is off)). A ``path`` outside ``--out`` names a
  detector trained elsewhere (``portraitgen train-detector``), used as it is.
- ``exemplar_rewards.parquet``: every reward component (and sub-score) of every curated training image,
  and the weighted ``total``; training reads it with ``train.exemplars.rewards``. Rows come from the
  store ``cache/rewards/``, keyed by image hash, caption and the settings of the components (and the
  detector's key for the components that use it): adding images scores only the new ones.
- ``metrics.json`` (counts, throughput, the detector's held-out figures) and an MLflow run.
- ``parts/part-IIII-of-NNNN.parquet``: the part jobs' exemplar rewards, gathered by ``--merge-only``.

Order, in one process or in the merge job: (1) one load of the base model with its text encoders
serves both the prompts the store lacks and, if the detector must be (re)trained, its generated
images; (2) the detector is trained; (3) exemplars are scored: first the components that do not need
the detector trained here, then those that do, so they always see the current detector.

Scatter/gather: exemplars are cut into blocks of ``SCORE_BLOCK`` (in manifest id order); part ``p`` of
``N`` scores the blocks ``k`` with ``k % N == p`` for every component that does not need the detector
trained here, and writes its part file. The merge checks that every part is there and current,
naming any that is not, then embeds the prompts, trains the detector and scores the detector's
components itself. The embeddings and the detector stay in that one process on purpose: both need the
base model's text encoders (several GB for real models), loaded once there instead of once per part,
and the detector's components (a small CNN) are cheap next to the VLM rewards the parts exist for.
A block is also the scoring batch, fixed whatever the hardware or the number of parts, so one process
and N parts write the same table (``reward.on_invalid: mask`` fills with a batch mean).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import Params, reward_config_hash, uses_detector
from .embeddings import write_cache
from .integrity import write_checksum
from .images import load_image
from .io import atomic_dir, atomic_write, atomic_write_text
from .manifest import read_manifest
from .policies import FlowPolicy, load_policy, model_fingerprint
from .prompts import load_prompts
from .rewards import RewardSet
from .rewards.detector import DetectorConfig
from .rewards.remote import scoring_options
from .rewards.simple import to_uint8_hwc
from .stage import Parts, open_output, part_command, part_file, tracked

log = logging.getLogger(__name__)

SCORE_BLOCK = 16  # exemplars per scoring batch, and the unit parts are made of
TRAINING_EMBEDDINGS = "prompt_embeddings.safetensors"  # train.prompt_embeddings
BENCH_EMBEDDINGS = "bench_prompt_embeddings.safetensors"  # bench.prompt_embeddings (--bench-only)
EMBEDDING_STORE = Path("cache") / "embeddings"  # shared by both files
DETECTOR_DIR = "detector"
DETECTOR_FORMAT = 1  # bump when how the detector is made changes: existing ones are retrained
GENERATION_KEYS = ("num_generated", "num_steps", "guidance_scale")


class PrecomputeError(ValueError):
    """A part file is missing or stale, or the stage's options are unusable."""


# ---------------------------------------------------------------------------------------------- prompts
def training_prompts(params: Params) -> list[str]:
    if params.prompts.source == "exemplars":
        df = read_manifest(params.invert.manifest, error=PrecomputeError, nonempty=True)
        return sorted(set(df["caption"].astype(str)))
    return load_prompts(params.prompts.source)


def bench_prompts(params: Params) -> list[str]:
    """PortraitBench's prompts (``bench.suite`` in ``bench.subset``) when params have a ``bench`` section:
    what ``--bench-only`` embeds, and what the training run's pruning of the shared store keeps."""
    bench = getattr(params, "bench", None)
    if bench is None:
        return []
    try:
        from .bench.suite import BenchError, load_suite
    except ImportError:  # the bench package is optional here
        log.warning("params have a bench section, but portraitgen.bench.suite cannot be imported: "
                    "no bench prompt is embedded")
        return []
    try:
        return [row.prompt for row in load_suite(bench.suite, bench.subset)]
    except BenchError as exc:
        raise PrecomputeError(str(exc)) from None


# ---------------------------------------------------------------------------------------------- detector
def _reward_sections(params: Params) -> list[tuple[str, dict, dict]]:
    """(params key, components, options) of ``reward`` and, when params have it, ``bench.reward``."""
    sections = [("reward", dict(params.reward.components), dict(params.reward.options))]
    bench_reward = getattr(getattr(params, "bench", None), "reward", None)
    if bench_reward is not None:
        def get(key):
            return bench_reward.get(key) if isinstance(bench_reward, Mapping) else getattr(bench_reward, key, None)

        sections.append(("bench.reward", dict(get("components") or {}), dict(get("options") or {})))
    return sections


@dataclass(frozen=True)
class DetectorPlan:
    """The detector this stage trains: where, with which settings, for which components."""

    path: Path
    cfg: DetectorConfig
    num_generated: int  # base-model images (0: as many as real images)
    num_steps: int  # deterministic sampler steps
    guidance_scale: float
    used_by: tuple[str, ...]  # params keys of the components' options


def _train_settings(params: Params, key: str, train: Any) -> tuple[DetectorConfig, int, int, float]:
    if not isinstance(train, Mapping):
        raise PrecomputeError(f"{key}.train: expected a mapping of detector settings, got {train!r}")
    defaults = DetectorConfig()
    cfg_keys = [f.name for f in fields(DetectorConfig)]
    unknown = sorted(set(train) - set(cfg_keys) - set(GENERATION_KEYS))
    if unknown:
        known = ", ".join(cfg_keys + list(GENERATION_KEYS))
        raise PrecomputeError(f"{key}.train.{unknown[0]}: unknown setting; known: {known}")
    values = {}
    for name in cfg_keys:
        if name in train:
            try:  # YAML may give 1e-3 as a string, or an int for a float
                values[name] = type(getattr(defaults, name))(train[name])
            except (TypeError, ValueError):
                raise PrecomputeError(f"{key}.train.{name}: expected {type(getattr(defaults, name)).__name__}, "
                                      f"got {train[name]!r}") from None
    cfg = DetectorConfig(**values)
    if cfg.crop not in ("face", "center", "none"):
        raise PrecomputeError(f"{key}.train.crop: expected face, center or none, got {cfg.crop!r}")
    s = params.sample
    try:
        num_generated = int(train.get("num_generated", 0))
        num_steps = int(train.get("num_steps", s.eval_num_steps))
        guidance = float(train.get("guidance_scale", s.guidance_scale if s.cfg else 1.0))
    except (TypeError, ValueError) as exc:
        raise PrecomputeError(f"{key}.train: {exc}") from None
    if num_generated < 0 or num_steps < 1:
        raise PrecomputeError(f"{key}.train: num_generated must be >= 0 and num_steps >= 1, "
                              f"got {num_generated} and {num_steps}")
    return cfg, num_generated, num_steps, guidance


def detector_plan(params: Params, out: Path) -> DetectorPlan | None:
    """The detector to train under ``out/detector``, or None when no reward component needs it.

    Checks every detector component's options (before any model loads): its ``path`` must be set, and
    components sharing this folder must ask for the same settings.
    """
    target = (out / DETECTOR_DIR).resolve()
    found: dict[str, tuple] = {}
    for section, components, options in _reward_sections(params):
        for name in components:
            opts = dict(options.get(name) or {})
            if not uses_detector(name, opts):
                continue
            key = f"{section}.options.{name}"
            path = str(opts.get("path") or "")
            if not path:
                raise PrecomputeError(f"{key}.path: not set; point it at {out / DETECTOR_DIR} (the precompute "
                                      f"stage trains the detector there), or at a detector made by "
                                      f"`portraitgen train-detector`")
            if Path(path).resolve() != target:
                log.info("%s.path is %s, outside %s: that detector is used as it is, not trained here", key, path, out)
                continue
            found[key] = _train_settings(params, key, opts.get("train") or {})
    if not found:
        return None
    if len(set(found.values())) > 1:
        raise PrecomputeError(f"{' and '.join(found)} share {target} but ask for different .train settings; "
                              f"make them equal")
    cfg, num_generated, num_steps, guidance = next(iter(found.values()))
    return DetectorPlan(out / DETECTOR_DIR, cfg, num_generated, num_steps, guidance, tuple(found))


def detector_key(plan: DetectorPlan, df: pd.DataFrame, fingerprint: str, resolution: int) -> str:
    """Hash of everything the detector is made from."""
    payload = {"format": DETECTOR_FORMAT, "real": [str(h) for h in df["content_hash"]],
               "captions": [str(c) for c in df["caption"]], "model": fingerprint, "resolution": resolution,
               "detector": asdict(plan.cfg),
               "generation": {"num_generated": plan.num_generated, "num_steps": plan.num_steps,
                              "guidance_scale": plan.guidance_scale}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _current_detector(path: Path, key: str) -> dict | None:
    """The report of the detector at ``path`` if it is complete and was made from ``key``."""
    try:
        if json.loads((path / "key.json").read_text()).get("key") != key:
            return None
        if not (path / "detector.safetensors").is_file():
            return None
        return json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return None


def ensure_detector(plan: DetectorPlan, params: Params, df: pd.DataFrame, fingerprint: str,
                    base_model: Callable[[], FlowPolicy]) -> dict[str, Any]:
    """Reuse the detector at ``plan.path`` if its inputs are unchanged, else train it; returns figures."""
    from .generate import generate_images
    from .rewards.detector import train_detector

    res = params.model.resolution
    key = detector_key(plan, df, fingerprint, res)
    report = _current_detector(plan.path, key)
    if report is not None:
        log.info("detector: reusing %s (its real images, model and settings are unchanged)", plan.path)
        return {"trained": False, "key": key, "report": report}
    t0 = time.perf_counter()
    real = [to_uint8_hwc(load_image(f, res)[None])[0] for f in tqdm(df["image_file"], desc="detector: real images")]
    n_gen = plan.num_generated or len(real)
    captions = [str(c) for c in df["caption"]]
    prompts = [captions[i % len(captions)] for i in range(n_gen)]
    policy = base_model()
    t_gen = time.perf_counter()
    images = generate_images(policy, prompts, resolution=res, num_steps=plan.num_steps,
                             guidance_scale=plan.guidance_scale, seed=plan.cfg.seed, num_images=1, batch_size=8)
    gen_seconds = time.perf_counter() - t_gen
    generated = list(to_uint8_hwc(images))
    # Built aside and put in place whole: readers see the old detector, none, or the new one.
    with atomic_dir(plan.path) as tmp:
        report = train_detector(real, generated, tmp, plan.cfg)
        report.pop("model", None)
        report["sources"] = {
            "real": f"{params.invert.manifest} (split train): {len(real)} images",
            "generated": f"{n_gen} images of the base model {params.model.family}:{params.model.path} for the real "
                         f"images' captions; deterministic sampler, {plan.num_steps} steps, CFG {plan.guidance_scale}, "
                         f"seeds ({plan.cfg.seed}, i)"}
        report["generation_images_per_second"] = n_gen / gen_seconds if gen_seconds > 0 else None
        report["seconds_total"] = time.perf_counter() - t0
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "key.json").write_text(json.dumps({"key": key, "model_fingerprint": fingerprint, "resolution": res,
                                                  "used_by": list(plan.used_by)}, indent=2))
    log.info("detector: trained on %d real vs %d generated images; held-out accuracy %.3f, AUC %.3f -> %s",
             len(real), n_gen, report["val_accuracy"], report["val_auc"], plan.path)
    return {"trained": True, "key": key, "report": report}


def _detector_metrics(det: dict[str, Any], plan: DetectorPlan) -> dict[str, Any]:
    r = det["report"]
    return {"detector_path": str(plan.path), "detector_trained": det["trained"], "detector_key": det["key"][:16],
            "detector_val_auc": r.get("val_auc"), "detector_val_accuracy": r.get("val_accuracy"),
            "detector_train_accuracy": r.get("train_accuracy"), "detector_n_real": r.get("n_real"),
            "detector_n_generated": r.get("n_generated"), "detector_n_val": r.get("n_val"),
            "detector_generation_images_per_second": r.get("generation_images_per_second"),
            "detector_seconds": r.get("seconds_total")}


# ---------------------------------------------------------------------------------------------- rewards
def reward_groups(params: Params, plan: DetectorPlan | None) -> tuple[list[str], list[str]]:
    """``reward.components`` split into those scored anywhere and those needing the detector trained here."""
    opts = params.reward.options
    here = plan.path.resolve() if plan is not None else None
    det = [n for n in params.reward.components
           if here is not None and uses_detector(n, dict(opts.get(n) or {}))
           and Path(str((opts.get(n) or {}).get("path") or "")).resolve() == here]
    return [n for n in params.reward.components if n not in det], det


def _group_hash(params: Params, names: Sequence[str]) -> str:
    r = params.reward
    cfg = {"components": {n: r.components[n] for n in names},
           # where a reward is scored (a reward server's URL) is not what it scores
           "options": {n: None if r.options.get(n) is None else scoring_options(r.options[n]) for n in names},
           "normalize": {n: r.normalize[n] for n in names if n in r.normalize}, "on_invalid": r.on_invalid,
           "resolution": params.model.resolution, "block": SCORE_BLOCK}
    text = json.dumps(cfg, sort_keys=True, default=lambda o: asdict(o) if is_dataclass(o) else str(o))
    return hashlib.sha256(text.encode()).hexdigest()


def _row_keys(df: pd.DataFrame, group_hash: str, extra: str = "") -> list[str]:
    return [hashlib.sha256(json.dumps([str(h), str(c), group_hash, extra]).encode()).hexdigest()
            for h, c in zip(df["content_hash"], df["caption"])]


def _reward_set(params: Params, names: Sequence[str]) -> RewardSet:
    r = params.reward
    return RewardSet({n: r.components[n] for n in names}, options={n: r.options[n] for n in names if n in r.options},
                     normalize={n: r.normalize[n] for n in names if n in r.normalize}, on_invalid=r.on_invalid)


def _atomic_parquet(table: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))


class RewardStore:
    """Scored exemplar rows keyed by content (:func:`_row_keys`), in chunk files ``rows-<hash>.parquet``
    (columns ``key``, ``values`` as JSON). Part jobs and the merge add chunks under distinct names."""

    def __init__(self, root: Path):
        self.root = root
        self.values: dict[str, dict[str, float]] = {}
        self._chunks: dict[Path, list[str]] = {}
        for path in sorted(root.glob("rows-*.parquet")):
            try:
                table = pd.read_parquet(path)
                keys = [str(k) for k in table["key"]]
                vals = [json.loads(v) for v in table["values"]]
            except Exception as exc:
                log.warning("reward store: ignoring unreadable chunk %s (%s)", path, exc)
                continue
            self._chunks[path] = keys
            self.values.update(zip(keys, vals))

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def add(self, rows: dict[str, dict[str, float]]) -> None:
        if not rows:
            return
        keys = list(rows)
        path = self.root / f"rows-{hashlib.sha256('|'.join(keys).encode()).hexdigest()[:16]}.parquet"
        _atomic_parquet(pd.DataFrame({"key": keys, "values": [json.dumps(rows[k]) for k in keys]}), path)
        self._chunks[path] = keys
        self.values.update(rows)

    def prune(self, wanted: set[str]) -> None:
        for path, keys in list(self._chunks.items()):
            if wanted.isdisjoint(keys):
                path.unlink(missing_ok=True)
                del self._chunks[path]


def _blocks(n: int) -> int:
    return (n + SCORE_BLOCK - 1) // SCORE_BLOCK


def score_blocks(params: Params, df: pd.DataFrame, names: Sequence[str], keys: list[str], blocks: Sequence[int],
                 store: RewardStore, desc: str) -> tuple[dict[int, dict[str, float]], set[int]]:
    """Values of ``names`` for the rows of ``blocks``: from the store, or scored (then stored).

    Returns ``{row: {component, component/sub-score, total, ...}}`` and the rows scored here. The
    rewards are built only if something must be scored.
    """
    rows_of = [list(range(b * SCORE_BLOCK, min((b + 1) * SCORE_BLOCK, len(df)))) for b in blocks]
    if not names:
        return {i: {} for rows in rows_of for i in rows}, set()
    rewards: RewardSet | None = None
    values: dict[int, dict[str, float]] = {}
    scored: set[int] = set()
    pending: dict[str, dict[str, float]] = {}
    res = params.model.resolution
    todo_blocks = [rows for rows in rows_of if any(keys[i] not in store for i in rows)]
    for rows in tqdm(todo_blocks, desc=desc, disable=not todo_blocks):
        todo = [i for i in rows if keys[i] not in store]
        if rewards is None:
            rewards = _reward_set(params, names)
        images = torch.stack([load_image(df["image_file"][i], res) for i in todo])
        out = rewards(images, [str(df["caption"][i]) for i in todo],
                      [{"id": str(df["id"][i]), "real": True} for i in todo])
        for k, i in enumerate(todo):
            pending[keys[i]] = {name: float(v[k]) for name, v in out.items()}
            scored.add(i)
        if len(pending) >= 16 * SCORE_BLOCK:  # a killed run keeps what it scored
            store.add(pending)
            pending = {}
    store.add(pending)
    for rows in rows_of:
        for i in rows:
            values[i] = store.values[keys[i]]
    return values, scored


def _part_blocks(n_rows: int, part: int, num_parts: int) -> list[int]:
    return [b for b in range(_blocks(n_rows)) if b % num_parts == part]


def score_part(params: Params, out: Path, part: int, num_parts: int, plan: DetectorPlan | None) -> dict[str, Any]:
    """A part job: the components not needing the detector trained here, for this part's blocks."""
    df = read_manifest(params.invert.manifest, error=PrecomputeError, nonempty=True)
    base_names, _ = reward_groups(params, plan)
    keys = _row_keys(df, _group_hash(params, base_names))
    blocks = _part_blocks(len(df), part, num_parts)
    t0 = time.perf_counter()
    values, scored = score_blocks(params, df, base_names, keys, blocks, RewardStore(out / "cache" / "rewards"),
                                  desc=f"score exemplars part {part}/{num_parts}")
    seconds = time.perf_counter() - t0
    rows = sorted(values)
    path = part_file(out, part, num_parts, "parquet")
    _atomic_parquet(pd.DataFrame({"row": rows, "id": [str(df["id"][i]) for i in rows], "key": [keys[i] for i in rows],
                                  "scored": [i in scored for i in rows],
                                  "values": [json.dumps(values[i]) for i in rows]}), path)
    log.info("precompute part %d/%d: %d exemplars (%d scored, %d from the store) -> %s", part, num_parts, len(rows),
             len(scored), len(rows) - len(scored), path)
    return {"part": part, "num_parts": num_parts, "exemplars": len(rows), "exemplars_scored": len(scored),
            "score_images_per_second": len(scored) / seconds if scored and seconds > 0 else None}


def read_parts(out: Path, num_parts: int, n_rows: int, keys: list[str]) -> tuple[dict[int, dict[str, float]], set[int]]:
    """Gather every part file, checking each is there and holds the current rows and settings."""
    values: dict[int, dict[str, float]] = {}
    scored: set[int] = set()
    missing = [p for p in range(num_parts) if not part_file(out, p, num_parts, "parquet").is_file()]
    if missing:
        paths = ", ".join(str(part_file(out, p, num_parts, "parquet")) for p in missing)
        raise PrecomputeError(f"{len(missing)} of {num_parts} part file(s) missing: {paths}; run "
                              f"`{part_command('precompute', out, missing[0], num_parts)}` "
                              f"(and the other missing parts) before the merge")
    for p in range(num_parts):
        path = part_file(out, p, num_parts, "parquet")
        try:
            table = pd.read_parquet(path)
        except Exception as exc:
            raise PrecomputeError(f"part file {path} is unreadable ({exc}); re-run part {p}") from None
        rows = [i for b in _part_blocks(n_rows, p, num_parts)
                for i in range(b * SCORE_BLOCK, min((b + 1) * SCORE_BLOCK, n_rows))]
        if list(table["row"]) != rows or list(table["key"]) != [keys[i] for i in rows]:
            raise PrecomputeError(f"part file {path} was made from other exemplars or reward settings than the current "
                                  f"ones; re-run `{part_command('precompute', out, p, num_parts)}`")
        for i, s, v in zip(table["row"], table["scored"], table["values"]):
            values[int(i)] = json.loads(v)
            if s:
                scored.add(int(i))
    return values, scored


def _assemble(params: Params, df: pd.DataFrame, base: dict[int, dict], det: dict[int, dict],
              detector_key_: str) -> pd.DataFrame:
    components = list(params.reward.components)
    cfg = reward_config_hash(params)
    records = []
    for i in range(len(df)):
        b, d = base[i], det.get(i, {})
        merged = {**b, **d}
        rec: dict[str, Any] = {"id": str(df["id"][i]), "content_hash": str(df["content_hash"][i]),
                               "caption": str(df["caption"][i]), "reward_config": cfg,
                               "detector_key": detector_key_}
        rec.update({n: merged[n] for n in components})
        for n in components:
            rec.update({k: v for k, v in merged.items() if k.startswith(f"{n}/")})
        if "masked" in b or "masked" in d:
            rec["masked"] = max(b.get("masked", 0.0), d.get("masked", 0.0))
        totals = [g["total"] for g in (b, d) if g]
        # One group: RewardSet's own float32 total. Two: their float32 totals added in float64.
        rec["total"] = (totals[0] if len(totals) == 1
                        else float(np.float32(np.float64(totals[0]) + np.float64(totals[1]))))
        records.append(rec)
    return pd.DataFrame(records)


def score_exemplars(params: Params, out: Path, df: pd.DataFrame, plan: DetectorPlan | None, det_key: str,
                    gather_parts: int | None = None) -> dict[str, Any]:
    """Write exemplar_rewards.parquet: components gathered from part files (``gather_parts``) or scored
    here, then the detector's components (always here, after it is trained)."""
    base_names, det_names = reward_groups(params, plan)
    store = RewardStore(out / "cache" / "rewards")
    base_keys = _row_keys(df, _group_hash(params, base_names))
    det_keys = _row_keys(df, _group_hash(params, det_names), det_key) if det_names else []
    every_block = range(_blocks(len(df)))
    t0 = time.perf_counter()
    if gather_parts:
        base, base_scored = read_parts(out, gather_parts, len(df), base_keys)
        base_here: set[int] = set()
    else:
        base, base_here = score_blocks(params, df, base_names, base_keys, every_block, store, "score exemplars")
        base_scored = base_here
    det, det_scored = score_blocks(params, df, det_names, det_keys, every_block, store, "score exemplars (detector)")
    seconds = time.perf_counter() - t0
    table = _assemble(params, df, base, det, det_key if det_names else "")
    _atomic_parquet(table, out / "exemplar_rewards.parquet")
    write_checksum(out / "exemplar_rewards.parquet")  # training verifies it before reading (portraitgen/integrity.py)
    store.prune(set(base_keys) | set(det_keys))
    scored = base_scored | det_scored
    here = len(base_here) + len(det_scored)  # images scored in this process
    return {"exemplars": len(df), "exemplars_scored": len(scored), "exemplars_reused": len(df) - len(scored),
            "exemplar_reward_mean": float(table["total"].mean()) if len(table) else float("nan"),
            "score_images_per_second": here / seconds if here and seconds > 0 else None}


# ---------------------------------------------------------------------------------------------- stage
class _BaseModel:
    """The base policy with its text encoders, loaded on first use: the embeddings and the detector's
    generated images share one load, and a run with nothing to encode or generate loads nothing."""

    def __init__(self, params: Params):
        self.params = params
        self.policy: FlowPolicy | None = None
        self.loads = 0

    def __call__(self) -> FlowPolicy:
        if self.policy is None:
            m = self.params.model
            self.policy = load_policy(m.family, m.path, device="cuda" if torch.cuda.is_available() else "cpu")
            self.policy.freeze_all()
            self.loads += 1
        return self.policy

    def release(self) -> None:
        self.policy = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _bench_prompts_kept(params: Params) -> list[str] | None:
    """The bench prompts whose stored embeddings the training run's pruning must keep (the bench-only run
    shares the store); None when the suite cannot be read (then nothing is pruned)."""
    try:
        return bench_prompts(params)
    except PrecomputeError as exc:
        log.warning("embedding store: not pruned, as PortraitBench's prompts cannot be read (%s)", exc)
        return None


def run_bench_embeddings(params: Params, out_dir: str | Path) -> dict[str, Any]:
    """``--bench-only``: ``bench_prompt_embeddings.safetensors`` for PortraitBench's prompts and the empty
    prompt, from the shared per-prompt store (the base model is loaded only if a prompt is new to it).
    Writes nothing else and prunes nothing."""
    out = Path(out_dir)
    prompts = bench_prompts(params)  # a bad suite or subset fails here, before any model loads
    if not prompts:
        raise PrecomputeError("--bench-only: no PortraitBench prompt to embed (portraitgen.bench.suite cannot be "
                              "imported)")
    out = open_output(out)
    fingerprint = model_fingerprint(params.model.family, params.model.path)
    base = _BaseModel(params)
    t0 = time.perf_counter()
    emb = write_cache(prompts, out / BENCH_EMBEDDINGS, family=params.model.family, model_fingerprint=fingerprint,
                      store_dir=out / EMBEDDING_STORE, load_policy=base, prune=False)
    base.release()
    summary = {"bench_prompts": len(prompts), "cache_prompts": len(dict.fromkeys(prompts)), "prompts_encoded": emb.encoded,
               "prompts_reused": emb.reused, "embedding_seconds": time.perf_counter() - t0,
               "base_model_loads": base.loads, "path": str(emb.path)}
    log.info("precompute --bench-only: %d PortraitBench prompts (%s, subset %s): %d encoded, %d from the store -> %s",
             len(prompts), params.bench.suite, params.bench.subset, emb.encoded, emb.reused, emb.path)
    return summary


def run_precompute(params: Params, out_dir: str | Path, *, part: int | None = None, num_parts: int = 1,
                   merge_only: bool = False, bench_only: bool = False) -> dict[str, Any]:
    """The stage: one process, one part job (``part`` of ``num_parts``), the merge (``merge_only``), or the
    bench prompts' embeddings alone (``bench_only``, :func:`run_bench_embeddings`)."""
    out = Path(out_dir)
    if bench_only:
        if part is not None or merge_only or num_parts != 1:
            raise PrecomputeError("--bench-only embeds PortraitBench's prompts in one process: leave out --part, "
                                  "--num-parts and --merge-only")
        return run_bench_embeddings(params, out)
    parts = Parts.checked(part, num_parts, merge_only, error=PrecomputeError)
    out = open_output(out)
    plan = detector_plan(params, out)  # bad detector options fail before any model loads
    if parts.scattered:
        return score_part(params, out, part, num_parts, plan)

    training = training_prompts(params)  # a bad prompt source fails here, early
    df = (read_manifest(params.invert.manifest, error=PrecomputeError, nonempty=True)
          if Path(params.invert.manifest).is_file() else None)
    if df is None and (plan is not None or merge_only):
        why = f"{plan.used_by[0]}: training the detector" if plan is not None else "--merge-only"
        raise PrecomputeError(f"{why} needs the curated manifest, but {params.invert.manifest} is missing "
                              f"(run `portraitgen curate` first)")
    fingerprint = model_fingerprint(params.model.family, params.model.path)
    base = _BaseModel(params)
    keep = _bench_prompts_kept(params)
    summary: dict[str, Any] = {"prompts": len(training)}

    t0 = time.perf_counter()
    emb = write_cache(training, out / TRAINING_EMBEDDINGS, family=params.model.family, model_fingerprint=fingerprint,
                      store_dir=out / EMBEDDING_STORE, load_policy=base, prune=keep is not None, keep=keep or ())
    summary.update(cache_prompts=len(dict.fromkeys(training)), prompts_encoded=emb.encoded, prompts_reused=emb.reused,
                   embedding_seconds=time.perf_counter() - t0,
                   encode_prompts_per_second=(emb.encoded / emb.seconds_encoding
                                              if emb.encoded and emb.seconds_encoding > 0 else None))

    det_key = ""
    if plan is not None:
        det = ensure_detector(plan, params, df, fingerprint, base)
        det_key = det["key"]
        summary.update(_detector_metrics(det, plan))
    summary["base_model_loads"] = base.loads
    base.release()

    if df is not None:
        summary.update(score_exemplars(params, out, df, plan, det_key, num_parts if merge_only else None))
    else:
        log.warning("no curated manifest at %s: exemplar rewards skipped", params.invert.manifest)
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2, default=float))

    with tracked(params.tracking, "precompute",
                 params={"reward.components": json.dumps(params.reward.components),
                         "precompute.num_parts": num_parts, "precompute.prompts": len(training)},
                 tags={"portraitgen.model_family": params.model.family}) as tracker:
        tracker.log_metrics({k: v for k, v in summary.items()
                             if isinstance(v, (int, float)) and v is not None and np.isfinite(v)}, 0)
        if (out / "exemplar_rewards.parquet").is_file():
            tracker.log_artifact(out / "exemplar_rewards.parquet")
        if plan is not None:
            tracker.log_artifact(plan.path / "report.json", artifact_path="detector")
        tracker.log_artifact(out / "metrics.json")
    return summary

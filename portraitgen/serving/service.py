"""The served rewards and the dynamic batcher (the HTTP layer is :mod:`.server`)."""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..rewards import RewardError, build_reward
from ..rewards.remote import PROTOCOL, SERVER_KEY, component_config_hash, floats_to_json, scoring_options

log = logging.getLogger(__name__)


@dataclass
class ServedReward:
    name: str
    options: dict[str, Any]  # scoring options (no `server`)
    config_hash: str
    fn: Any


@dataclass
class _Pending:
    key: tuple  # (config hashes, H, W): requests with equal keys can share a batch
    images: torch.Tensor
    prompts: list[str]
    meta: list[dict]
    future: Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


class RewardService:
    """The loaded rewards and the batching worker (no HTTP here: :func:`create_app` adds it)."""

    def __init__(self, rewards: Sequence[ServedReward], *, max_batch: int = 32, max_wait_s: float = 0.05,
                 reward_config_hash: str = ""):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch}, {max_wait_s}")
        self.by_hash = {r.config_hash: r for r in rewards}
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.reward_config_hash = reward_config_hash
        self._pending: list[_Pending] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Histograms: images per scored batch and requests per scored batch.
        self.batch_images: collections.Counter[int] = collections.Counter()
        self.batch_requests: collections.Counter[int] = collections.Counter()
        self.totals = {"images": 0, "requests": 0, "batches": 0, "errors": 0, "compute_s": 0.0}
        self.started = time.time()
        self.last_request = time.monotonic()  # start, then the last request's arrival (--stop-when-idle)
        self._last_report = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="reward-server-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Score what is queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests
    def resolve(self, components: Sequence[dict]) -> list[ServedReward]:
        """The served rewards a request names; :class:`LookupError` names what is missing or differs."""
        out = []
        for c in components:
            name, want = str(c.get("name")), str(c.get("config_hash"))
            if want in self.by_hash and self.by_hash[want].name == name:
                out.append(self.by_hash[want])
                continue
            have = {r.config_hash: r.options for r in self.by_hash.values() if r.name == name}
            if not have:
                raise LookupError(f"reward {name!r} is not served here (served: "
                                  f"{', '.join(sorted({r.name for r in self.by_hash.values()}))})")
            raise LookupError(f"reward {name!r}: the client's config hash {want} differs from this server's "
                              f"{', '.join(have)} (options {list(have.values())}): the reward config in the "
                              "client's params differs from the server's; restart the server with the same params")
        return out

    def submit(self, rewards: Sequence[ServedReward], images: torch.Tensor, prompts: list[str],
               meta: list[dict]) -> Future:
        fut: Future = Future()
        req = _Pending((tuple(r.config_hash for r in rewards), *images.shape[2:]), images, prompts, meta, fut)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the reward server is shutting down")
            self._pending.append(req)
            self.last_request = req.arrived
            self._cond.notify_all()
        return fut

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for requests; gather those sharing the first one's key until the batch is full or the
        first has waited ``max_wait_s``."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait(1.0)
            first = self._pending[0]
            deadline = first.arrived + self.max_wait_s
            while True:
                same = [r for r in self._pending if r.key == first.key]
                if sum(r.n for r in same) >= self.max_batch or self._stopping:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, n = [], 0
            for r in same:
                if batch and n + r.n > self.max_batch:
                    continue
                batch.append(r)
                n += r.n
            for r in batch:
                self._pending.remove(r)
            return batch

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)
            self._maybe_report()

    def _run(self, batch: list[_Pending]) -> None:
        t0 = time.perf_counter()
        try:
            results = self._score([self.by_hash[h] for h in batch[0].key[0]], batch)
        except Exception as exc:  # noqa: BLE001 — handed to the clients, never swallowed
            if len(batch) > 1:  # one bad request must not fail the others: score each alone
                for r in batch:
                    self._run([r])
                return
            self.totals["errors"] += 1
            if not isinstance(exc, RewardError):
                log.exception("scoring failed")
            batch[0].future.set_exception(exc)
            return
        dt = time.perf_counter() - t0
        n = sum(r.n for r in batch)
        self.batch_images[n] += 1
        self.batch_requests[len(batch)] += 1
        self.totals["images"] += n
        self.totals["requests"] += len(batch)
        self.totals["batches"] += 1
        self.totals["compute_s"] += dt
        now = time.monotonic()
        for r, res in zip(batch, results):
            r.future.set_result({"results": res, "batch": {"images": n, "requests": len(batch), "compute_ms": 1e3 * dt,
                                                           "queue_ms": 1e3 * (now - r.arrived) - 1e3 * dt}})
        log.debug("scored a batch of %d images (%d requests) in %.1f ms", n, len(batch), 1e3 * dt)

    @staticmethod
    def _score(rewards: Sequence[ServedReward], batch: list[_Pending]) -> list[dict[str, Any]]:
        images = batch[0].images if len(batch) == 1 else torch.cat([r.images for r in batch])
        prompts = [p for r in batch for p in r.prompts]
        meta = [m for r in batch for m in r.meta]
        bounds = np.cumsum([0, *(r.n for r in batch)])
        out: list[dict[str, Any]] = [{} for _ in batch]
        for rw in rewards:
            fn = rw.fn
            raw = fn.parts(images, prompts, meta) if callable(getattr(fn, "parts", None)) else \
                {"score": fn(images, prompts, meta)}
            arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in raw.items()}
            for k, v in arrays.items():
                if v.shape[0] != len(prompts):
                    raise RewardError(f"reward {rw.name!r} returned {v.shape[0]} {k} values for {len(prompts)} images")
            # Reasons only for the images without a finite score (a reward may keep older entries).
            finite = np.isfinite(arrays["score"]) if "score" in arrays else np.ones(len(prompts), bool)
            errors = {i: e for i, e in dict(getattr(fn, "last_errors", None) or {}).items()
                      if 0 <= int(i) < len(prompts) and not finite[int(i)]}
            for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                out[j][rw.name] = {"config_hash": rw.config_hash,
                                   "parts": {k: floats_to_json(v[a:b]) for k, v in arrays.items()},
                                   "errors": {str(i - a): str(e) for i, e in errors.items() if a <= i < b}}
        return out

    def _maybe_report(self, every_s: float = 60.0) -> None:
        if time.monotonic() - self._last_report >= every_s:
            self._last_report = time.monotonic()
            t = self.totals
            log.info("served %d images in %d batches (mean %.1f images, %d requests; %.1f s scoring)", t["images"],
                     t["batches"], t["images"] / max(t["batches"], 1), t["requests"], t["compute_s"])

    def info(self) -> dict[str, Any]:
        comps: dict[str, list[dict[str, Any]]] = {}
        for r in self.by_hash.values():
            comps.setdefault(r.name, []).append({"config_hash": r.config_hash, "options": r.options})
        with self._cond:
            queued = sum(r.n for r in self._pending)
        return {"protocol": PROTOCOL, "components": comps, "reward_config_hash": self.reward_config_hash,
                "max_batch": self.max_batch, "max_wait_ms": 1e3 * self.max_wait_s,
                "histogram": {"batch_images": {str(k): v for k, v in sorted(self.batch_images.items())},
                              "batch_requests": {str(k): v for k, v in sorted(self.batch_requests.items())}},
                "totals": dict(self.totals), "queued_images": queued, "uptime_s": time.time() - self.started,
                "pid": os.getpid()}


# ------------------------------------------------------------------------------------------ loading
def served_components(params, names: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{name: {config hash: scoring options}}`` of the components to serve (see :mod:`portraitgen.serving`)."""
    tables = [(params.reward.components, params.reward.options)]
    if getattr(params, "bench", None) is not None:
        tables.append((params.bench.reward.components, params.bench.reward.options))
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for comps, opts in tables:
        for name in comps:
            o = dict(opts.get(name) or {})
            wanted = (name in names) if names else (SERVER_KEY in o)
            if wanted:
                found.setdefault(name, {})[component_config_hash(name, o)] = scoring_options(o)
    if names:
        missing = sorted(set(names) - set(found))
        if missing:
            raise RewardError(f"--components: {missing[0]!r} is not in reward.components or bench.reward.components")
    elif not found:  # no component names a server: serve the training rewards
        found = {n: {component_config_hash(n, params.reward.options.get(n)): scoring_options(params.reward.options.get(n))}
                 for n in params.reward.components}
    return found


def load_rewards(params, names: Sequence[str] | None = None) -> list[ServedReward]:
    out = []
    for name, variants in served_components(params, names).items():
        for h, opts in variants.items():
            t0 = time.perf_counter()
            out.append(ServedReward(name, opts, h, build_reward(name, **opts)))
            log.info("loaded reward %s (config %s) in %.1f s", name, h, time.perf_counter() - t0)
    return out



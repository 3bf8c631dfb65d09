"""The ``remote`` reward backend: score a component through a reward server (``portraitgen reward-server``).

A component is remote when its options name a server::

    reward:
      components: {omni_vlm: 1.0, ai_portrait_classic: 0.5}
      options:
        omni_vlm:
          model_path: /models/Qwen2.5-VL-7B-Instruct
          server: http://gpu07:8470            # or a mapping, see ServerSettings
          # server: {url: http://gpu07:8470, wait_s: 900, encoding: png}
          # server: {address_file: results/reward_server/address.json}   # written by the server job

The server loads the component with the *same* options (minus ``server``) from the same params file;
the trainer never loads the model. :class:`~portraitgen.rewards.RewardSet` then treats a remote component
like a local one: the server returns the raw score and sub-scores (NaN where an image could not be
scored, with the reason), and normalisation, weights and ``on_invalid`` are applied here, so the
totals are the in-process ones. All remote components of one set on one server go in one request per
batch (:class:`RemoteGroup`).

Failures never pass silently: a server that cannot be reached (not up yet, restarting, killed) is
retried with exponential backoff for at most ``wait_s`` seconds, then :class:`RewardServerError` names
the URL — the trainer stops there, before the batch is used, so its last checkpoint stays the state to
resume from. A server that serves the component with other options (its config hash differs) is
refused at once, with both hashes and options in the message.

The wire format (shared with :mod:`portraitgen.reward_server`): ``POST /score`` with body
``<4-byte big-endian header length><JSON header><image payload>``; the header holds the components
(name + config hash), prompts, meta, the encoding and the shape; the payload is ``uint8`` HWC pixels
(default: what every model-backed reward sees, as a saved PNG would hold), ``float32`` CHW values (exact
for rewards that read float pixels, e.g. ``brightness``), or concatenated PNG files (``png``). The reply
is JSON: per component its parts (float64 as JSON numbers, ``null`` for NaN) and per-image errors.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

# What a component's options say about servers belongs to the params (portraitgen/config.py).
from ..config import SERVER_KEY, scoring_options
from .registry import PartsReward, RewardError, register_remote

log = logging.getLogger(__name__)

ENCODINGS = ("uint8", "float32", "png")
PROTOCOL = 1


class RewardServerError(RewardError):
    """The reward server could not be reached within the wait budget, or refused a request."""


# ------------------------------------------------------------------------------------------ config
def component_config_hash(name: str, options: Mapping[str, Any] | None) -> str:
    """The hash a client and a server compare: the reward's name and its scoring options."""
    text = json.dumps({"reward": name, "options": scoring_options(options)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ServerSettings:
    """``reward.options.<name>.server``: a URL string, or a mapping of these keys."""

    url: str = ""  # http://host:port
    address_file: str = ""  # or: a JSON file {"url": ...} the server writes once it is ready (SLURM recipe)
    timeout_s: float = 600.0  # one request, queueing on the server included
    wait_s: float = 300.0  # how long an unreachable server is retried (and waited for at start) before failing
    backoff_s: float = 0.5  # first pause between attempts; doubles up to backoff_max_s
    backoff_max_s: float = 15.0
    encoding: str = "uint8"  # uint8 | float32 | png

    @classmethod
    def parse(cls, name: str, spec: Any) -> "ServerSettings":
        where = f"reward.options.{name}.{SERVER_KEY}"
        if isinstance(spec, str):
            spec = {"url": spec}
        if not isinstance(spec, Mapping):
            raise RewardError(f"{where}: expected a URL or a mapping (url, address_file, timeout_s, wait_s, "
                              f"backoff_s, backoff_max_s, encoding), got {spec!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - known)
        if unknown:
            raise RewardError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            s = cls(**{k: (str(v) if k in ("url", "address_file", "encoding") else float(v)) for k, v in spec.items()})
        except (TypeError, ValueError) as exc:
            raise RewardError(f"{where}: {exc}") from None
        if bool(s.url) == bool(s.address_file):
            raise RewardError(f"{where}: give exactly one of url and address_file")
        if s.url and not s.url.startswith(("http://", "https://")):
            raise RewardError(f"{where}.url: expected http://host:port, got {s.url!r}")
        if s.encoding not in ENCODINGS:
            raise RewardError(f"{where}.encoding: expected one of {', '.join(ENCODINGS)}, got {s.encoding!r}")
        if not (s.timeout_s > 0 and s.wait_s >= 0 and s.backoff_s > 0 and s.backoff_max_s >= s.backoff_s):
            raise RewardError(f"{where}: timeout_s and backoff_s must be > 0, wait_s >= 0, "
                              f"backoff_max_s >= backoff_s; got {spec}")
        return s

    @property
    def where(self) -> str:
        return self.url or f"the address in {self.address_file}"


# ------------------------------------------------------------------------------------------ wire format
def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"meta value {o!r} ({type(o).__name__}) cannot be sent to a reward server")


def uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """:func:`~portraitgen.rewards.simple.to_uint8_hwc`, bit for bit (float32 multiply, round half to even),
    computed in torch before the transpose: several times faster on large batches."""
    x = images.detach().to("cpu", torch.float32).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def encode_images(images: torch.Tensor, encoding: str) -> tuple[dict[str, Any], bytes]:
    """[B, 3, H, W] in [0, 1] -> (header fields, payload bytes)."""
    b, _, h, w = images.shape
    if encoding == "float32":
        arr = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return {"encoding": "float32", "shape": [b, 3, h, w]}, arr.astype("<f4", copy=False).tobytes()
    pixels = uint8_hwc(images)
    if encoding == "uint8":
        return {"encoding": "uint8", "shape": [b, h, w, 3]}, pixels.tobytes()
    from PIL import Image

    files = []
    for a in pixels:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=1)
        files.append(buf.getvalue())
    return {"encoding": "png", "shape": [b, h, w, 3], "png_sizes": [len(f) for f in files]}, b"".join(files)


def decode_images(header: Mapping[str, Any], payload: bytes) -> torch.Tensor:
    """The inverse of :func:`encode_images`: a float32 [B, 3, H, W] tensor in [0, 1]."""
    enc, shape = header.get("encoding"), [int(x) for x in header.get("shape", [])]
    if enc not in ENCODINGS or len(shape) != 4:
        raise ValueError(f"encoding {enc!r} / shape {shape}: expected one of {ENCODINGS} and 4 dimensions")
    if enc == "float32":
        arr = np.frombuffer(payload, dtype="<f4")
        if arr.size != int(np.prod(shape)) or shape[1] != 3:
            raise ValueError(f"float32 payload of {arr.size} values does not match shape {shape}")
        return torch.from_numpy(arr.reshape(shape).astype(np.float32))
    if enc == "uint8":
        arr = np.frombuffer(payload, dtype=np.uint8)
        if arr.size != int(np.prod(shape)) or shape[3] != 3:
            raise ValueError(f"uint8 payload of {arr.size} bytes does not match shape {shape}")
        pixels = arr.reshape(shape)
    else:
        from PIL import Image

        sizes = [int(s) for s in header.get("png_sizes", [])]
        if len(sizes) != shape[0] or sum(sizes) != len(payload):
            raise ValueError(f"png payload of {len(payload)} bytes does not match png_sizes {sizes[:8]}")
        offsets = np.cumsum([0, *sizes])
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(payload[a:b])).convert("RGB"))
                           for a, b in zip(offsets[:-1], offsets[1:])])
        if list(pixels.shape) != shape:
            raise ValueError(f"png images of shape {list(pixels.shape)} do not match shape {shape}")
    return torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).float().div_(255.0)


def pack_request(header: Mapping[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, default=_json_default).encode()
    return struct.pack(">I", len(head)) + head + payload


def unpack_request(body: bytes) -> tuple[dict[str, Any], bytes]:
    if len(body) < 4:
        raise ValueError("empty request body")
    (n,) = struct.unpack(">I", body[:4])
    if n > len(body) - 4:
        raise ValueError(f"header length {n} exceeds the body ({len(body)} bytes)")
    return json.loads(body[4:4 + n]), body[4 + n:]


def floats_to_json(values: np.ndarray) -> list[float | None]:
    """float64 values as JSON numbers (exact round trip), NaN/inf as null (both are non-finite scores)."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def floats_from_json(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


# ------------------------------------------------------------------------------------------ client
class RemoteClient:
    """HTTP to one reward server: bounded retries with exponential backoff, errors naming the URL."""

    RETRY_STATUS = (408, 429, 502, 503, 504)  # transient: the server is busy, restarting or shutting down

    def __init__(self, settings: ServerSettings):
        import requests

        self.settings = settings
        self._session = requests.Session()
        self._url = settings.url
        self.info: dict[str, Any] | None = None

    @property
    def url(self) -> str:
        return self._url or self.settings.where

    def _resolve_url(self) -> str:
        if self.settings.url:
            return self.settings.url
        path = Path(self.settings.address_file)
        try:
            url = str(json.loads(path.read_text())["url"])
        except FileNotFoundError:
            raise ConnectionError(f"{path} does not exist yet (the reward server writes it once it is ready)")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConnectionError(f"{path}: not a reward-server address file ({exc})")
        self._url = url
        return url

    def request(self, method: str, path: str, *, data: bytes | None = None, what: str = "request") -> dict:
        """One call, retried while the server is unreachable for at most ``wait_s`` seconds."""
        import requests

        s = self.settings
        start = time.monotonic()
        delay, attempt, last = s.backoff_s, 0, ""
        while True:
            attempt += 1
            try:
                url = self._resolve_url()
                resp = self._session.request(method, url.rstrip("/") + path, data=data, timeout=(10.0, s.timeout_s),
                                             headers={"Content-Type": "application/octet-stream"} if data else None)
                if resp.status_code == 200:
                    return resp.json()
                detail = _detail(resp)
                if resp.status_code not in self.RETRY_STATUS:
                    raise RewardServerError(f"reward server {url} refused the {what} (HTTP {resp.status_code}): {detail}")
                last = f"HTTP {resp.status_code}: {detail}"
            except (requests.ConnectionError, requests.Timeout, ConnectionError) as exc:
                last = f"{type(exc).__name__}: {str(exc)[:300]}"
            elapsed = time.monotonic() - start
            if elapsed + delay > s.wait_s:
                raise RewardServerError(
                    f"reward server {self.url} is unreachable: gave up after {attempt} attempts in {elapsed:.1f} s "
                    f"(wait_s={s.wait_s:g}); last error: {last}. Start it with `portraitgen reward-server "
                    f"--params <params>` (docs/reward-server.md) or raise reward.options.<name>.server.wait_s")
            log.warning("reward server %s: %s; retrying in %.1f s (%.0f of %g s waited)", self.url, last, delay,
                        elapsed, s.wait_s)
            time.sleep(delay)
            delay = min(delay * 2.0, s.backoff_max_s)

    def check(self, expected: Mapping[str, str], options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Fetch ``/info`` and refuse a server that lacks a component or serves it with other options
        (``expected``: name -> config hash; ``options``: name -> this side's options, for the message)."""
        info = self.request("GET", "/info", what="info request")
        served = info.get("components", {})
        for name, want in expected.items():
            have = [e.get("config_hash") for e in served.get(name, [])]
            if not have:
                raise RewardServerError(f"reward server {self.url} does not serve reward {name!r} (it serves: "
                                        f"{', '.join(sorted(served)) or 'nothing'}); start it with the same params")
            if want not in have:
                opts = [e.get("options") for e in served[name]]
                raise RewardServerError(
                    f"reward server {self.url} serves reward {name!r} with config hash {', '.join(have)} "
                    f"(options {opts}) but these params give {want} (options "
                    f"{scoring_options((options or {}).get(name))}): its reward config differs from params; "
                    "restart the server with the same params file")
        self.info = info
        return info


def _detail(resp) -> str:
    try:
        body = resp.json()
        return str(body.get("detail", body))[:1000]
    except ValueError:
        return resp.text[:500]


class RemoteGroup:
    """The remote components of one :class:`RewardSet` on one server: one request scores all of them.

    RewardSet asks each component in turn for the same batch; the first asks the server for every
    component of the group and the others take their share from that reply (matched by the identity of
    the images tensor, its version counter, prompts and meta — any other batch makes a new request).
    """

    def __init__(self, settings: ServerSettings, components: Mapping[str, Mapping[str, Any]]):
        self.settings = settings
        self.hashes = {n: component_config_hash(n, o) for n, o in components.items()}
        self.client = RemoteClient(settings)
        self._lock = threading.Lock()
        self._memo: tuple | None = None  # (images, version, prompts, meta, results, names not yet handed out)
        self.last_batch: dict[str, Any] = {}
        self.client.check(self.hashes, components)  # waits for a starting server; refuses a mismatched one now
        log.info("rewards %s scored by the reward server at %s", ", ".join(self.hashes), self.client.url)

    def parts(self, name: str, images: torch.Tensor, prompts: Sequence[str], meta: Sequence[dict]):
        with self._lock:
            m = self._memo
            meta_text = json.dumps(list(meta), sort_keys=True, default=_json_default)
            if (m is not None and m[0] is images and m[1] == images._version and m[2] == list(prompts)
                    and m[3] == meta_text and name in m[5]):
                m[5].discard(name)
                return m[4][name]
            results = self._score(images, prompts, meta)
            self._memo = (images, images._version, list(prompts), meta_text, results, set(self.hashes) - {name})
            return results[name]

    def _score(self, images, prompts, meta) -> dict[str, tuple[dict[str, np.ndarray], dict[int, str]]]:
        fields, payload = encode_images(images, self.settings.encoding)
        header = {"protocol": PROTOCOL, "components": [{"name": n, "config_hash": h} for n, h in self.hashes.items()],
                  "prompts": list(prompts), "meta": list(meta), **fields}
        reply = self.client.request("POST", "/score", data=pack_request(header, payload), what="score request")
        self.last_batch = reply.get("batch", {})
        out = {}
        for name, want in self.hashes.items():
            got = reply.get("results", {}).get(name)
            if got is None or got.get("config_hash") != want:  # e.g. a server restarted with other params
                raise RewardServerError(f"reward server {self.client.url} answered reward {name!r} with config hash "
                                        f"{None if got is None else got.get('config_hash')}, expected {want}")
            parts = {k: floats_from_json(v) for k, v in got["parts"].items()}
            out[name] = (parts, {int(i): str(r) for i, r in got.get("errors", {}).items()})
        return out


class RemoteReward(PartsReward):
    """One component scored by a :class:`RemoteGroup`; ``last_errors`` carries the server's reasons."""

    def __init__(self, name: str, group: RemoteGroup):
        self.name, self.group = name, group
        self.last_errors = {}

    def parts(self, images, prompts, meta):
        parts, errors = self.group.parts(self.name, images, prompts, meta)
        self.last_errors = errors
        return dict(parts)


@register_remote
def remote_rewards(names: Sequence[str], options: Mapping[str, Mapping[str, Any] | None]) -> dict[str, RemoteReward]:
    """The components among ``names`` whose options name a server, as :class:`RemoteReward` (one group per
    server). Components without a ``server`` option are not in the result (they are built in process)."""
    by_server: dict[ServerSettings, dict[str, Mapping[str, Any]]] = {}
    for name in names:
        opts = dict(options.get(name) or {})
        if SERVER_KEY in opts:
            by_server.setdefault(ServerSettings.parse(name, opts[SERVER_KEY]), {})[name] = opts
    out: dict[str, RemoteReward] = {}
    for settings, comps in by_server.items():
        group = RemoteGroup(settings, comps)
        out.update({n: RemoteReward(n, group) for n in comps})
    return out

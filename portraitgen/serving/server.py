"""The HTTP layer (FastAPI + uvicorn) over a :class:`.service.RewardService`, and the ``reward-server`` verb."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from ..io import atomic_write_text
from ..rewards import RewardError
from ..rewards.remote import PROTOCOL, SERVER_KEY, ServerSettings, decode_images, unpack_request
from .service import RewardService, load_rewards

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ HTTP
def create_app(service: RewardService):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.stop()  # after uvicorn has finished the requests in flight

    app = FastAPI(title="PortraitGen reward server", lifespan=lifespan)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "components": sorted({r.name for r in service.by_hash.values()})}

    @app.get("/info")
    def info() -> dict:
        return service.info()

    def parse(body: bytes):
        header, payload = unpack_request(body)
        if header.get("protocol") != PROTOCOL:
            raise ValueError(f"protocol {header.get('protocol')!r}; this server speaks {PROTOCOL}")
        images = decode_images(header, payload)
        prompts, meta = list(header.get("prompts", [])), list(header.get("meta", []))
        if not (len(prompts) == len(meta) == images.shape[0]):
            raise ValueError(f"{images.shape[0]} images, {len(prompts)} prompts and {len(meta)} meta entries")
        return header, images, prompts, meta

    @app.post("/score")
    async def score(request: Request) -> dict:
        body = await request.body()
        try:
            header, images, prompts, meta = await run_in_threadpool(parse, body)
        except (ValueError, KeyError, TypeError) as exc:
            raise HTTPException(400, f"bad score request: {exc}") from None
        try:
            rewards = service.resolve(header.get("components", []))
        except LookupError as exc:
            raise HTTPException(409, str(exc)) from None
        try:
            fut = service.submit(rewards, images, prompts, meta)
        except RuntimeError as exc:
            raise HTTPException(503, str(exc)) from None
        try:
            return await asyncio.wrap_future(fut)
        except RewardError as exc:
            raise HTTPException(422, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 — a reward's bug: the client stops with this message
            raise HTTPException(500, f"{type(exc).__name__}: {exc}") from None

    return app


def default_address(params) -> tuple[str, int]:
    """Host and port of the first ``server`` URL in params (127.0.0.1:8470 when none is given)."""
    from urllib.parse import urlparse

    for name, opts in [*params.reward.options.items(), *params.bench.reward.options.items()]:
        spec = (opts or {}).get(SERVER_KEY)
        if spec:
            s = ServerSettings.parse(name, spec)
            if s.url:
                u = urlparse(s.url)
                return u.hostname or "127.0.0.1", u.port or 80
    return "127.0.0.1", 8470


def _write_address(path: Path, url: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"url": url, "pid": os.getpid(), "host": socket.gethostname()}) + "\n")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..config import load_params, reward_config_hash

    params = load_params(args.params)
    host, port = default_address(params)
    host = args.host or host
    port = args.port if args.port is not None else port
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    service = RewardService(load_rewards(params, args.components), max_batch=args.max_batch,
                            max_wait_s=args.max_wait_ms / 1e3, reward_config_hash=reward_config_hash(params))
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=args.graceful_timeout, access_log=False)
    server = _graceful_server(config)
    outcome: dict[str, int] = {}
    threading.Thread(target=_supervise, args=(server, service, args, host, outcome), daemon=True,
                     name="reward-server-supervisor").start()
    server.run()  # returns after SIGTERM/SIGINT or a supervisor's should_exit, requests in flight finished
    child = outcome.get("child")
    if isinstance(child, subprocess.Popen) and child.poll() is None:  # stopped by a signal: stop the command too
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
    if args.address_file:
        Path(args.address_file).unlink(missing_ok=True)
    if args.info_out:  # what was served: rewards, histograms, totals (the workflow rule's output)
        Path(args.info_out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.info_out, json.dumps(service.info(), indent=1) + "\n")
    log.info("reward server stopped (%d images in %d batches)", service.totals["images"], service.totals["batches"])
    if not server.started:
        raise SystemExit(f"reward server: could not listen on {host}:{port} (in use? see the log above)")
    if args.serve_command:
        return int(outcome.get("rc", 1))
    return 0


def _graceful_server_class():
    import contextlib
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, except that after a graceful stop on SIGTERM/SIGINT it returns (exit status 0,
        the address file removed) instead of re-raising the signal."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def _on_signal(self, sig, frame) -> None:
            log.info("%s: finishing the requests in flight, then stopping", signal.Signals(sig).name)
            self.handle_exit(sig, frame)

    return GracefulServer


def _graceful_server(config):
    return _graceful_server_class()(config)


def _supervise(server, service: RewardService, args: argparse.Namespace, host: str, outcome: dict) -> None:
    """Once listening: write the address file, run the --serve-while command, or watch --stop-when-exists
    and --stop-when-idle."""
    started = time.time()
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    advertised = socket.gethostname() if host in ("0.0.0.0", "::") else host
    url = f"http://{advertised}:{port}"
    log.info("reward server ready at %s (max batch %d, max wait %g ms)", url, args.max_batch, args.max_wait_ms)
    if args.address_file:
        _write_address(Path(args.address_file), url)
    if args.serve_command:
        cmd = args.serve_command
        env = {**os.environ, "PORTRAITGEN_REWARD_SERVER_URL": url}
        log.info("running while serving: %s", " ".join(cmd))
        child = subprocess.Popen(cmd, env=env)
        outcome["child"] = child
        outcome["rc"] = child.wait()
        log.info("command exited with %d; stopping the reward server", outcome["rc"])
        server.should_exit = True
        return
    if not (args.stop_when_exists or args.stop_when_idle):
        return
    while not server.should_exit:
        # Only a file written after the start counts: a consumer's output left from an earlier run is
        # about to be replaced (Snakemake removes a job's outputs before it runs), not a signal to stop.
        done = [p for p in args.stop_when_exists or [] if Path(p).exists() and Path(p).stat().st_mtime >= started]
        idle = time.monotonic() - service.last_request
        if done:
            log.info("%s written; stopping the reward server", done[0])
            server.should_exit = True
        elif args.stop_when_idle and idle >= args.stop_when_idle:
            log.info("no request for %.0f s (--stop-when-idle); stopping the reward server", idle)
            server.should_exit = True
        time.sleep(1.0)



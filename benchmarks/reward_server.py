"""Rewards in process vs through the reward server: images/s and the latency the server adds per batch.

    .venv/bin/python benchmarks/reward_server.py                      # tiny VLM + classic rewards, 256 px, batch 8
    .venv/bin/python benchmarks/reward_server.py --rewards omni_vlm --vlm /models/Qwen2.5-VL-3B-Instruct
    .venv/bin/python benchmarks/reward_server.py --quick              # tiny VLM + one classic, 64 px (CI smoke run)

A real ``portraitgen reward-server`` process is started on loopback with the same reward options. For
each reward: ``inproc/<reward>`` scores batches in this process; ``server/<reward>`` scores the same
batches through the server (one client, requests back to back); ``added_ms/<reward>`` is the extra time
per batch (server minus in process: encoding, HTTP, decoding, the batcher's wait); ``overhead_ms/<reward>``
is the round trip minus the server's own scoring time for the batch (what the transport alone costs);
``clients<N>/<reward>`` is the images/s of N client threads at once, which the server batches together
(``mean_batch/<reward>``: images per scored batch). Without ``--vlm`` the VLM is the tiny random
Qwen2.5-VL (``builtin:tiny``): that measures the serving overhead, not a real judge. On a CPU the client
and the server share the same cores, so the server figures include that contention.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Report, images_at, machine  # noqa: E402

from portraitgen.launch import free_port  # noqa: E402

import torch  # noqa: E402

CLASSIC = ["omni_classic", "ai_portrait_classic", "jpeg_compressibility"]


def start_server(params: Path, port: int, log: Path, max_batch: int, max_wait_ms: float, threads: int):
    import requests

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "portraitgen", "reward-server", "--params", str(params),
                                 "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads),
                                 "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"reward server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"reward server not up in 300 s:\n{log.read_text()[-3000:]}")


def time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up (first-call caches, connection)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rewards", nargs="+", help="default: omni_vlm and the classic rewards (--quick: "
                                                 "omni_vlm and ai_portrait_classic)")
    ap.add_argument("--vlm", default="builtin:tiny", help="the VLM folder of omni_vlm (default: the tiny random one)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="images per client request")
    ap.add_argument("--repeats", type=int, default=5, help="timed batches per reward and mode")
    ap.add_argument("--clients", type=int, default=2, help="concurrent client threads for the batching figure")
    ap.add_argument("--encoding", default="uint8", choices=["uint8", "png", "float32"])
    ap.add_argument("--max-wait-ms", type=float, default=20.0, help="the server's batching wait (its default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process and of the server")
    ap.add_argument("--quick", action="store_true", help="64 px, batch 4, 2 repeats (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.resolution, args.batch, args.repeats = 64, 4, 2
    args.rewards = args.rewards or (["omni_vlm", "ai_portrait_classic"] if args.quick else ["omni_vlm", *CLASSIC])
    torch.set_num_threads(args.threads)

    from portraitgen.rewards import RewardSet

    options = {n: ({"model_path": args.vlm, "image_size": min(args.resolution, 448)} if n.endswith("_vlm") else {})
               for n in args.rewards}
    work = Path(tempfile.mkdtemp(prefix="reward-server-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    served = {n: {**o, "server": {"url": url, "encoding": args.encoding}} for n, o in options.items()}
    (work / "params.yaml").write_text(yaml.safe_dump({"reward": {"components": {n: 1.0 for n in args.rewards},
                                                                 "options": served}}))
    report = Report("reward_server", **machine("cpu"), resolution=args.resolution, batch=args.batch,
                    encoding=args.encoding, max_wait_ms=args.max_wait_ms)
    images = images_at(args.resolution, args.batch)
    prompts = ["a portrait photo of a person"] * args.batch
    server = start_server(work / "params.yaml", port, work / "server.log", max_batch=args.batch * args.clients,
                          max_wait_ms=args.max_wait_ms, threads=args.threads)
    try:
        import requests

        for name in args.rewards:
            local = RewardSet({name: 1.0}, options={name: options[name]})
            remote = RewardSet({name: 1.0}, options={name: served[name]})
            t_local = time_calls(lambda: local(images, prompts), args.repeats)
            group = remote.rewards[name].group
            round_trips, compute = [], []

            def one_remote():
                t0 = time.perf_counter()
                remote(images, prompts)
                round_trips.append(time.perf_counter() - t0)
                compute.append(group.last_batch.get("compute_ms", float("nan")) / 1e3)

            time_calls(one_remote, args.repeats)
            rt, cp = round_trips[1:], compute[1:]  # without the warm-up
            med_local, med_remote = float(np.median(t_local)), float(np.median(rt))
            report.figure(f"inproc/{name}", args.batch / med_local, "images/s")
            report.figure(f"server/{name}", args.batch / med_remote, "images/s")
            report.figure(f"added_ms/{name}", 1e3 * (med_remote - med_local), "ms/batch")
            report.figure(f"overhead_ms/{name}", 1e3 * float(np.median(np.array(rt) - np.array(cp))), "ms/batch")

            # N clients at once: the server scores their requests together.
            before = requests.get(url + "/info", timeout=10).json()["totals"]
            clients = [RewardSet({name: 1.0}, options={name: served[name]}) for _ in range(args.clients)]
            barrier = threading.Barrier(args.clients)

            def client(rs):
                barrier.wait()
                for _ in range(args.repeats):
                    rs(images, prompts)

            threads = [threading.Thread(target=client, args=(rs,)) for rs in clients]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            after = requests.get(url + "/info", timeout=10).json()["totals"]
            report.figure(f"clients{args.clients}/{name}", args.clients * args.repeats * args.batch / wall, "images/s")
            report.figure(f"mean_batch/{name}", (after["images"] - before["images"])
                          / max(after["batches"] - before["batches"], 1), "images")
        hist = requests.get(url + "/info", timeout=10).json()["histogram"]["batch_images"]
        print(f"\nserver batch-size histogram (images: batches): {hist}")
    finally:
        server.terminate()
        server.wait(60)
    report.table("Rewards in process vs through the reward server (loopback)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

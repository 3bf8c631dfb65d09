"""``portraitgen reward-server``: the configured rewards loaded once and served over HTTP.

A 7B-class VLM judge costs as much memory as the policy; loaded inside every training process it is
paid once per GPU, and beside SD3.5/FLUX it may not fit at all. The server loads each reward once (on
its own GPU) and any number of trainers, precompute and bench jobs score through it
(:mod:`portraitgen.rewards.remote`).

    portraitgen reward-server --params params.yaml                    # host/port from the params' server URL
    portraitgen reward-server --params params.yaml --address-file results/reward_server/address.json
    portraitgen reward-server --params params.yaml --serve-while -- portraitgen train --params params.yaml

Served: every component of ``reward`` and ``bench.reward`` whose options name a ``server`` (or those
given by ``--components``; all of ``reward.components`` when none names one), each built from its
options without the ``server`` key, exactly as in process.

Endpoints: ``GET /health`` (200 once every reward is loaded — the port opens only then), ``GET /info``
(the rewards, their config hashes, the params' reward config hash, the batching settings, the
batch-size histograms and totals), ``POST /score`` (wire format in :mod:`portraitgen.rewards.remote`).

Dynamic batching: requests for the same rewards and image size that arrive within ``--max-wait-ms`` of
the first waiting one are scored as one batch of up to ``--max-batch`` images (a larger request is
scored alone, whole). One worker thread runs the rewards, so the device holds one batch at a time.
SIGTERM/SIGINT: stop accepting, finish the requests in flight, exit 0.
"""
from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from .server import serve  # torch, the rewards and uvicorn load only when the verb runs

    args.serve_command = args.serve_command[1:] if args.serve_command[:1] == ["--"] else args.serve_command
    if bool(args.serve_command) != args.serve_while:
        raise SystemExit("portraitgen reward-server: --serve-while needs a command after -- (and a command "
                         f"needs --serve-while); got {args.serve_command or 'none'}")
    return serve(args)


def add_cli(sub) -> None:
    """Register the ``reward-server`` verb on the ``portraitgen`` parser."""
    rs = sub.add_parser("reward-server", help="load the configured rewards once and serve them over HTTP "
                                              "(trainers score through it: docs/reward-server.md)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rs.add_argument("--params", default="params.yaml", help="params file: the rewards and their options")
    rs.add_argument("--host", help="address to listen on (default: the host of the params' server URL, else "
                                   "127.0.0.1; 0.0.0.0 for every interface, e.g. on a cluster node)")
    rs.add_argument("--port", type=int, help="port (default: the params' server URL's, else 8470; 0 = any free)")
    rs.add_argument("--components", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated rewards to serve (default: those whose options name a server)")
    rs.add_argument("--max-batch", type=int, default=32, help="images per scored batch across requests")
    rs.add_argument("--max-wait-ms", type=float, default=20.0,
                    help="how long the first waiting request waits for others to share its batch")
    rs.add_argument("--address-file", help="write {\"url\": ...} here once listening (removed on exit): "
                                           "clients with server: {address_file: ...} find the server by it")
    rs.add_argument("--stop-when-exists", nargs="+", metavar="FILE",
                    help="shut down once any of these files is written after the start (e.g. the train job's "
                         "metrics.json)")
    rs.add_argument("--stop-when-idle", type=float, default=0.0, metavar="SECONDS",
                    help="shut down after this long without a request (0: never)")
    rs.add_argument("--info-out", metavar="FILE", help="on exit, write what was served (the /info reply) here")
    rs.add_argument("--graceful-timeout", type=float, default=60.0,
                    help="seconds SIGTERM waits for requests in flight")
    rs.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    rs.add_argument("--serve-while", action="store_true",
                    help="serve while COMMAND (after --) runs, then stop; exit with its status")
    rs.add_argument("serve_command", metavar="COMMAND", nargs=argparse.REMAINDER,
                    help="with --serve-while: -- COMMAND ARGS...")
    rs.set_defaults(func=_serve)

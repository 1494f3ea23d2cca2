"""``vera-serve``: a Ray Serve application around ``VeraSession`` that batches requests of different tasks.

    vera-serve GRAPH [--load NAME=PATH]... [--tasks-beside] [--host 127.0.0.1] [--port 8000]
               [--replicas N] [--max-batch 16] [--batch-wait-ms 5] [--max-body-mb 8] [--max-rows 256]
               [--max-tokens 16384] [--direct] [--address RAY_ADDRESS] [--bank PATH [--tenants FILE]]

HTTP API (JSON):
    POST /v1/run    {"task": NAME, "inputs": {...}} or {"tasks": [NAME per row], "inputs": {...}}
                    -> {"task": ..., "outputs": {name: nested list}}; header X-Vera-Batch: requests in its batch
    GET  /v1/tasks  -> {"tasks": [...], "default": NAME}
    PUT  /v1/tasks/NAME  (body: a native task file or .onnx_adapter) adds it to the bank (--bank) -> 201
    DELETE /v1/tasks/NAME  removes it; every replica serves (or stops serving) it within a second
With --tenants FILE ({"API_KEY": "tenant"}), every request but /v1/health carries Authorization: Bearer KEY
(401 otherwise) and a tenant lists, runs, adds and removes only its own tasks.
    GET  /v1/health -> {"status": "ok"}
    GET  /v1/stats  -> {"batches": {size: count}, "node": ID}  (of the replica that answers)
Errors are 4xx with {"error": "..."} (413 beyond the body, row or token limits; 503 with Retry-After when
the replica running a request dies); the server keeps serving. Needs ``pip install "vera-runtime[serve]"``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ._batching import DEFAULT_MAX_BODY, DEFAULT_MAX_ROWS, DEFAULT_MAX_TOKENS, Limits
from ._session import VeraSession


def application(graph: str, loads: dict[str, str], tasks_beside: bool, **options):
    """vera-serve's Ray Serve application, to run with ``serve.run`` in a Ray of your own: ``graph`` with
    ``loads`` (task name -> file) and the task files beside it; ``options``: max_batch, batch_wait_ms,
    limits (a ``Limits``), max_body, replicas, replica_cpus, and ingress (False: no ingress hop, Ray's 500
    when a replica dies). Imports Ray Serve."""
    from ._serve_app import application as bound

    return bound(graph, loads, tasks_beside, **options)


def _loads(entries: list[str] | None) -> dict[str, str]:
    loads = {}
    for entry in entries or ():
        name, _, path = entry.partition("=")
        if not name or not path:
            raise SystemExit(f"vera-serve: error: --load {entry!r}: expected NAME=PATH")
        loads[name] = path
    return loads


def _tenants(args) -> dict[str, str] | None:
    if not args.tenants:
        return None
    if not args.bank:
        raise ValueError("--tenants needs --bank: a tenant's tasks live in its namespace of the bank.")
    from ._tenants import read_tenants

    return read_tenants(args.tenants)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vera-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("graph")
    parser.add_argument("--load", action="append", metavar="NAME=PATH", help="load a task file (repeatable)")
    parser.add_argument("--tasks-beside", action="store_true", help="load every task file beside the graph")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--replica-cpus", type=float, default=0.0,
                        help="CPUs Ray reserves per replica (1 spreads replicas over a cluster's nodes)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests per batch at most")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY / (1 << 20))
    parser.add_argument("--max-rows", type=_positive, default=DEFAULT_MAX_ROWS, help="rows per request at most")
    parser.add_argument("--max-tokens", type=_positive, default=DEFAULT_MAX_TOKENS,
                        help="rows x sequence per request at most; also the most one run takes")
    parser.add_argument("--direct", action="store_true",
                        help="no ingress: replicas take HTTP themselves (one Ray call less per request, but a"
                             " request whose replica dies gets Ray's 500 instead of a 503)")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--bank", help="a task bank of GRAPH (vera-run bank create): tasks not loaded come from it,"
                                       " and PUT/DELETE /v1/tasks/NAME add and remove tasks while serving")
    parser.add_argument("--tenants", help='JSON {"API_KEY": "tenant", ...}: requests need a key, and each tenant'
                                          " sees only its own tasks in the bank (needs --bank)")
    parser.add_argument("--loopback", action="store_true",
                        help="with --address: a cluster whose nodes all run on this machine (over 127.0.0.1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    loads = _loads(args.load)
    try:  # a bad graph, task file, bank or tenants file fails here, in one line, before Ray starts
        session = VeraSession(args.graph, device="cpu", bank=args.bank)
        for name, path in loads.items():
            session.load_task(name, path)
        tenants = _tenants(args)
    except Exception as exc:
        print(f"vera-serve: error: {exc}", file=sys.stderr)
        return 1
    if args.loopback or not args.address:  # Ray's own traffic over 127.0.0.1 (its default is the LAN address)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not args.address:  # Serve replicas bind an internal gRPC server to [::] whatever we say: keep it authenticated
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ["RAY_AUTH_MODE"].lower() != "token":
            print("vera-serve: warning: RAY_AUTH_MODE is not 'token': Ray Serve's replica gRPC servers listen on all"
                  " interfaces without authentication.", file=sys.stderr)
    import ray
    from ray import serve


    # "local": a Ray of our own, never one that another program left running on this machine
    ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = application(
            os.path.abspath(args.graph), {k: os.path.abspath(v) for k, v in loads.items()}, args.tasks_beside,
            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, limits=Limits(args.max_rows, args.max_tokens),
            max_body=int(args.max_body_mb * (1 << 20)), replicas=args.replicas, replica_cpus=args.replica_cpus,
            ingress=not args.direct, bank=os.path.abspath(args.bank) if args.bank else None, tenants=tenants)
        serve.run(app, name="vera", route_prefix="/", blocking=False)
        print(f"vera-serve: serving {args.graph} on http://{args.host}:{args.port}/v1/run", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

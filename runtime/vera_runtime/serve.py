"""``vera-serve``: a Ray Serve application around ``VeraSession`` that batches requests of different tasks.

    vera-serve GRAPH [--load NAME=PATH]... [--tasks-beside] [--host 127.0.0.1] [--port 8000]
               [--replicas N] [--max-batch 16] [--batch-wait-ms 5] [--max-body-mb 8] [--address RAY_ADDRESS]

HTTP API (JSON):
    POST /v1/run    {"task": NAME, "inputs": {...}} or {"tasks": [NAME per row], "inputs": {...}}
                    -> {"task": ..., "outputs": {name: nested list}}; header X-Vera-Batch: requests in its batch
    GET  /v1/tasks  -> {"tasks": [...], "default": NAME}
    GET  /v1/health -> {"status": "ok"}
    GET  /v1/stats  -> {"batches": {size: count}, "node": ID}  (of the replica that answers)
Errors are 4xx with {"error": "..."}; the server keeps serving. Needs ``pip install "vera-runtime[serve]"``.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import threading

import ray
from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from ._batching import Request, RequestError, parse_request, run_batch
from ._errors import FeedError
from ._jsonio import parse_json
from ._session import VeraSession

_DEFAULT_MAX_BODY = 8 << 20


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class VeraServer:
    """One replica: a VeraSession with its tasks, and a batch queue shared by all requests."""

    def __init__(self, graph: str, loads: dict[str, str], tasks_beside: bool, max_batch: int, batch_wait_ms: float,
                 max_body: int = _DEFAULT_MAX_BODY) -> None:
        self.session = VeraSession(graph, device="cpu")
        if tasks_beside:
            self.session.load_tasks_beside()
        for name, path in loads.items():
            self.session.load_task(name, path)
        self.max_body = max_body
        self.batches: collections.Counter[int] = collections.Counter()
        self.node = ray.get_runtime_context().get_node_id()
        self._run.set_max_batch_size(max_batch)
        self._run.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    async def __call__(self, http: HttpRequest) -> JSONResponse:
        route = (http.method, http.url.path.rstrip("/"))
        if route == ("GET", "/v1/health"):
            return JSONResponse({"status": "ok", "node": self.node})
        if route == ("GET", "/v1/tasks"):
            return JSONResponse({"tasks": sorted(self.session.tasks), "default": self.session.default_task})
        if route == ("GET", "/v1/stats"):
            return JSONResponse({"batches": {str(k): v for k, v in sorted(self.batches.items())}, "node": self.node})
        if route == ("POST", "/v1/run"):
            return await self._handle_run(http)
        return _error(404, f"no route {http.method} {http.url.path}: use POST /v1/run, GET /v1/tasks or /v1/health.")

    async def _handle_run(self, http: HttpRequest) -> JSONResponse:
        try:
            request = parse_request(parse_json(await self._body(http), "the request body"), self.session)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except FeedError as exc:
            return _error(400, str(exc))
        outputs, batch = await self._run(request)
        body = {"task": request.asked, "outputs": {name: value.tolist() for name, value in outputs.items()}}
        return JSONResponse(body, headers={"X-Vera-Batch": str(batch), "X-Vera-Node": self.node})

    async def _body(self, http: HttpRequest) -> bytes:
        declared = http.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise RequestError(413, f"the body is {int(declared):,} bytes; this server takes up to {self.max_body:,}.")
        body = b""
        async for chunk in http.stream():
            body += chunk
            if len(body) > self.max_body:
                raise RequestError(413, f"the body is over {self.max_body:,} bytes; this server takes up to that.")
        return body

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _run(self, requests: list[Request]) -> list[tuple[dict, int]]:
        self.batches[len(requests)] += 1
        return [(outputs, len(requests)) for outputs in run_batch(requests, self.session)]


def _loads(entries: list[str] | None) -> dict[str, str]:
    loads = {}
    for entry in entries or ():
        name, _, path = entry.partition("=")
        if not name or not path:
            raise SystemExit(f"vera-serve: error: --load {entry!r}: expected NAME=PATH")
        loads[name] = path
    return loads


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
    parser.add_argument("--max-body-mb", type=float, default=_DEFAULT_MAX_BODY / (1 << 20))
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    loads = _loads(args.load)
    try:  # a bad graph or task file fails here, in one line, before Ray starts
        session = VeraSession(args.graph, device="cpu")
        for name, path in loads.items():
            session.load_task(name, path)
    except Exception as exc:
        print(f"vera-serve: error: {exc}", file=sys.stderr)
        return 1
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        options = {"num_replicas": args.replicas, "ray_actor_options": {"num_cpus": args.replica_cpus}}
        app = VeraServer.options(**options).bind(
            os.path.abspath(args.graph), {k: os.path.abspath(v) for k, v in loads.items()}, args.tasks_beside,
            args.max_batch, args.batch_wait_ms, int(args.max_body_mb * (1 << 20)))
        serve.run(app, name="vera", route_prefix="/", blocking=False)
        print(f"vera-serve: serving {args.graph} on http://{args.host}:{args.port}/v1/run", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

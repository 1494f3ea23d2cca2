"""The Ray Serve deployment behind ``vera-serve`` (imported once the CLI has set Ray's environment)."""

from __future__ import annotations

import collections

import onnxruntime as ort
import ray
from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from ._batching import DEFAULT_MAX_BODY, Request, RequestError, parse_request, run_batch
from ._errors import FeedError
from ._jsonio import parse_json
from ._session import VeraSession


def _options() -> ort.SessionOptions:
    """No spinning: ONNX Runtime's idle threads would otherwise spin on the cores the HTTP proxy needs."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# Serve admits 5 requests per replica by default: a batch could never grow past that, and the router backs
# off (hundreds of ms) when replicas are full. Batches need the queue: admit many, run them 16 at a time.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class VeraServer:
    """One replica: a VeraSession with its tasks, and a batch queue shared by all requests."""

    def __init__(self, graph: str, loads: dict[str, str], tasks_beside: bool, max_batch: int, batch_wait_ms: float,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self.session = VeraSession(graph, device="cpu", session_options=_options())
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
        path = http.url.path.removeprefix(http.scope.get("root_path", "")) or "/"  # under an app's route prefix
        route = (http.method, path.rstrip("/"))
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

"""The Ray Serve application behind ``vera-serve`` (imported once the CLI has set Ray's environment).

Two deployments: ``VeraIngress`` takes HTTP (body size bounded at the edge) and hands each request to a
``VeraModel`` replica, which checks it, batches it with others and runs it. The hop is what lets a
request whose replica dies under it get a 503 with ``Retry-After`` (Ray's own proxy answers 500), while
Ray's router sends new requests to the replicas still alive.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from ._bank import BankError
from ._batching import DEFAULT_MAX_BODY, Limits, Request, RequestError, parse_request, run_batch
from ._errors import FeedError, VeraError, printable
from ._jsonio import parse_json
from ._session import VeraSession
from ._taskfile import ADAPTER_SUFFIX, TASK_SUFFIX
from ._tenants import Tenants, namespaced

Reply = tuple[int, bytes, dict[str, str]]  # status, JSON body, headers
RETRY_AFTER_S = 1  # a replica that died is replaced, or its requests go to the others, within this


def _options() -> ort.SessionOptions:
    """No spinning: ONNX Runtime's idle threads would otherwise spin on the cores the HTTP proxy needs.
    No memory arena: ORT's CPU arena keeps the peak of every run for good (one 30,000-row request held
    4.5 GB); without it a run's memory goes back once the run ends, at no measurable cost per run."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: +200 MB after a 30,000-row
    request, measured). Elsewhere, a no-op."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _reply(status: int, body: dict, headers: dict[str, str] | None = None) -> Reply:
    return status, json.dumps(body, ensure_ascii=True, allow_nan=False).encode(), headers or {}


def _error(status: int, message: str) -> Reply:
    return _reply(status, {"error": message})


class ModelReplica:
    """One replica: a VeraSession with its tasks, and a batch queue shared by all requests."""

    def __init__(self, graph: str, loads: dict[str, str], tasks_beside: bool, max_batch: int, batch_wait_ms: float,
                 limits: Limits | None = None, max_body: int = DEFAULT_MAX_BODY, bank: str | None = None,
                 tenants: dict[str, str] | None = None) -> None:
        self.session = VeraSession(graph, device="cpu", session_options=_options(), bank=bank)
        if self.session.bank is not None:
            self.session.bank.prefetch()  # first uses then read the page cache, not the disk
        self.tenants = Tenants(tenants) if tenants else None
        if tasks_beside:
            self.session.load_tasks_beside()
        for name, path in loads.items():
            self.session.load_task(name, path)
        self.limits = limits or Limits()
        self.max_body = max_body
        self.batches: collections.Counter[int] = collections.Counter()
        self.node = ray.get_runtime_context().get_node_id()
        self.replica = ray.get_runtime_context().get_actor_id() or ""
        self._run.set_max_batch_size(max_batch)
        self._run.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    async def handle(self, method: str, path: str, body: bytes, authorization: str | None = None) -> Reply:
        route = (method, path.rstrip("/"))
        if route == ("GET", "/v1/health"):
            return _reply(200, {"status": "ok", "node": self.node})
        tenant = None
        if self.tenants is not None and (tenant := self.tenants.tenant(authorization)) is None:
            status, payload, _ = _error(401, "this server needs an API key: send Authorization: Bearer KEY.")
            return status, payload, {"WWW-Authenticate": "Bearer"}
        if route == ("GET", "/v1/tasks"):
            return _reply(200, self._listing(tenant))
        if route == ("GET", "/v1/stats"):
            return _reply(200, {"batches": {str(k): v for k, v in sorted(self.batches.items())}, "node": self.node})
        if route == ("POST", "/v1/run"):
            return await self._handle_run(body, tenant)
        if method in ("PUT", "DELETE") and route[1].startswith("/v1/tasks/"):
            return self._change_task(method, route[1].removeprefix("/v1/tasks/"), body, tenant)
        return _error(404, "no such route: use POST /v1/run, GET /v1/tasks, PUT or DELETE /v1/tasks/NAME,"
                           " GET /v1/health or /v1/stats.")

    def _listing(self, tenant: str | None) -> dict:
        bank = self.session.bank
        if tenant is not None:  # its own tasks only, under the names it gave them
            return {"tasks": [name.split("/", 1)[1] for name in bank.names(f"{tenant}/")]}
        banked = [name for name in bank.names() if "/" not in name] if bank is not None else []
        return {"tasks": sorted({*self.session.tasks, *banked}), "default": self.session.default_task}

    def _resolver(self, tenant: str | None):
        if tenant is None:
            return None  # loaded tasks, then the bank's
        bank = self.session.bank
        return lambda name: full if (full := namespaced(tenant, name)) and full in bank else None

    def _change_task(self, method: str, name: str, body: bytes, tenant: str | None) -> Reply:
        """PUT: add a task file (native or .onnx_adapter, the body) to the bank; DELETE: remove one."""
        bank = self.session.bank
        if bank is None:
            return _error(405, "this server has no task bank: start vera-serve with --bank PATH to add tasks.")
        full = namespaced(tenant, name)
        if full is None:
            return _error(400, f"'{printable(name, 64)}' is not a task name: use 1-64 letters, digits, '_' or '-'.")
        if method == "DELETE":
            if full not in bank:
                return _error(404, f"task '{name}' is not loaded; GET /v1/tasks lists them.")
            bank.remove(full)
            return _reply(200, {"removed": name})
        try:
            _add_from_bytes(bank, full, body)
        except VeraError as exc:
            return _error(400, f"the body is not a task file of this graph: {exc}")
        return _reply(201, {"added": name})

    async def _handle_run(self, body: bytes, tenant: str | None = None) -> Reply:
        try:
            decoded = parse_json(body, "the request body")
            if tenant is not None and isinstance(decoded, dict) and not (decoded.get("task") or decoded.get("tasks")):
                raise RequestError(400, "name your task: 'task' (or 'tasks', one per row); GET /v1/tasks lists them.")
            request = parse_request(decoded, self.session, self.limits, self._resolver(tenant))
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except FeedError as exc:
            return _error(400, str(exc))
        outputs, batch = await self._run(request)
        if isinstance(outputs, Exception):
            return _error(500, f"the run failed: {type(outputs).__name__}: {outputs}")
        bad = [name for name, value in outputs.items() if not np.isfinite(value).all()]
        if bad:
            return _error(422, f"output '{bad[0]}' holds NaN or Inf for these inputs, which JSON cannot carry"
                               " (e.g. a row whose attention_mask is all 0).")
        body = {"task": request.asked, "outputs": {name: value.tolist() for name, value in outputs.items()}}
        if request.tokens > self.limits.run_tokens:  # a large request: once answered,
            asyncio.get_running_loop().call_later(0.5, _release_memory)  # its memory goes back to the OS
        return _reply(200, body, {"X-Vera-Batch": str(batch), "X-Vera-Node": self.node, "X-Vera-Replica": self.replica})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _run(self, requests: list[Request]) -> list[tuple[dict | Exception, int]]:
        self.batches[len(requests)] += 1
        return [(outputs, len(requests)) for outputs in run_batch(requests, self.session, self.limits.run_tokens)]


def _add_from_bytes(bank, name: str, body: bytes) -> None:
    """Add a task file sent as bytes: written to a private scratch file named for its format (a safetensors
    file starts with its header's length and '{'; anything else is read as an .onnx_adapter), checked there."""
    suffix = TASK_SUFFIX if body[8:9] == b"{" else ADAPTER_SUFFIX
    with tempfile.TemporaryDirectory(prefix="vera-put-") as folder:
        path = Path(folder) / f"body{suffix}"
        path.write_bytes(body)
        try:
            bank.add(name, path)
        except VeraError as exc:  # name the body, not a scratch path
            raise BankError(str(exc).replace(str(path), "the request body")) from exc


class DirectReplica(ModelReplica):
    """A model replica that takes HTTP itself: no hop, but a request whose replica dies gets Ray's 500."""

    async def __call__(self, http: HttpRequest) -> Response:
        return await _serve_http(http, self.max_body, self.handle)


class Ingress:
    """HTTP in front of the model replicas: bounds the body, and turns a replica's death into a 503."""

    def __init__(self, model, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.model = model
        self.max_body = max_body

    async def __call__(self, http: HttpRequest) -> Response:
        return await _serve_http(http, self.max_body, self._forward)

    async def _forward(self, method: str, path: str, body: bytes, authorization: str | None) -> Reply:
        try:
            return await self.model.handle.remote(method, path, body, authorization)
        except (RayActorError, ActorUnavailableError):  # the replica died (or went away) under this request
            status, payload, _ = _error(503, "the replica running this request stopped; send it again.")
            return status, payload, {"Retry-After": str(RETRY_AFTER_S)}


async def _serve_http(http: HttpRequest, max_body: int, handle) -> Response:
    """Read an HTTP request (its path under the app's route prefix, its body within ``max_body``) and
    answer with what ``handle(method, path, body)`` replies."""
    path = http.url.path.removeprefix(http.scope.get("root_path", "")) or "/"
    try:
        body = await _body(http, max_body)
    except RequestError as exc:
        return _response(_error(exc.status, str(exc)))
    return _response(await handle(http.method, path, body, http.headers.get("authorization")))


async def _body(http: HttpRequest, max_body: int) -> bytes:
    """The request body, refused (413) past ``max_body`` bytes before it is all read."""
    declared = http.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise RequestError(413, f"the body is {int(declared):,} bytes; this server takes up to {max_body:,}.")
    chunks, size = [], 0
    async for chunk in http.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > max_body:
            raise RequestError(413, f"the body is over {max_body:,} bytes; this server takes up to that.")
    return b"".join(chunks)


def _response(reply: Reply) -> Response:
    status, payload, headers = reply
    return Response(payload, status_code=status, headers=headers, media_type="application/json")


# Serve admits 5 requests per replica by default: a batch could never grow past that, and the router backs
# off (hundreds of ms) when replicas are full. Batches need the queue: admit many, run them 16 at a time.
_REPLICA = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 256}
VeraModel = serve.deployment(name="VeraModel", **_REPLICA)(ModelReplica)
VeraDirect = serve.deployment(name="VeraDirect", **_REPLICA)(DirectReplica)
VeraIngress = serve.deployment(name="VeraIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1024)(Ingress)


def application(graph: str, loads: dict[str, str], tasks_beside: bool, *, max_batch: int = 16,
                batch_wait_ms: float = 5.0, limits: Limits | None = None, max_body: int = DEFAULT_MAX_BODY,
                replicas: int = 1, replica_cpus: float = 0.0, ingress: bool = True, bank: str | None = None,
                tenants: dict[str, str] | None = None):
    """The bound application: ``replicas`` model replicas behind one ingress (or, ``ingress=False``, model
    replicas taking HTTP themselves: one Ray call less per request, but Ray's 500 when a replica dies)."""
    options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": replica_cpus}}
    settings = (graph, loads, tasks_beside, max_batch, batch_wait_ms, limits, max_body, bank, tenants)
    if not ingress:
        return VeraDirect.options(**options).bind(*settings)
    return VeraIngress.bind(VeraModel.options(**options).bind(*settings), max_body)

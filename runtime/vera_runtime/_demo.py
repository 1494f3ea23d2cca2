"""``vera-run demo``: one classifier graph in a browser tab, every task as you type (runtime/js/demo/).

The server hands out a fixed set of files and nothing else: the page, ``vera.mjs``, onnxruntime-web and
the tokenizer library from ``runtime/js/node_modules`` (pinned by its package-lock.json), and the graph's
own files (the web-form graph, its native task files, ``tokenizer.json``, its labels) with a manifest that
lists them. No directory listing, no other path, GET and HEAD only; the page's Content-Security-Policy
lets it load nothing from any other origin.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ._contract import Contract
from ._errors import VeraError
from ._labels import labels_path, read_labels
from ._taskfile import TASK_SUFFIX, task_files_beside

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TYPES = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript", ".js": "text/javascript",
         ".css": "text/css", ".wasm": "application/wasm", ".json": "application/json"}
POLICY = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data:;"
          " connect-src 'self'; worker-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")
_ASSETS = {  # URL prefix -> folder under runtime/js, and a file that must be there
    "/demo/": ("demo", "index.html"),
    "/ort/": ("node_modules/onnxruntime-web/dist", "ort.wasm.min.mjs"),
    "/tokenizers/": ("node_modules/@huggingface/tokenizers/dist", "tokenizers.min.mjs"),
}


class DemoError(VeraError, ValueError):
    """A graph or a JavaScript folder the demo cannot serve; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DemoFiles:
    """Every file the server may send, by URL path, and the manifest the page reads."""

    routes: dict[str, Path]
    manifest: dict


def find_js(given: str | os.PathLike | None) -> Path:
    """The runtime/js folder: ``given``, $VERA_JS, the one beside this package (a checkout), ./runtime/js."""
    here = Path(__file__).resolve().parents[1] / "js"
    candidates = [Path(given)] if given else [Path(p) for p in (os.environ.get("VERA_JS"),) if p] + [here,
                                                                                                   Path("runtime/js")]
    for folder in candidates:
        if (folder / "vera.mjs").is_file():
            return folder.resolve()
    raise DemoError(
        f"no runtime/js folder with vera.mjs at {', '.join(map(str, candidates))}: give the repository's runtime/js"
        " with --js (pip installs the Python runtime only)."
    )


def _assets(js: Path) -> dict[str, Path]:
    routes = {"/vera.mjs": js / "vera.mjs"}
    for prefix, (folder, needed) in _ASSETS.items():
        root = js / folder
        if not (root / needed).is_file():
            raise DemoError(f"{root / needed} is missing: run `npm ci --ignore-scripts --prefix {js}` (it installs"
                            " onnxruntime-web and the tokenizer, pinned by package-lock.json).")
        routes.update({prefix + path.name: path for path in root.iterdir() if path.is_file()})
    routes["/"] = js / "demo" / "index.html"
    return routes


def _check_graph(graph: Path, contract: Contract) -> None:
    if contract.task_defaults:
        raise DemoError(
            f"{graph} is not in the web form (onnxruntime-web hides task inputs that have defaults): run"
            f" `vera-export convert {graph} --to web --out {graph.with_suffix('')}.web.onnx` and give that graph."
        )
    if not contract.heads:
        raise DemoError(f"{graph} has no per-task head: the demo shows classifiers (a head per task, labels).")
    if not graph.with_name("tokenizer.json").is_file():
        raise DemoError(
            f"no tokenizer.json beside {graph}: export from a PEFT folder whose base has one (the exporter copies"
            " it, and convert carries it), or copy the base model's tokenizer.json there."
        )


def demo_files(graph: str | os.PathLike, contract: Contract, js: Path) -> DemoFiles:
    """What to serve for ``graph`` (checked: web form, heads, tokenizer, task files)."""
    graph = Path(graph)
    _check_graph(graph, contract)
    tasks = task_files_beside(graph, TASK_SUFFIX)
    if not tasks:
        raise DemoError(f"no task files beside {graph}: the web form needs them (`vera-export task`).")
    model = {graph.name: graph, **{path.name: path for path in tasks.values()}}
    model.update({name: graph.with_name(name) for name in TOKENIZER_FILES if graph.with_name(name).is_file()})
    data = graph.with_name(f"{graph.name}.data")
    if data.is_file():
        model[data.name] = data
    labels = read_labels(graph)
    size = contract.heads[-1].out_features
    manifest = {
        "graph": graph.name, "data": data.name if data.is_file() else None,
        "tasks": {name: path.name for name, path in sorted(tasks.items())},
        "labels": {name: labels.get(name) or [f"LABEL_{i}" for i in range(size)] for name in tasks},
        "tokenizer": [name for name in TOKENIZER_FILES if name in model],
        "max_sequence": contract.dim_limits.get("sequence", 512),
        "labels_file": labels_path(graph).name if labels else None,
    }
    routes = {**_assets(js), **{f"/model/{name}": path for name, path in model.items()}}
    return DemoFiles(routes, manifest)


class _Handler(http.server.BaseHTTPRequestHandler):
    files: DemoFiles  # set on the subclass made per server
    server_version = "vera-run-demo"

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's names)
        self._send(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._send(body=True)

    def _send(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if path == "/model/manifest.json":
            return self._reply(200, json.dumps(self.files.manifest).encode(), ".json", body)
        target = self.files.routes.get(path)
        if target is None:
            return self._reply(404, b"not found\n", ".txt", body)
        with open(target, "rb") as file:  # streamed: a graph's weights need not be read into memory whole
            self._headers(200, target.suffix, os.fstat(file.fileno()).st_size)
            if body:
                shutil.copyfileobj(file, self.wfile)

    def _reply(self, status: int, data: bytes, suffix: str, body: bool) -> None:
        self._headers(status, suffix, len(data))
        if body:
            self.wfile.write(data)

    def _headers(self, status: int, suffix: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", TYPES.get(suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Security-Policy", POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: the page's requests are many
        pass


def make_server(files: DemoFiles, host: str, port: int) -> http.server.ThreadingHTTPServer:
    handler = type("DemoHandler", (_Handler,), {"files": files})
    return http.server.ThreadingHTTPServer((host, port), handler)

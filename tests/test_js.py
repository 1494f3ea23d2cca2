"""The JavaScript runtime (runtime/js/vera.mjs) against the Python runtime, on web-form graphs of the
tiny encoder and MiniLM (float32 and int8): onnxruntime-node, and onnxruntime-web in a real headless
Chromium. This module writes the fixtures (graphs, task files, inputs, Python's outputs) and runs
node's test runner on runtime/js/test/.

Needs `npm ci --ignore-scripts --prefix runtime/js` and Debian's `chromium`; skipped without them,
except under CI (CI=true), where a missing piece fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import vera_models
from helpers import JS, require_js
from vera_export import convert
from vera_runtime import VeraSession
from vera_runtime._taskfile import KEY_DIGEST, task_files_beside, tensors_digest


def _spec(array: np.ndarray) -> dict:
    return {"dtype": str(array.dtype), "dims": list(array.shape), "data": array.ravel().tolist()}


def _case(name: str, graph: Path, feeds: dict[str, np.ndarray], folder: Path, web_tolerance: float = 1e-5) -> dict:
    """A case for cases.mjs: the graph's tasks, the inputs, and the Python runtime's outputs."""
    session = VeraSession(graph, "cpu")
    tasks = session.load_tasks_beside()
    rows = [tasks[i % len(tasks)] for i in range(len(next(iter(feeds.values()))))]
    choices = {f"task:{t}": {"task": t} for t in tasks} | {"rows": {"tasks": rows}}
    expected = {
        key: {k: _spec(v) for k, v in session.run(feeds, **choice).items()} for key, choice in choices.items()
    }
    files = {t: str(path.relative_to(folder)) for t, path in task_files_beside(graph).items()}
    return {"name": name, "graph": str(graph.relative_to(folder)), "tasks": files, "choices": choices,
            "inputs": {k: _spec(v) for k, v in feeds.items()}, "expected": expected, "web_tolerance": web_tolerance}


def _refusals(folder: Path, encoder: Path, foreign_task: Path) -> dict:
    """Files the JS runtime must refuse, with the Python runtime's wording."""
    task = next(iter(sorted(folder.glob("encoder.web.*.task.safetensors"))))
    tensors = load_file(task)
    with safe_open(task, framework="numpy") as reader:
        metadata = reader.metadata()
    first = next(iter(tensors))
    nan = dict(tensors) | {first: np.full_like(tensors[first], np.nan)}
    wrong = dict(tensors) | {first: np.zeros(tensors[first].size + 1, np.float32)}
    save_file(nan, folder / "nan.task.safetensors", metadata=metadata | {KEY_DIGEST: tensors_digest(nan)})
    save_file(wrong, folder / "wrong_shape.task.safetensors", metadata=metadata)
    tampered = bytearray(task.read_bytes())
    tampered[-3] ^= 0x10  # one bit of the last tensor's bytes
    (folder / "tampered.task.safetensors").write_bytes(bytes(tampered))
    save_file(tensors, folder / "not_a_task.safetensors")
    (folder / "truncated.task.safetensors").write_bytes(task.read_bytes()[:60])
    shutil.copy(foreign_task, folder / "foreign.task.safetensors")
    shutil.copy(encoder, folder / "encoder-defaults.onnx")
    return {"graph_with_defaults": "encoder-defaults.onnx", "foreign": "foreign.task.safetensors",
            "nan": "nan.task.safetensors", "wrong_shape": "wrong_shape.task.safetensors",
            "not_a_task": "not_a_task.safetensors", "truncated": "truncated.task.safetensors",
            "tampered": "tampered.task.safetensors"}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, minilm, two_task_encoder) -> Path:
    folder = tmp_path_factory.mktemp("js")
    encoder = two_task_encoder
    convert(encoder, folder / "encoder.web.onnx", "web")
    convert(encoder, folder / "encoder.int4.web.onnx", "int4,web")  # MatMulNBits in onnxruntime-node and -web
    result, module = minilm
    (folder / "minilm").mkdir()
    convert(result.export.onnx_path, folder / "minilm" / "minilm.web.onnx", "web")
    convert(result.export.onnx_path, folder / "minilm" / "minilm.int8.onnx", "int8,web")
    encoded = module._tokenizer()(module.EXAMPLES, padding=True, return_tensors="np")
    sentences = {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    long = module._tokenizer()(["The concert was wonderful and I would go again any time. " * 12] * 4, truncation=True,
                                padding="max_length", max_length=128, return_tensors="np")
    many_rows = {k: long[k].astype(np.int64) for k in ("input_ids", "attention_mask")}  # 4 x 128 tokens
    example = vera_models.example_input(vera_models.build("tiny-encoder"), batch=4, seq=8)
    cases = [
        _case("tiny-encoder", folder / "encoder.web.onnx", example, folder),
        # wasm's MatMulNBits works in float32 where the native CPU kernel (accuracy level 4) quantizes the
        # activations to int8: the browser differs from Python by ~0.4% of the scale (node: to 1e-5)
        _case("tiny-encoder-int4", folder / "encoder.int4.web.onnx", example, folder, web_tolerance=0.01),
        _case("minilm", folder / "minilm" / "minilm.web.onnx", sentences, folder),
        _case("minilm-4x128-tokens", folder / "minilm" / "minilm.web.onnx", many_rows, folder),
        # onnxruntime-web's wasm int8 kernels round some quantized activations differently from the
        # native ones (node matches Python to 1e-6; wasm moved one logit by 1.5% of the scale)
        _case("minilm-int8", folder / "minilm" / "minilm.int8.onnx", sentences, folder, web_tolerance=0.05),
    ]
    refusals = _refusals(folder, encoder, module.HERE / "topic.task.safetensors")
    (folder / "manifest.json").write_text(json.dumps({"cases": cases, "refusals": refusals}))
    return folder


def _node_test(script: str, fixtures: Path) -> str:
    done = subprocess.run(
        ["node", "--test", "--test-reporter=tap", str(JS / "test" / script)],
        env={**os.environ, "VERA_JS_FIXTURES": str(fixtures)}, capture_output=True, text=True, timeout=600,
    )
    output = done.stdout + done.stderr
    counts = {key: int(value) for key, value in re.findall(r"^# (pass|fail|skipped|skip) (\d+)$", output, re.M)}
    assert done.returncode == 0 and counts.get("fail") == 0, output[-4000:]
    assert counts.get("skip", 0) == 0 and counts.get("pass", 0) >= 1, output[-4000:]
    return output


def test_onnxruntime_node_equals_the_python_runtime(fixtures):
    require_js(shutil.which("node") is not None and (JS / "node_modules" / "onnxruntime-node").is_dir(),
             "node or runtime/js/node_modules")
    output = _node_test("node.test.mjs", fixtures)
    cases = len(json.loads((fixtures / "manifest.json").read_text())["cases"])
    assert f"# pass {cases + 1}" in output, output[-2000:]  # one test per case, and the refusals


@pytest.mark.slow
def test_onnxruntime_web_in_headless_chromium_equals_the_python_runtime(fixtures):
    require_js((JS / "node_modules" / "puppeteer-core").is_dir(), "runtime/js/node_modules")
    require_js(any(shutil.which(n) for n in ("chromium", "chromium-browser")) or "CHROMIUM" in os.environ, "chromium")
    _node_test("browser.test.mjs", fixtures)

"""vera-serve: a real Ray Serve server on 127.0.0.1, many clients with different tasks, batched into one run."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vera_runtime import Task, VeraSession, read_task, write_task

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason='ray[serve] is not installed (pip install "./runtime[serve]")')

TASKS = ["default", "a", "b", "c"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc (Ray's gcs_server, raylet, workers, proxies)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}"), dict(response.getheaders())
    finally:
        connection.close()


def _serve(log: Path, graph: Path, *options: str) -> tuple[subprocess.Popen, int]:
    """Start vera-serve on a free port and wait until it answers (its output goes to ``log``)."""
    port = _free_port()
    command = [sys.executable, "-m", "vera_runtime.serve", str(graph), "--port", str(port), *options]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if _call(port, "GET", "/v1/health")[0] == 200:
                return process, port
        except (OSError, ValueError, http.client.HTTPException):  # not listening yet, or not ready (503)
            pass
        time.sleep(1)
    process.kill()
    pytest.fail(f"vera-serve did not come up: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(encoder, tmp_path_factory):
    """vera-serve over the encoder with four tasks beside it; shut down (and checked) after the module."""
    folder = tmp_path_factory.mktemp("serve")
    graph = folder / "encoder.onnx"
    shutil.copy(encoder.path, graph)
    shutil.copy(encoder.result.task_path, folder / "encoder.default.task.safetensors")
    default = read_task(encoder.result.task_path)
    rng = np.random.default_rng(3)
    for name in TASKS[1:]:
        tensors = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.5) for k, v in default.tensors.items()}
        write_task(folder / f"encoder.{name}.task.safetensors", Task(name, default.fingerprint, tensors,
                                                                     default.base_digest))
    process, port = _serve(folder / "serve.log", graph, "--tasks-beside", "--max-batch", "16", "--batch-wait-ms", "20")
    children = _descendants(process.pid)
    session = VeraSession(graph, device="cpu")
    session.load_tasks_beside()
    yield port, session
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    time.sleep(2)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert not alive, f"processes left behind after shutdown: {alive}"


def _request(rng: random.Random) -> dict:
    rows, seq = rng.choice([1, 2]), rng.choice([6, 9])  # two lengths: requests are grouped by shape
    ids = [[rng.randrange(8192) for _ in range(seq)] for _ in range(rows)]
    body = {"inputs": {"input_ids": ids, "attention_mask": [[1] * seq for _ in range(rows)]}}
    if rng.random() < 0.25:
        body["tasks"] = [rng.choice(TASKS) for _ in range(rows)]
    else:
        body["task"] = rng.choice(TASKS)
    return body


def _alone(session: VeraSession, body: dict) -> dict[str, np.ndarray]:
    feeds = {name: np.asarray(value, np.int64) for name, value in body["inputs"].items()}
    return session.run(feeds, tasks=body["tasks"]) if "tasks" in body else session.run(feeds, task=body["task"])


def test_concurrent_clients_with_random_tasks_get_what_each_request_gets_alone(server):
    port, session = server
    failures: list[str] = []
    batches: list[int] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(8):
            body = _request(rng)
            status, answer, headers = _call(port, "POST", "/v1/run", json.dumps(body).encode())
            if status != 200:
                failures.append(f"{status} {answer}")
                continue
            batches.append(int(headers["x-vera-batch"]))
            for name, want in _alone(session, body).items():
                got = np.asarray(answer["outputs"][name], np.float32)
                if not np.allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max()))):
                    failures.append(f"{body.get('task', body.get('tasks'))}: {name} differs")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert failures == []
    assert len(batches) == 16 * 8
    assert max(batches) > 1, "no request shared a batch"
    stats = _call(port, "GET", "/v1/stats")[1]
    assert any(int(size) > 1 for size in stats["batches"])


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"task": "a", "inputs": ', 400, "is not valid JSON"),
    (b'{"task": "zzz", "inputs": {"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}}', 404, "'zzz' is not loaded"),
    (b'{"task": "a", "inputs": {"input_idz": [[1, 2]], "attention_mask": [[1, 1]]}}', 400, "no input 'input_idz'"),
    (b'{"task": "a", "inputs": {"input_ids": [[1.5, 2]], "attention_mask": [[1, 1]]}}', 400, "it holds decimal values"),
    (b'{"task": "a", "inputs": {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}}', 400, "must agree on"),
    (b'{"task": "a", "inputs": {"input_ids": [[99999]], "attention_mask": [[1]]}}', 400, "outside the model's vocab"),
    (b'{"tasks": ["a"], "inputs": {"input_ids": [[1], [2]], "attention_mask": [[1], [1]]}}', 400, "list of 2 task"),
    (b"[1, 2]", 400, "the body must be a JSON object"),
    (b'{"task": "a", "inputs": {"input_ids": [[' + b"1, " * 3_000_000 + b'1]]}}', 413, "this server takes up to"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem_and_the_server_keeps_serving(server, body, status, message):
    port, _ = server
    got, answer, _ = _call(port, "POST", "/v1/run", body)
    assert got == status and message in answer["error"], answer
    good = {"task": "a", "inputs": {"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}}
    assert _call(port, "POST", "/v1/run", json.dumps(good).encode())[0] == 200


def test_tasks_and_health(server):
    port, _ = server
    assert _call(port, "GET", "/v1/health")[1]["status"] == "ok"
    assert _call(port, "GET", "/v1/tasks")[1] == {"tasks": sorted(TASKS), "default": "default"}
    assert _call(port, "GET", "/v1/nowhere")[0] == 404


def test_a_bad_graph_fails_before_ray_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vera_runtime.serve", str(tmp_path / "none.onnx")],
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 1 and "none.onnx does not exist" in result.stderr

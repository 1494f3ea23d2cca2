"""vera-serve with a task bank and tenants (issue 19), a real server on 127.0.0.1 with 2 replicas: tasks added
and removed over HTTP are served by every replica within a second, without a restart; a tenant sees, runs,
adds and removes only its own tasks, and another tenant's task answers exactly as a missing one."""

from __future__ import annotations

import http.client
import importlib.util
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from test_serve import _serve

from vera_runtime import TaskBank, VeraSession

pytestmark = [pytest.mark.slow,  # two Ray Serve servers: ~45 s
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason='ray[serve] is not installed (pip install "./runtime[serve]")')]

KEYS = {"alice-0123456789abcdef": "alice", "bob-fedcba9876543210xyz": "bob"}
ALICE, BOB = list(KEYS)
INPUTS = {"input_ids": [[5, 6, 7, 8], [9, 10, 11, 12]], "attention_mask": [[1, 1, 1, 1], [1, 1, 1, 0]]}


def _http(port: int, method: str, path: str, body: bytes | None = None, key: str | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}"), response.headers  # names in any case
    finally:
        connection.close()


def _run(port: int, task: str, key: str | None):
    return _http(port, "POST", "/v1/run", json.dumps({"task": task, "inputs": INPUTS}).encode(), key)


@pytest.fixture(scope="module")
def served(two_task_encoder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bank-serve")
    bank = TaskBank.create(folder / "tasks.bank", VeraSession(two_task_encoder, device="cpu"))
    bank.add("shared", two_task_encoder.with_name("encoder.first.task.safetensors"))
    tenants = folder / "tenants.json"
    tenants.write_text(json.dumps(KEYS))
    log = folder / "serve.log"
    process, port = _serve(log, two_task_encoder, "--bank", str(bank.path), "--tenants", str(tenants),
                           "--replicas", "2")
    yield port, bank, two_task_encoder, log
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)


def test_requests_need_a_known_key(served):
    port, *_ = served
    assert _http(port, "GET", "/v1/health")[0] == 200  # liveness needs no key
    for key in (None, "not-a-key-at-all-000", ALICE[:-1], ALICE + "x"):
        status, body, headers = _http(port, "GET", "/v1/tasks", key=key)
        assert (status, headers.get("WWW-Authenticate")) == (401, "Bearer") and "API key" in body["error"]
    assert _run(port, "shared", None)[0] == 401


def test_a_tenant_adds_runs_and_removes_its_own_tasks_and_no_one_elses(served):
    port, bank, graph, _ = served
    second = graph.with_name("encoder.second.task.safetensors").read_bytes()
    status, body, _ = _http(port, "PUT", "/v1/tasks/mine", second, ALICE)
    assert (status, body) == (201, {"added": "mine"})
    assert _http(port, "GET", "/v1/tasks", key=ALICE)[1]["tasks"] == ["mine"]
    assert _http(port, "GET", "/v1/tasks", key=BOB)[1]["tasks"] == []
    # bob: alice's task is exactly a missing task; the bank's un-namespaced tasks are no one's
    theirs, missing = _run(port, "mine", BOB), _run(port, "nosuch", BOB)
    assert theirs[0] == missing[0] == 404 and theirs[1] == json.loads(json.dumps(missing[1]).replace("nosuch", "mine"))
    assert _run(port, "shared", ALICE)[0] == 404
    assert _http(port, "DELETE", "/v1/tasks/mine", key=BOB)[0] == 404
    # alice's run equals the task run alone, in Python
    session = VeraSession(graph, device="cpu")
    session.load_task("second", graph.with_name("encoder.second.task.safetensors"))
    expected = session.run({k: np.array(v) for k, v in INPUTS.items()}, task="second")
    status, body, _ = _run(port, "mine", ALICE)
    assert status == 200
    np.testing.assert_allclose(np.array(body["outputs"]["logits"]), expected["logits"], rtol=1e-5, atol=1e-6)
    assert "alice/mine" in bank and "mine" not in bank
    removed = time.monotonic()
    assert _http(port, "DELETE", "/v1/tasks/mine", key=ALICE)[:2] == (200, {"removed": "mine"})
    time.sleep(max(0.0, removed + 1.0 - time.monotonic()))  # a second later, no replica serves it
    assert [_run(port, "mine", ALICE)[0] for _ in range(20)] == [404] * 20


def test_an_added_task_is_served_by_every_replica_at_once(served):
    port, _, graph, _ = served
    adapter = graph.with_name("encoder.first.onnx_adapter").read_bytes()
    assert _http(port, "PUT", "/v1/tasks/fresh", adapter, BOB)[0] == 201
    replicas = set()
    for _ in range(40):  # right after the PUT: both replicas answer, and neither misses the new task
        status, body, headers = _run(port, "fresh", BOB)
        assert status == 200, body
        replicas.add(headers["X-Vera-Replica"])
    assert len(replicas) == 2
    assert _http(port, "DELETE", "/v1/tasks/fresh", key=BOB)[0] == 200


def test_a_bad_task_file_is_a_400_and_the_bank_is_unchanged(served, tmp_path):
    port, bank, graph, _ = served
    size = bank.path.stat().st_size
    cut = graph.with_name("encoder.second.task.safetensors").read_bytes()[:-10]
    for body in (b"not a task file", cut, b""):
        status, reply, _ = _http(port, "PUT", "/v1/tasks/broken", body, ALICE)
        assert status == 400 and "not a task file of this graph" in reply["error"], reply
        assert "/tmp/vera-put" not in reply["error"]  # the scratch path is not shown
    assert _http(port, "PUT", "/v1/tasks/bad%20name", b"x", ALICE)[0] == 400
    assert bank.path.stat().st_size == size and "alice/broken" not in TaskBank(bank.path)


def test_keys_are_never_logged(served):
    port, _, _, log = served
    _run(port, "shared", ALICE)
    _http(port, "GET", "/v1/tasks", key="wrong-key-0123456789")
    texts = [log.read_text(errors="replace")]
    session_logs = Path("/tmp/ray/session_latest/logs")
    if session_logs.is_dir():
        files = [p for p in session_logs.rglob("*") if p.is_file() and p.stat().st_size < 50e6]
        texts += [p.read_text(errors="replace") for p in files]
    for key in (*KEYS, "wrong-key-0123456789"):
        assert not any(key in text for text in texts), "a key appears in a log"


def test_without_tenants_the_bank_is_open_to_every_client(two_task_encoder, tmp_path):
    bank = TaskBank.create(tmp_path / "open.bank", VeraSession(two_task_encoder, device="cpu"))
    process, port = _serve(tmp_path / "serve.log", two_task_encoder, "--bank", str(bank.path), "--tasks-beside",
                           "--direct")
    try:
        native = two_task_encoder.with_name("encoder.second.task.safetensors").read_bytes()
        assert _http(port, "PUT", "/v1/tasks/added", native)[0] == 201
        assert _http(port, "GET", "/v1/tasks")[1]["tasks"] == ["added", "first", "second"]  # loaded and banked
        added, second = _run(port, "added", None), _run(port, "second", None)
        assert added[0] == 200 and added[1]["outputs"] == second[1]["outputs"]
        assert _http(port, "DELETE", "/v1/tasks/added")[0] == 200 and "added" not in TaskBank(bank.path)
        assert _http(port, "DELETE", "/v1/tasks/first")[0] == 404  # a loaded task is not the bank's to remove
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)

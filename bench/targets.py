"""Deployment targets: python bench/targets.py [--repeats N] [--threads T] [--samples N]

For MiniLM (the Quick start's graph, two tasks) and the tiny decoder (two tasks), every form that
`vera-export convert` writes: file size, latency at batch 1 and 8 (Python ONNX Runtime, CPU, the forms
interleaved in one run), and agreement with the float32 graph on --samples generated inputs per task
(sentences for MiniLM, token sequences for the decoder): argmax agreement and max |Δ logit|. Then the
web form in Node (runtime/js/vera.mjs + onnxruntime-node) against Python ORT on the same graph, and
a task switch in JS. Writes bench/results/targets.md and bench/results/targets.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import Timing  # noqa: E402
from run import SEQ, _interleaved, _options  # noqa: E402

RESULTS = HERE / "results"
WORK = RESULTS / "work" / "targets"
FORMS = {"fp32": None, "int8": "int8", "fp16": "fp16", "web": "web"}
_ROUNDS = 3  # Python, then Node, three times over; medians of the rounds' medians


def _convert_all(graph: Path) -> dict[str, Path]:
    from vera_export import convert

    paths = {"fp32": graph}
    for form, target in FORMS.items():
        if target:
            paths[form] = convert(graph, graph.with_name(f"{graph.stem}.{form}.onnx"), target).path
    return paths


def minilm_case(work: Path) -> dict:
    from vera_export import export_peft
    from vera_models import minilm

    graph = work / "minilm.onnx"
    export_peft({n: minilm.HERE / n for n in minilm.TASKS}, graph, base=minilm.base_path())
    tokenizer = minilm._tokenizer()

    def encode(texts, **padding):
        encoded = tokenizer(texts, return_tensors="np", truncation=True, max_length=SEQ, **padding)
        return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    def latency_feeds(batch):
        text = ["The concert was absolutely wonderful and I would go again any time. " * 12] * batch
        return encode(text, padding="max_length")

    def samples(task, count):
        return encode([text for text, _ in minilm.sentences(task, count, seed=2026)], padding=True)

    return dict(name="MiniLM-L6 VeRA (r=256)", graphs=_convert_all(graph), tasks=list(minilm.TASKS),
                latency_feeds=latency_feeds, samples=samples)


def decoder_case(work: Path) -> dict:
    import vera_models
    from vera_export import add_task, export

    graph = work / "decoder.onnx"
    export(vera_models.make_task(vera_models.build("tiny-decoder"), 1), graph, task_name="first")
    add_task(vera_models.make_task(vera_models.build("tiny-decoder"), 2), graph, "second")

    def latency_feeds(batch):
        return {"input_ids": np.random.default_rng(0).integers(0, 8192, (batch, SEQ))}

    def samples(task, count):  # token sequences: the decoder has no tokenizer
        return {"input_ids": np.random.default_rng(7).integers(0, 8192, (count, 32))}

    return dict(name="tiny-decoder VeRA (r=64)", graphs=_convert_all(graph), tasks=["first", "second"],
                latency_feeds=latency_feeds, samples=samples)


def _session(path: Path, threads: int):
    from vera_runtime import VeraSession

    session = VeraSession(path, device="cpu", hot_tasks=0, session_options=_options(threads))
    session.load_tasks_beside()
    return session


def agreement(case: dict, count: int, threads: int) -> dict[str, dict[str, tuple[float, float]]]:
    """form -> task -> (argmax agreement with fp32, max |Δ logit|), over ``count`` inputs per task."""
    sessions = {form: _session(path, threads) for form, path in case["graphs"].items()}
    table = {form: {} for form in sessions if form != "fp32"}
    for task in case["tasks"]:
        feeds = case["samples"](task, count)
        chunks = [{k: v[i:i + 50] for k, v in feeds.items()} for i in range(0, count, 50)]
        want = np.concatenate([sessions["fp32"].run(c, task=task)["logits"] for c in chunks])
        for form in table:
            got = np.concatenate([sessions[form].run(c, task=task)["logits"] for c in chunks])
            table[form][task] = (float(np.mean(got.argmax(-1) == want.argmax(-1))), float(np.abs(got - want).max()))
    return table


def _runner(session, task: str):
    return lambda feeds: session.run(feeds, task=task)


def latency(case: dict, threads: int, repeats: int) -> dict[int, dict[str, Timing]]:
    sessions = {form: _session(path, threads) for form, path in case["graphs"].items()}
    task = case["tasks"][0]
    runners = {form: _runner(session, task) for form, session in sessions.items()}
    return {batch: _interleaved(runners, case["latency_feeds"](batch), repeats) for batch in (1, 8)}


def node(case: dict, threads: int, repeats: int) -> dict | None:
    """Node (onnxruntime-node) on the web graph, right after Python ORT on the same graph."""
    web = case["graphs"]["web"]
    from vera_runtime.layout import task_files_beside
    feeds = {batch: {k: {"dtype": str(v.dtype), "dims": list(v.shape), "data": v.ravel().tolist()}
                     for k, v in case["latency_feeds"](batch).items()} for batch in (1, 8)}
    config = web.with_suffix(".bench.json")
    config.write_text(json.dumps({"graph": str(web), "threads": threads, "repeats": repeats, "feeds": feeds,
                                  "tasks": {t: str(p) for t, p in task_files_beside(web).items()}}))
    python, js, switch = {1: [], 8: []}, {1: [], 8: []}, []
    for _ in range(_ROUNDS):  # separate processes can't interleave runs: alternate whole rounds instead
        timings = latency({**case, "graphs": {"web": web}}, threads, repeats)
        try:
            done = subprocess.run(["node", str(HERE / "node_latency.mjs"), str(config)], capture_output=True,
                                  text=True, check=True, timeout=1200)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"Node skipped ({exc}): run `npm ci --ignore-scripts --prefix runtime/js`", file=sys.stderr)
            return None
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        for batch in (1, 8):
            python[batch].append(timings[batch]["web"].median)
            js[batch].append(measured["latency"][str(batch)])
        switch.append(measured["switch"])
    return {"python": {b: float(np.median(v)) for b, v in python.items()},
            "node": {b: float(np.median(v)) for b, v in js.items()}, "switch": float(np.median(switch))}


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×"


def _form_rows(case: dict) -> list[str]:
    size = {f: p.stat().st_size for f, p in case["graphs"].items()}
    lat, rows = case["latency"], []
    for form in case["graphs"]:
        agree = case["agreement"].get(form)
        argmax = " / ".join(f"{a:.1%}" for a, _ in agree.values()) if agree else "—"
        delta = " / ".join(f"{d:.3g}" for _, d in agree.values()) if agree else "—"
        b1, b8 = lat[1][form].median, lat[8][form].median
        rows.append(_row(case["name"], form, f"{size[form] / 1e6:.1f}", _ratio(size[form], size["fp32"]),
                         f"{b1 * 1e3:.2f}", _ratio(b1, lat[1]["fp32"].median), f"{b8 * 1e3:.2f}",
                         _ratio(b8, lat[8]["fp32"].median), argmax, delta))
    return rows


def _node_row(case: dict) -> str:
    n = case.get("node")
    if n is None:
        return _row(case["name"], "not measured (no runtime/js/node_modules)", "", "", "", "", "", "")
    py, js = n["python"], n["node"]
    return _row(case["name"], f"{py[1] * 1e3:.2f}", f"{js[1] * 1e3:.2f}", _ratio(js[1], py[1]), f"{py[8] * 1e3:.2f}",
                f"{js[8] * 1e3:.2f}", _ratio(js[8], py[8]), f"{n['switch'] * 1e6:.2f}")


def report(cases: list[dict], threads: int, repeats: int, count: int) -> str:
    lines = [
        "# Deployment targets (bench/targets.py)", "",
        f"{platform.processor() or platform.machine()}, {threads} threads, CPU execution provider; latency: median"
        f" of {repeats} interleaved runs at sequence {SEQ}; agreement: {count} generated inputs per task against the"
        " fp32 graph.", "",
        _row("model", "form", "file MB", "× fp32", "batch 1 ms", "× fp32", "batch 8 ms", "× fp32",
             "argmax agreement", "max abs Δ logit"),
        _row(*["---"] * 10),
    ]
    for case in cases:
        lines += _form_rows(case)
    lines += ["", "Agreement columns give each task in turn (MiniLM: sentiment / topic; decoder: first / second;"
              " the decoder's argmax is the next token at every position).", "",
              "## Node (runtime/js + onnxruntime-node 1.30) vs Python ONNX Runtime, same web graph", "",
              f"{_ROUNDS} alternating rounds (Python, then Node) of {repeats} runs each; medians of the rounds'"
              " medians. Task switch: choosing another preloaded task's feeds (`taskFeeds`).", "",
              _row("model", "Python b=1 ms", "Node b=1 ms", "ratio", "Python b=8 ms", "Node b=8 ms", "ratio",
                   "JS task switch µs"),
              _row(*["---"] * 8)]
    lines += [_node_row(case) for case in cases]
    return "\n".join(lines) + "\n"


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4))
    for ax, case in zip(np.atleast_1d(axes), cases, strict=True):
        forms = list(case["graphs"])
        sizes = [case["graphs"][f].stat().st_size / case["graphs"]["fp32"].stat().st_size for f in forms]
        ratios = {b: [case["latency"][b][f].median / case["latency"][b]["fp32"].median for f in forms] for b in (1, 8)}
        x = np.arange(len(forms))
        ax.bar(x - 0.25, sizes, 0.25, label="file size")
        ax.bar(x, ratios[1], 0.25, label="latency, batch 1")
        ax.bar(x + 0.25, ratios[8], 0.25, label="latency, batch 8")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(x, forms)
        ax.set_ylabel("× the fp32 graph")
        ax.set_title(case["name"])
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    cases = []
    for build, folder in ((minilm_case, "minilm"), (decoder_case, "decoder")):
        (WORK / folder).mkdir(exist_ok=True)
        start = time.perf_counter()
        case = build(WORK / folder)
        print(f"{case['name']}: exported and converted in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        case["agreement"] = agreement(case, args.samples, args.threads)
        case["latency"] = latency(case, args.threads, args.repeats)
        case["node"] = node(case, args.threads, args.repeats)
        cases.append(case)
    text = report(cases, args.threads, args.repeats, args.samples)
    (RESULTS / "targets.md").write_text(text)
    plot(cases, RESULTS / "targets.png")
    print(text)


if __name__ == "__main__":
    main()

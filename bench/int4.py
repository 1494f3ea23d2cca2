"""int4 (issue 18, step 1): python bench/int4.py [--repeats N] [--threads T] [--case large]

The `--kv-cache` graph of bench/generate.py's Llama (~125M parameters, 8 VeRA tasks on q_proj/v_proj)
converted with `vera-export convert --to int4`, against the float32 graph it came from, side by side in one
interleaved run: generation time at batch 1 (one task) and batch 8 (8 tasks, one per row), file sizes,
conversion time, and how close int4's prefill logits stay to float32's (cosine, per task). Writes
bench/results/int4.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generate import CASES, NEW, TASKS, _build, _interleaved, _prompt  # noqa: E402
from run import _options  # noqa: E402


def _size(graph: Path) -> int:
    return sum(p.stat().st_size for p in (graph, Path(f"{graph}.data")) if p.is_file())


def _cosines(fp32, int4, ids: np.ndarray) -> dict[str, float]:
    """Cosine between float32's and int4's prefill logits, per task, on one prompt."""
    from vera_runtime.layout import positions

    mask = np.ones_like(ids)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
             **fp32.cache.empty(len(ids))}
    found = {}
    for task in TASKS:
        a = fp32.run(feeds, task=task, outputs=["logits"])["logits"].ravel()
        b = int4.run(feeds, task=task, outputs=["logits"])["logits"].ravel()
        found[task] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", default="large")
    args = parser.parse_args()

    from vera_export import convert
    from vera_runtime import VeraSession

    case = _build(args.case, CASES[args.case])
    fp32_graph = case["graphs"]["cache"]
    int4_graph = fp32_graph.parent.parent / "int4" / "model.int4.onnx"
    int4_graph.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    convert(fp32_graph, int4_graph, "int4")
    converted = time.perf_counter() - start
    sessions = {}
    for label, graph in (("float32", fp32_graph), ("int4", int4_graph)):
        sessions[label] = VeraSession(graph, device="cpu", session_options=_options(args.threads))
        sessions[label].load_tasks_beside()
    rows = []
    for batch in (1, 8):
        ids, tasks = _prompt(batch), TASKS[:batch]
        runners = {label: lambda s=s, ids=ids, tasks=tasks: s.generate(ids, tasks=tasks, max_new_tokens=NEW,
                                                                       eos_token_id=[])
                   for label, s in sessions.items()}
        timings = _interleaved(runners, args.repeats)
        for label, timing in timings.items():
            ratio = timing.median / timings["float32"].median
            rows.append(f"| {batch} | {label} | {timing.median:.3f} ({timing.low:.3f}–{timing.high:.3f}) |"
                        f" {batch * NEW / timing.median:.0f} | {ratio:.2f}× |")
    cosines = _cosines(sessions["float32"], sessions["int4"], _prompt(1, 16))
    sizes = {label: _size(graph) for label, graph in (("float32", fp32_graph), ("int4", int4_graph))}
    _write(args, case, rows, cosines, sizes, converted)


def _write(args, case, rows, cosines, sizes, converted) -> None:
    import onnxruntime

    lines = [
        "# int4 graphs (issue 18, step 1)", "",
        f"`python bench/int4.py --repeats {args.repeats} --threads {args.threads} --case {args.case}` on"
        f" {platform.processor() or platform.machine()}, {args.threads} threads, CPU, onnxruntime"
        f" {onnxruntime.__version__}: a {case['params'] / 1e6:.0f}M-parameter Llama (random weights), 8 VeRA"
        f" tasks, {NEW} new tokens after an 8-token prompt, greedy, medians of {args.repeats} interleaved runs;"
        " batch 8 runs 8 tasks, one per row.", "",
        "| batch | graph | seconds (min–max) | tokens/s | time vs float32 |", "| --- | --- | --- | --- | --- |",
        *rows, "",
        f"- Files: float32 {sizes['float32'] / 1e6:.0f} MB, int4 {sizes['int4'] / 1e6:.0f} MB"
        f" ({sizes['int4'] / sizes['float32']:.2f}×); `convert --to int4` took {converted:.0f} s, its agreement"
        " checks included.",
        f"- Prefill logits, cosine int4 vs float32 on a 16-token prompt, per task: min {min(cosines.values()):.3f},"
        f" max {max(cosines.values()):.3f}.", "",
    ]
    out = HERE / "results" / "int4.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

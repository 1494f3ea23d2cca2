"""Decode-step time by position on the fused graphs (issue 18, the loop):

    python bench/fused_steps.py [--threads T]   (after bench/fused.py built the graphs)

Median decode-step time at positions 16–31 and 240–255, batch 1, for bench/fused.py's Llama graphs
(fp32 and int4, one task) and the builder's graphs of the merged model, by the same kind of loop: the
cache is one shared buffer written in place, so a step should not cost more late than early beyond what
the builder's own graph shows (attention reading the longer past). Writes
bench/results/fused_steps.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generate import _per_token, _prompt  # noqa: E402
from run import _options  # noqa: E402

GRAPHS = HERE / "results" / "work" / "generate" / "large"


def _builder_steps(graph: Path, threads: int) -> dict[str, float]:
    """``_per_token`` for the builder's own graph (no contract: a plain greedy loop over the shared buffer)."""
    import time

    import numpy as np
    import onnxruntime as ort

    from vera_runtime.layout import CacheLayout

    session = ort.InferenceSession(str(graph), _options(threads), providers=["CPUExecutionProvider"])
    step = CacheLayout.of_layers(12, 4, 64).shared_step(session, {}, 1, 256)
    feed, steps = _prompt(1, 15), []
    for width in range(15, 256):
        start = time.perf_counter()
        logits, _ = step({"input_ids": feed, "attention_mask": np.ones((1, width), np.int64)}, None)
        feed = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        steps.append(time.perf_counter() - start)
    return {"16-31": float(np.median(steps[1:17])), "240-255": float(np.median(steps[-16:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for label in ("traced --kv-cache fp32", "fused fp32", "fused int4", "builder fp32", "builder int4"):
        kind = "cache" if label.startswith("traced") else label.replace(" ", "-")
        if label.startswith("builder"):  # the merged model's graph, as the builder made it
            steps = _builder_steps(GRAPHS / kind / "model.onnx", args.threads)
        else:
            steps = _per_token({"graphs": {"cache": GRAPHS / kind / "model.onnx"}}, args.threads)
        rows.append(f"| {label} | {steps['16-31'] * 1e3:.2f} | {steps['240-255'] * 1e3:.2f} |"
                    f" {steps['240-255'] / steps['16-31']:.2f}× |")
    lines = ["# Decode steps by position (issue 18)", "",
             f"`python bench/fused_steps.py --threads {args.threads}` on"
             f" {platform.processor() or platform.machine()}, 125M Llama of bench/fused.py, batch 1, one task (the"
             " graph's default), medians over 16 steps.", "",
             "| graph | ms per step, positions 16–31 | positions 240–255 | late vs early |",
             "| --- | --- | --- | --- |",
             *rows, ""]
    (HERE / "results" / "fused_steps.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Decode-step time by position on the fused graphs (issue 18, the loop):

    python bench/fused_steps.py [--threads T]   (after bench/fused.py built the graphs)

Median decode-step time at positions 16–31 and 240–255, batch 1, for bench/fused.py's Llama graphs
(fp32 and int4, one task): the cache is one shared buffer written in place, so a step should not cost
more late than early beyond attention's own reading of the longer past. Writes
bench/results/fused_steps.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generate import _per_token  # noqa: E402

GRAPHS = HERE / "results" / "work" / "generate" / "large"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for label in ("traced --kv-cache fp32", "fused fp32", "fused int4"):
        kind = "cache" if label.startswith("traced") else label.replace(" ", "-")
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

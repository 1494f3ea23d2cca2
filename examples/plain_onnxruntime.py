"""Deploy without vera-export's code: plain ONNX Runtime and its adapter API.

    python examples/plain_onnxruntime.py out/encoder.onnx out/input.npz

One session; each task is an ``.onnx_adapter`` file activated per run with
``RunOptions.add_active_adapter``. The same calls exist in ONNX Runtime's C, C++, C#, Java and JS APIs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(graph: Path, inputs: Path) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the λ inputs' default initializers are expected: no warnings
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    with np.load(inputs) as data:
        feeds = {name: data[name] for name in data.files}
    output = session.get_outputs()[0].name
    stem = graph.with_suffix("").name
    for path in sorted(graph.parent.glob(f"{stem}.*.onnx_adapter")):
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))  # memory-maps the file: microseconds
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        result = session.run([output], feeds, run_options)[0]
        task = path.name[len(stem) + 1 : -len(".onnx_adapter")]
        print(f"task {task:>10}: {output}[0] = {np.array2string(result[0][:6], precision=4)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""Run one exported graph with each of its tasks, on the same input, with plain ONNX Runtime.

    python examples/two_tasks.py out/encoder.onnx

Loads the session once; each task is only a different set of λ feeds read from its task file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vera_runtime import TASK_SUFFIX, Contract, read_task


def main(graph: Path) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the λ inputs' default initializers are expected: no warnings
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    contract = Contract.from_metadata(session.get_modelmeta().custom_metadata_map, str(graph))
    stem = graph.with_suffix("").name
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in session.get_inputs():  # the model inputs; λ inputs are overridable initializers
        feeds[spec.name] = rng.integers(0, 2 if "mask" in spec.name else 100, size=(2, 12)).astype(np.int64)
    output = session.get_outputs()[0].name
    for path in sorted(graph.parent.glob(f"{stem}.*{TASK_SUFFIX}")):
        task = read_task(path, contract)  # refuses files made for another graph
        lambdas = {name: array[None] for name, array in task.tensors.items()}  # T = 1: one task
        result = session.run([output], {**feeds, **lambdas})[0]
        print(f"task {task.name:>10}: {output}[0] = {np.array2string(result[0][:6], precision=4)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Graphs whose weights live in ONNX external data (`m.onnx.data`, what graphs over 2 GB need),
forced on a small model: exported, verified, moved, loaded, switched and converted like any other."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
from safetensors import safe_open

import vera_models
from helpers import export_two_task_encoder
from vera_export import _defaults, convert
from vera_runtime import VeraSession


def _contents(path) -> tuple[dict, dict]:
    """A task file's metadata and tensors (its bytes vary: safetensors writes metadata in hash order)."""
    with safe_open(path, framework="numpy") as reader:
        return reader.metadata(), {name: reader.get_tensor(name).tobytes() for name in reader.keys()}


def _outputs(path, feeds) -> dict[str, np.ndarray]:
    session = VeraSession(path, "cpu")
    session.load_tasks_beside()
    return {task: session.run(feeds, task=task)["logits"] for task in ("first", "second")}


def test_external_data_graphs_export_load_move_and_convert(tmp_path, monkeypatch, two_task_encoder):
    inline = two_task_encoder
    monkeypatch.setattr(_defaults, "EXTERNAL_DATA_BYTES", 0)  # export, convert and int8 read it
    graph = tmp_path / "external" / "encoder.onnx"
    graph.parent.mkdir()
    export_two_task_encoder(graph)  # verified against PyTorch through the external data, as every export is

    data = graph.with_name("encoder.onnx.data")
    proto = onnx.load(str(graph), load_external_data=False)
    assert data.stat().st_size > 20 * graph.stat().st_size
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer if t.name == "vera_A")
    for task in ("first", "second"):  # task files do not depend on how the graph stores its weights
        name = f"encoder.{task}.task.safetensors"
        assert _contents(graph.parent / name) == _contents(inline.parent / name)

    feeds = vera_models.example_input(vera_models.build("tiny-encoder"), batch=3, seq=8)
    want = _outputs(inline, feeds)
    moved = shutil.move(graph.parent, tmp_path / "moved")  # the data file is found beside the graph
    got = _outputs(f"{moved}/encoder.onnx", feeds)
    for task in want:
        np.testing.assert_array_equal(got[task], want[task])

    converted = tmp_path / "moved" / "encoder.web.onnx"
    convert(f"{moved}/encoder.onnx", converted, "web")
    assert converted.with_name("encoder.web.onnx.data").is_file()
    for task, value in _outputs(converted, feeds).items():
        np.testing.assert_array_equal(value, want[task])

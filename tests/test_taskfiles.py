"""Task files: round trip, and every way a file can fail to fit its graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from safetensors.numpy import save_file

from vera_runtime import Task, TaskFileError, read_onnx_adapter, read_task, write_onnx_adapter, write_task


def test_round_trip_keeps_name_fingerprint_and_vectors(encoder, tmp_path):
    task = read_task(encoder.result.task_path, encoder.result.contract)
    assert task.name == "default"
    copy = write_task(tmp_path / "copy.task.safetensors", task)
    again = read_task(copy, encoder.result.contract)
    assert again.fingerprint == task.fingerprint
    for name, array in task.tensors.items():
        np.testing.assert_array_equal(again.tensors[name], array)
    layer = encoder.adapted.layers[0]
    np.testing.assert_array_equal(task.tensors[f"{layer.name}.vera_lambda_d"], layer.lambda_d.detach().numpy())


def test_onnx_adapter_holds_the_same_vectors_shaped_as_feeds(encoder):
    task = read_task(encoder.result.task_path)
    _, tensors = read_onnx_adapter(encoder.result.adapter_path)
    assert set(tensors) == set(task.tensors)
    for name, array in task.tensors.items():
        np.testing.assert_array_equal(tensors[name], array[None])


def test_task_file_from_another_graph_is_refused_by_fingerprint(encoder, decoder):
    with pytest.raises(TaskFileError, match=r"decoder\.default\.task\.safetensors was made for another graph"):
        read_task(decoder.result.task_path, encoder.result.contract)


def _variant(encoder, tmp_path, **changes) -> str:
    task = read_task(encoder.result.task_path)
    tensors = dict(task.tensors)
    name = "blocks.0.attention.query.vera_lambda_d"
    if "drop" in changes:
        del tensors[name]
    if "shape" in changes:
        tensors[name] = np.zeros(changes["shape"], np.float32)
    if "value" in changes:
        tensors[name] = tensors[name].copy()
        tensors[name][0] = changes["value"]
    if "dtype" in changes:
        tensors[name] = tensors[name].astype(changes["dtype"])
    path = tmp_path / "bad.task.safetensors"
    write_task(path, dataclasses.replace(task, tensors=tensors))
    return str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": True}, r"missing \['blocks.0.attention.query.vera_lambda_d'\]"),
        ({"shape": (3,)},
         r"tensor 'blocks.0.attention.query.vera_lambda_d' is float32\[3\], the graph needs float32\[64\]"),
        ({"value": np.nan}, r"'blocks.0.attention.query.vera_lambda_d' holds NaN or Inf"),
        ({"value": np.inf}, r"holds NaN or Inf"),
        ({"dtype": np.float64}, r"is float64\[64\], the graph needs float32\[64\]"),
    ],
)
def test_bad_tensors_are_refused_naming_file_and_tensor(encoder, tmp_path, change, message):
    path = _variant(encoder, tmp_path, **change)
    with pytest.raises(TaskFileError, match=message) as error:
        read_task(path, encoder.result.contract)
    assert "bad.task.safetensors" in str(error.value)


def test_truncated_missing_and_foreign_files_are_refused(encoder, tmp_path):
    data = encoder.result.task_path.read_bytes()
    truncated = tmp_path / "cut.task.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskFileError, match="cut.task.safetensors is not a readable task file"):
        read_task(truncated)
    with pytest.raises(TaskFileError, match="nothing.task.safetensors does not exist"):
        read_task(tmp_path / "nothing.task.safetensors")
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, foreign)
    with pytest.raises(TaskFileError, match="not a vera-export task file"):
        read_task(foreign)
    garbage = tmp_path / "junk.onnx_adapter"
    garbage.write_bytes(b"not flatbuffers")
    with pytest.raises(TaskFileError, match="junk.onnx_adapter is not a readable .onnx_adapter"):
        read_onnx_adapter(garbage)


def test_bad_task_names_are_refused(tmp_path):
    task = Task("../escape", "0" * 64, {"x": np.zeros(2, np.float32)})
    with pytest.raises(TaskFileError, match=r"task name '../escape' is not allowed"):
        write_task(tmp_path / "t.task.safetensors", task)
    assert not list(tmp_path.iterdir())


def test_adapter_written_from_temporary_arrays_holds_the_values(tmp_path):
    # OrtValue does not own numpy memory: the writer must keep each array alive until written.
    task = Task("t", "abcdef0" + "0" * 57, {f"l{i}.vera_lambda_d": np.full(256, i, np.float32) for i in range(8)})
    path = write_onnx_adapter(tmp_path / "t.onnx_adapter", task)
    version, tensors = read_onnx_adapter(path)
    assert version == 0xABCDEF0
    for i in range(8):
        np.testing.assert_array_equal(tensors[f"l{i}.vera_lambda_d"], np.full((1, 256), i, np.float32))


def test_written_files_are_readable_like_any_other(encoder):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for path in (encoder.path, encoder.result.task_path, encoder.result.adapter_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path

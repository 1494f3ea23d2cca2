"""vera-run, and the README's deployment without our code (examples/plain_onnxruntime.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vera_models
from vera_runtime import VeraSession
from vera_runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deployed(encoder, tmp_path_factory):
    """The encoder graph with two tasks beside it (default and 'other'), and an input file."""
    folder = tmp_path_factory.mktemp("deployed")
    for path in (encoder.path, encoder.result.task_path, encoder.result.adapter_path):
        shutil.copy(path, folder / path.name)
    import vera_export

    other = vera_models.make_task(vera_models.build("tiny-encoder"), 9)
    vera_export.add_task(other, folder / encoder.path.name, "other")
    example = vera_models.example_input(other)
    np.savez(folder / "input.npz", **example)
    return folder / encoder.path.name, folder / "input.npz", example


def test_compare_prints_one_row_per_task_with_different_outputs(deployed, capsys):
    graph, inputs, example = deployed
    assert main(["compare", str(graph), "--input", str(inputs), "--device", "cpu"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert [row.split()[0] for row in rows] == ["default", "other"]
    assert rows[0].split()[1:] != rows[1].split()[1:]
    sess = VeraSession(graph, device="cpu")
    sess.load_tasks_beside()
    first = sess.run(example, task="other")["logits"][0][0]
    assert f"{first:.4g}" in rows[1]


def test_run_with_json_input_and_npz_output(deployed, tmp_path, capsys):
    graph, _, example = deployed
    as_json = tmp_path / "input.json"
    as_json.write_text(json.dumps({name: value.tolist() for name, value in example.items()}))
    out = tmp_path / "out.npz"
    assert main(["run", str(graph), "--input", str(as_json), "--task", "other", "--out", str(out)]) == 0
    sess = VeraSession(graph, device="cpu")
    sess.load_tasks_beside()
    with np.load(out) as saved:
        np.testing.assert_array_equal(saved["logits"], sess.run(example, task="other")["logits"])
    assert "logits: [2, 3]" in capsys.readouterr().out


def test_tasks_lists_files_and_errors_are_one_line(deployed, capsys):
    graph, inputs, _ = deployed
    assert main(["tasks", str(graph)]) == 0
    assert "other" in capsys.readouterr().out
    assert main(["run", str(graph), "--input", str(inputs), "--task", "missing"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: no task 'missing': the tasks beside") and "['default', 'other']"\
        in err[0] and "--load missing=PATH" in err[0], err
    assert main(["run", str(graph), "--input", str(graph.parent / "absent.npz")]) == 1
    assert "absent.npz does not exist" in capsys.readouterr().err


def test_plain_onnxruntime_example_switches_tasks_with_adapters(deployed):
    graph, inputs, example = deployed
    script = ROOT / "examples" / "plain_onnxruntime.py"
    result = subprocess.run([sys.executable, script, graph, inputs], capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0].split()[-1] for line in lines] == ["default", "other"]
    sess = VeraSession(graph, device="cpu")
    sess.load_tasks_beside()
    first = sess.run(example, task="other")["logits"][0][0]
    assert f"{first:.4f}".rstrip("0") in lines[1]


@pytest.mark.parametrize(("text", "message"), [
    ('{"input_ids": [[1, NaN]], "attention_mask": [[1, 1]]}', "is not valid JSON: NaN is not a number JSON allows"),
    ('{"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1]]}', "'input_ids': rows of different lengths"),
    ("[[1, 2]]", "holds a JSON list: give an object"),
    ('{"input_ids": [[1.9, 2]], "attention_mask": [[1, 1]]}', "'input_ids' takes integers (whole numbers"),
    ('{"input_ids": [[2.0, 2]], "attention_mask": [[1, 1]]}', "(int64); it holds decimal values"),
    ('{"input_ids": [[true, 2]], "attention_mask": [[1, 1]]}', "(int64); it holds true/false values"),
    ('{"input_ids": [["a", "b"]], "attention_mask": [[1, 1]]}', "'input_ids' takes integers"),
    ('{"input_ids": [[]], "attention_mask": [[]]}', "'input_ids': it has an empty dimension"),
    ('{"input_ids": [[1, 2]], "attention_mask": [[1, -5]]}', "'attention_mask' holds -5; a mask holds 0"),
    ('{"input_ids": [[1, 99999]], "attention_mask": [[1, 1]]}', "holds 99999, outside the model's vocabulary"),
])
def test_bad_json_inputs_are_one_line_errors(deployed, tmp_path, capfd, text, message):
    graph, _, _ = deployed
    path = tmp_path / "input.json"
    path.write_text(text)
    assert main(["run", str(graph), "--input", str(path), "--device", "cpu"]) == 1
    captured = capfd.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()] and message in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_an_npz_with_pickled_objects_is_refused(deployed, tmp_path, capsys):
    graph, _, example = deployed
    path = tmp_path / "input.npz"
    np.savez(path, input_ids=np.array([object(), 1], dtype=object), attention_mask=example["attention_mask"])
    assert main(["run", str(graph), "--input", str(path), "--device", "cpu"]) == 1
    assert "is not a readable numpy file without pickled objects" in capsys.readouterr().err


def test_task_names_from_files_cannot_drive_the_terminal(deployed, tmp_path, capsys):
    from safetensors.numpy import save_file

    from vera_runtime._taskfile import read_safetensors

    graph, _, _ = deployed
    folder = tmp_path / "deployed"
    shutil.copytree(graph.parent, folder)
    path = folder / graph.name.replace(".onnx", ".other.task.safetensors")
    metadata, tensors = read_safetensors(path)
    save_file(tensors, path, metadata={**metadata, "vera.task": "\x1b[2Jcleared"})
    assert main(["tasks", str(folder / graph.name)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2Jcleared" in out

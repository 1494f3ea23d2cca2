"""``vera-export convert``: int8, int4, fp16, web and ORT-format graphs keep the contract and the task files,
follow the float32 graph, and pass onnx.checker; the export itself is quantization-ready."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import vera_models
from vera_export import VeraExportError, convert
from vera_export.cli import main
from vera_runtime import FeedError, VeraSession


def _graph(path):
    return onnx.load(str(path))


def _base_matmul_weights(proto: onnx.ModelProto) -> dict[str, int]:
    """MatMul/Gemm weights that are float32 base initializers (not A, B or task defaults), by type."""
    inputs = {i.name for i in proto.graph.input}
    inits = {t.name: t for t in proto.graph.initializer if t.name not in inputs and t.name not in ("vera_A", "vera_B")}
    counts = {"float32": 0, "other": 0}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger") and node.input[1] in inits:
            kind = "float32" if inits[node.input[1]].data_type == onnx.TensorProto.FLOAT else "other"
            counts[kind] += 1
    return counts


def _single_use_transposed_weights(proto: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return [n.input[0] for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in inits
            and uses[n.input[0]] == 1 and n.input[0] not in ("vera_A", "vera_B")]


@pytest.fixture
def encoder(two_task_encoder):
    return two_task_encoder


def _outputs(path, feeds, task):
    session = VeraSession(path, "cpu")
    session.load_tasks_beside()
    return session.run(feeds, task=task)["logits"]


def test_exported_weights_are_stored_as_matmul_reads_them(decoder, encoder):
    for path in (decoder.path, encoder):
        proto = _graph(path)
        assert _single_use_transposed_weights(proto) == []
        assert _base_matmul_weights(proto)["float32"] >= 4
    tables = [t for t in _graph(decoder.path).graph.initializer if list(t.dims) == [8192, 128]]
    assert len(tables) == 1  # the tied embedding / lm_head weight: stored once, in the embedding's layout


@pytest.mark.parametrize("target", ["int8", "int4", "fp16", "web", "ort", "int8,web", "int4,web"])
def test_every_form_keeps_tasks_switching_and_follows_float32(encoder, tmp_path, target):
    out = tmp_path / f"encoder.{target.replace(',', '_')}.{'ort' if target == 'ort' else 'onnx'}"
    result = convert(encoder, out, target)
    assert {p.name for p in result.task_files} == {f"{out.with_suffix('').name}.{t}.{s}" for t in ("first", "second")
                                                   for s in ("task.safetensors", "onnx_adapter")}
    assert all(p.is_file() for p in result.task_files)
    assert [a.name for a in result.agreements] == ["first", "second", "a task per row"]
    feeds = vera_models.example_input(vera_models.build("tiny-encoder"), batch=4, seq=8)
    got = {t: _outputs(out, feeds, t) for t in ("first", "second")}
    want = {t: _outputs(encoder, feeds, t) for t in ("first", "second")}
    margin = 5 if target.startswith("int4") else 10  # 4-bit random tiny weights: an error ~9x under the tasks' gap
    assert np.abs(got["first"] - got["second"]).max() > margin * np.abs(got["first"] - want["first"]).max()
    loose = {"int8": 0.25, "int4": 0.5, "fp16": 2e-2}.get(target.split(",")[0], 1e-4)
    for task in got:
        assert np.abs(got[task] - want[task]).max() <= loose * np.abs(want[task]).max()
    if out.suffix == ".onnx":
        onnx.checker.check_model(str(out), full_check=True)
    contract = VeraSession(out, "cpu").contract
    assert contract.fingerprint == VeraSession(encoder, "cpu").contract.fingerprint
    assert contract.task_defaults == ("web" not in target)
    assert contract.weight_dtype == {"int8": "int8", "int4": "int4", "fp16": "float16"}.get(target.split(",")[0],
                                                                                            "float32")


@pytest.mark.slow
def test_int8_quantizes_every_base_matmul_and_keeps_a_b_and_tasks_float32(minilm, tmp_path):
    result, module = minilm
    source = _graph(result.export.onnx_path)
    out = tmp_path / "minilm.int8.onnx"
    convert(result.export.onnx_path, out, "int8")
    proto = _graph(out)
    assert _base_matmul_weights(source) == {"float32": 37, "other": 0}  # 36 MatMuls and the pooler's Gemm
    assert _base_matmul_weights(proto) == {"float32": 0, "other": 37}
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["vera_A"].data_type == inits["vera_B"].data_type == onnx.TensorProto.FLOAT
    task_defaults = [inits[name] for name in VeraSession(out, "cpu").contract.task_shapes()]
    assert task_defaults and all(t.data_type == onnx.TensorProto.FLOAT for t in task_defaults)
    assert out.stat().st_size <= 0.3 * result.export.onnx_path.stat().st_size
    fp32, int8 = VeraSession(result.export.onnx_path, "cpu"), VeraSession(out, "cpu")
    for session in (fp32, int8):
        session.load_tasks_beside()
    tokenizer = module._tokenizer()
    for task in module.TASKS:
        texts = [text for text, _ in module.sentences(task, 200, seed=11)]
        encoded = tokenizer(texts, padding=True, return_tensors="np")
        feeds = {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        want, got = fp32.run(feeds, task=task)["logits"], int8.run(feeds, task=task)["logits"]
        assert np.mean(want.argmax(-1) == got.argmax(-1)) >= 0.95


def test_fp16_weights_with_float32_task_inputs_and_the_same_adapter_files(encoder, tmp_path):
    out = tmp_path / "encoder.fp16.onnx"
    convert(encoder, out, "fp16")
    proto = _graph(out)
    inputs = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    contract = VeraSession(out, "cpu").contract
    assert all(inputs[name] == onnx.TensorProto.FLOAT for name in contract.task_shapes())
    halves = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert sum(np.prod(t.dims) for t in halves) > 0.9 * sum(np.prod(t.dims) for t in proto.graph.initializer)
    # ORT's adapter API with the .onnx_adapter copied beside the fp16 graph
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    feeds = vera_models.example_input(vera_models.build("tiny-encoder"), batch=2, seq=8)
    adapter = ort.LoraAdapter()
    adapter.Load(str(out.with_name("encoder.fp16.second.onnx_adapter")))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    via_adapter = session.run(None, feeds, run_options)[0]
    np.testing.assert_allclose(via_adapter, _outputs(out, feeds, "second"), rtol=0, atol=1e-6)


def test_a_web_graph_needs_its_task_files(encoder, tmp_path):
    out = tmp_path / "encoder.web.onnx"
    convert(encoder, out, "web")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    names = {i.name for i in ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).get_inputs()}
    session = VeraSession(out, "cpu")
    assert set(session.contract.task_shapes()) <= names  # required inputs: what the JS runtimes see
    feeds = vera_models.example_input(vera_models.build("tiny-encoder"), batch=2, seq=8)
    with pytest.raises(FeedError, match="holds no task values"):
        session.run(feeds)
    session.load_tasks_beside()
    np.testing.assert_array_equal(session.run(feeds)["logits"], session.run(feeds, task="first")["logits"])


@pytest.mark.parametrize(("to", "out", "words"), [
    ("int16", "e.int16.onnx", "unknown target"),
    ("int8,fp16", "e.onnx", "choose one"),
    ("int8,int4", "e.onnx", "choose one"),
    ("ort", "e.onnx", "*.ort"),
    ("web", "encoder.ort", "*.onnx"),
])
def test_bad_requests_are_refused_before_anything_is_written(encoder, tmp_path, to, out, words):
    with pytest.raises(VeraExportError, match=words.replace("*", r"\*")):
        convert(encoder, tmp_path / out, to)
    assert list(tmp_path.iterdir()) == []


def test_refusals_name_the_fix_and_write_nothing(encoder, tmp_path):
    with pytest.raises(VeraExportError, match="stem of"):
        convert(encoder, encoder.with_name("encoder.onnx").parent / "sub" / ".." / "encoder.onnx", "web")
    converted = tmp_path / "encoder.web.onnx"
    convert(encoder, converted, "web")
    with pytest.raises(VeraExportError, match="convert the graph vera-export wrote"):
        convert(converted, tmp_path / "again.onnx", "int8")
    lonely = tmp_path / "lonely" / "encoder.onnx"
    lonely.parent.mkdir()
    shutil.copy(encoder, lonely)
    with pytest.raises(VeraExportError, match="no task files beside"):
        convert(lonely, tmp_path / "lonely" / "web.onnx", "web")
    with pytest.raises(VeraExportError, match="nothing was written"):
        convert(encoder, tmp_path / "strict.onnx", "int8", tolerance=1e-9)
    assert not list(tmp_path.glob("strict*")) and not list(tmp_path.glob(".*vera-tmp"))


def test_cli_prints_the_agreement_per_task(encoder, tmp_path):
    out = tmp_path / "encoder.int8.onnx"
    done = CliRunner().invoke(main, ["convert", str(encoder), "--to", "int8", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "first: max |diff|" in done.output and "argmax agrees on" in done.output and out.is_file()
    done = CliRunner().invoke(main, ["convert", str(encoder), "--to", "bf16", "--out", str(tmp_path / "x.onnx")])
    assert done.exit_code == 1 and "unknown target" in done.output


def test_int4_turns_every_base_matmul_into_matmulnbits_and_keeps_a_b_and_tasks_float32(encoder, tmp_path):
    out = tmp_path / "encoder.int4.onnx"
    convert(encoder, out, "int4", block_size=64)
    source, proto = _graph(encoder), _graph(out)
    assert _base_matmul_weights(proto) == {"float32": 1, "other": 0}  # the classifier, over 3 labels
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == _base_matmul_weights(source)["float32"] - 1
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 64 and {a.name: a.i for a in n.attribute}["bits"]
               == 4 for n in nbits)
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["vera_A"].data_type == inits["vera_B"].data_type == onnx.TensorProto.FLOAT
    session = VeraSession(out, "cpu")
    assert all(inits[name].data_type == onnx.TensorProto.FLOAT for name in session.contract.task_shapes())
    session.load_tasks_beside()
    feeds = vera_models.example_input(vera_models.build("tiny-encoder"), batch=4, seq=8)
    mixed = session.run(feeds, tasks=["first", "second", "second", "first"])["logits"]
    for row, task in enumerate(["first", "second", "second", "first"]):  # rows do not change each other
        np.testing.assert_allclose(mixed[row], session.run(feeds, task=task)["logits"][row], rtol=0, atol=1e-6)
    with pytest.raises(VeraExportError, match="block size 48 is not one of"):
        convert(encoder, tmp_path / "e.int4b.onnx", "int4", block_size=48)

"""The fused decoder (``vera-export ADAPTER --fused fp32|int4``): onnxruntime-genai's builder graph of the
base model with the VeRA branches grafted on. Each family's graph generates PEFT's own tokens for each
task and for padded batches with a task per row; the int4 graph switches tasks per row and runs in
onnxruntime-genai with our adapters; the export's own check fails when a branch lands in the wrong place."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from peft_folders import add_tokenizer, make_adapter, make_base, model_class

from helpers import genai_generate, genai_python
from vera_export import VeraExportError, _graft, _merge_template
from vera_export._fused import export_fused
from vera_export._peft import export_peft
from vera_export.cli import main
from vera_runtime import VeraSession

TASKS = ("alpha", "beta")
NEW = 8


@dataclasses.dataclass(frozen=True)
class Built:
    root: Path
    base: Path
    adapters: dict[str, str]


def _build(root: Path, family: str) -> Built:
    base = make_base(root / "base", family, **({"hidden_size": 64} if family in ("llama", "qwen2") else {}))
    add_tokenizer(base, 1000)
    adapters = {task: str(make_adapter(root / task, base, family, seed)) for seed, task in enumerate(TASKS, 1)}
    return Built(root, base, adapters)


def _export(built: Built, precision: str, name: str = "fused", **options) -> Path:
    out = built.root / f"{name}-{precision}" / "model.onnx"
    out.parent.mkdir()
    export_fused(built.adapters, out, base=built.base, precision=precision, builder=genai_python(), **options)
    return out


def _peft(built: Built, family: str):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(family).from_pretrained(built.base)
        model = PeftModel.from_pretrained(model, built.adapters[TASKS[0]], adapter_name=TASKS[0])
        model.load_adapter(built.adapters[TASKS[1]], adapter_name=TASKS[1])
    return model.eval()


def _prompts():
    """Three rows of 7, 4 and 2 tokens, left-padded with 0."""
    rng = np.random.default_rng(1)
    lengths = np.array([7, 4, 2])
    mask = (np.arange(7)[None] >= 7 - lengths[:, None]).astype(np.int64)
    return np.where(mask == 1, rng.integers(4, 1000, (3, 7)), 0), mask


def _session(graph: Path) -> VeraSession:
    session = VeraSession(graph, device="cpu")
    session.load_tasks_beside()
    return session


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Built, Path, Path]:
    built = _build(tmp_path_factory.mktemp("fused-llama"), "llama")
    return built, _export(built, "fp32", hot_template=True), _export(built, "int4", hot_template=True)


FAMILIES = ["llama", pytest.param("qwen2", marks=pytest.mark.slow), pytest.param("phi3", marks=pytest.mark.slow),
            pytest.param("gemma2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_graph_generates_peft_tokens_per_task_and_per_row(family, llama, tmp_path):
    """Padded prompts (7, 4 and 2 tokens), a task per row: each row's tokens are PEFT's for its task, as are
    one-task runs. Gemma 2's sliding-window layers refuse a padded prefill: the runtime feeds the longer
    prompts a token per step there, which this covers too."""
    built, graph = (llama[0], llama[1]) if family == "llama" else ((b := _build(tmp_path, family)), _export(b, "fp32"))
    session, peft = _session(graph), _peft(built, family)
    ids, mask = _prompts()
    rows = ["alpha", "beta", "alpha"]
    mixed = session.generate(ids, mask, tasks=rows, max_new_tokens=NEW, eos_token_id=[])
    for row, task in enumerate(rows):
        prompt = ids[row:row + 1, mask[row] == 1]
        peft.set_adapter(task)
        with torch.no_grad():
            expected = peft.generate(input_ids=torch.tensor(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                                     do_sample=False)[0, -NEW:].numpy()
        np.testing.assert_array_equal(mixed[row, -NEW:], expected, err_msg=f"{family} row {row} ({task})")
        alone = session.generate(prompt, task=task, max_new_tokens=NEW, eos_token_id=[])
        np.testing.assert_array_equal(alone[0, -NEW:], expected)
    assert not np.array_equal(mixed[0, -NEW:], session.generate(ids, mask, task="beta", max_new_tokens=NEW,
                                                               eos_token_id=[])[0, -NEW:])


def test_the_graph_is_the_builders_with_task_inputs(llama):
    """GroupQueryAttention, fused norms and one packed q|k|v MatMul per layer (int4: MatMulNBits); λ inputs
    [tasks, n] with the exported task as defaults; no position_ids; the contract's dimension names."""
    built, fp32, int4 = llama
    for graph, matmul in ((fp32, "MatMul"), (int4, "MatMulNBits")):
        proto = onnx.load(graph, load_external_data=False)
        ops = [node.op_type for node in proto.graph.node]
        assert ops.count("GroupQueryAttention") == 2 and ops.count("SkipSimplifiedLayerNormalization") == 4
        qkv = [n.op_type for n in proto.graph.node if n.name.startswith("/model/layers.0/attn/qkv_proj/MatMul")]
        assert qkv == [matmul]
        inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        assert "position_ids" not in inputs
        assert inputs["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]
        lambdas = [name for name in inputs if name.endswith(".vera_lambda_d")]
        assert len(lambdas) == 4 and inputs[lambdas[0]] == ["tasks", 16]
        assert set(lambdas) <= {i.name for i in proto.graph.initializer}
        metadata = {p.key: p.value for p in proto.metadata_props}
        assert metadata["vera.kv_shared_buffer"] == "1" and metadata["vera.default_task"] == "alpha"
        assert metadata["vera.graph_builder"].startswith("onnxruntime-genai 0.18.0 model builder")
    assert (_session(fp32).contract.weight_dtype, _session(int4).contract.weight_dtype) == ("float32", "int4")
    shown = CliRunner().invoke(main, ["inspect", str(int4)])
    assert shown.exit_code == 0 and "form: int4 weights; task inputs with defaults; fused decoder" in shown.output


def test_task_files_fit_the_traced_graph_of_the_same_adapters(llama, tmp_path):
    """The same fingerprint as a traced --kv-cache export: one task file serves both graphs."""
    built, fused, _ = llama
    traced = tmp_path / "traced.onnx"
    export_peft(built.adapters, traced, base=built.base, kv_cache=True)
    assert _session(fused).contract.fingerprint == _session(traced).contract.fingerprint
    session = VeraSession(traced, device="cpu")
    session.load_task("beta", fused.with_name("model.beta.task.safetensors"))
    ids, mask = _prompts()
    np.testing.assert_array_equal(session.generate(ids, mask, task="beta", max_new_tokens=NEW, eos_token_id=[]),
                                  _session(fused).generate(ids, mask, task="beta", max_new_tokens=NEW, eos_token_id=[]))


def test_the_int4_graph_switches_tasks_per_row_and_genai_runs_it_with_our_adapters(llama, tmp_path):
    built, _, int4 = llama
    session = _session(int4)
    ids, mask = _prompts()
    rows = ["beta", "alpha", "beta"]
    mixed = session.generate(ids, mask, tasks=rows, max_new_tokens=NEW, eos_token_id=[])
    for row, task in enumerate(rows):
        alone = session.generate(ids[row:row + 1, mask[row] == 1], task=task, max_new_tokens=NEW, eos_token_id=[])
        np.testing.assert_array_equal(mixed[row, -NEW:], alone[0, -NEW:])
    prompt = [5, 17, 300, 42]
    adapters = {t: str(int4.with_name(f"model.{t}.onnx_adapter")) for t in TASKS}
    got = genai_generate(int4.parent, prompt, len(prompt) + NEW, adapters, tmp_path)
    for task in TASKS:
        ours = session.generate(np.array([prompt]), task=task, max_new_tokens=NEW, eos_token_id=[])
        assert got[task] == ours[0].tolist(), task
    assert got[TASKS[0]] != got[TASKS[1]]


def test_the_fp32_hot_template_serves_one_task_as_the_graph_does(llama):
    """`specialize` builds a task's session from the hot template (``W + ΔW`` folded per builder MatMul):
    single-task generation then runs there, with the factored graph's tokens; a streak of single-task calls
    specialises on its own."""
    built, fp32, _ = llama
    assert fp32.with_name("model.hot.onnx").is_file() and not fp32.with_name("model.hot.merge.safetensors").exists()
    session = _session(fp32)
    factored = VeraSession(fp32, device="cpu", hot_tasks=0)
    factored.load_tasks_beside()
    session.specialize("beta").result()
    assert session.hot == ("beta",)
    ids, mask = _prompts()
    for task in TASKS:
        np.testing.assert_array_equal(
            session.generate(ids, mask, task=task, max_new_tokens=NEW, eos_token_id=[]),
            factored.generate(ids, mask, task=task, max_new_tokens=NEW, eos_token_id=[]), err_msg=task)
    for _ in range(10):
        session.generate(ids[:1], task="alpha", max_new_tokens=1, eos_token_id=[])
    session._hot._pending.get("alpha", _done()).result()
    assert "alpha" in session.hot


def _done():
    import concurrent.futures

    future = concurrent.futures.Future()
    future.set_result(None)
    return future


def _builder_int4_of_merged(built: Built, task: str, family: str = "llama") -> Path:
    """onnxruntime-genai's builder's int4 graph of ``task`` merged into the base by PEFT: what a user who
    merges runs."""
    import shutil

    from vera_export._builder import Build

    folder = built.root / f"merged-{task}"
    if not (folder / "int4" / "model.onnx").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _peft(built, family)
            model.set_adapter(task)
            model.merge_and_unload().save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(built.base / name, folder / name)
        build = Build(str(genai_python()), folder, folder / "int4", "int4", folder / "cache")
        try:
            build.result()
        finally:
            build.stop()
    return folder / "int4" / "model.onnx"


def _assert_the_builders_int4_of_the_merged_model(built: Built, int4: Path, family: str, work: Path) -> VeraSession:
    """The task 'beta' of the int4 hot template: its int4 blocks are the builder's for the PEFT-merged model,
    byte for byte (scales to float rounding), and the specialised session generates what onnxruntime-genai
    generates on that merged model."""
    import onnx_ir as ir

    from vera_runtime.files import MergePlan

    merged = _builder_int4_of_merged(built, "beta", family)
    session = _session(int4)
    plan = MergePlan(int4.with_name("model.hot.merge.safetensors"), session.contract)
    theirs = ir.load(merged).graph.initializers
    for name, ours in plan.initializers(session._store.current("beta").feeds).items():
        expected = theirs[name].const_value.numpy()
        if name.endswith("_Q4"):
            np.testing.assert_array_equal(ours, expected, err_msg=name)
        else:
            np.testing.assert_allclose(ours, expected, rtol=1e-6, err_msg=name)
    session.specialize("beta").result()
    prompt = [5, 17, 300, 42]
    length = max(len(prompt) + NEW, session.contract.kv_shared_buffer)  # genai's cache holds a whole window
    ours = session.generate(np.array([prompt]), task="beta", max_new_tokens=length - len(prompt), eos_token_id=[])
    assert ours[0].tolist() == genai_generate(merged.parent, prompt, length, {"": ""}, work)[""]
    return session


def test_an_int4_hot_session_is_the_builders_int4_of_the_merged_model(llama, tmp_path):
    """The int4 hot template merges a task's weights and quantizes them as the builder does (above). Its
    logits are not the factored graph's (it rounds W + ΔW, not W), so single-task streaks never specialise
    on their own: only `specialize` does."""
    built, _, int4 = llama
    session = _session(int4)
    for _ in range(10):
        session.generate(np.array([[5, 17, 300, 42]]), task="beta", max_new_tokens=1, eos_token_id=[])
    session._hot._pending.get("beta", _done()).result()
    assert session.hot == ()
    session = _assert_the_builders_int4_of_the_merged_model(built, int4, "llama", tmp_path)
    assert session.hot == ("beta",)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "phi3", "gemma2"])
def test_int4_hot_templates_of_other_families_are_the_builders_merged_models(family, tmp_path):
    """Qwen2 (biases beside q|k|v), Phi-3 (packed in the model; gate_up split by the builder) and Gemma 2 (every
    projection, sliding windows). Their int4 graphs stray up to 0.53 of the logits' scale from PyTorch on these
    tiny random models (Gemma 2): the export's tolerance is raised here, whose subject is the builder's int4."""
    built = _build(tmp_path, family)
    graph = _export(built, "int4", hot_template=True, tolerance=0.8)
    _assert_the_builders_int4_of_the_merged_model(built, graph, family, tmp_path)


def test_a_tampered_merge_file_is_refused(llama, tmp_path):
    """The template's digest covers its merge file: an edited one is never served."""
    import shutil

    from vera_runtime import GraphError

    folder = tmp_path / "copy"
    shutil.copytree(llama[2].parent, folder)
    merge = folder / "model.hot.merge.safetensors"
    data = bytearray(merge.read_bytes())
    data[-1] ^= 0x40  # a float of the last weight
    merge.write_bytes(bytes(data))
    session = _session(folder / "model.onnx")
    with pytest.warns(RuntimeWarning, match="is not the template exported"), pytest.raises(GraphError):
        session.specialize("beta").result()


def test_a_hot_template_that_differs_from_the_graph_fails_the_export(llama, monkeypatch):
    """Each task's hot session must compute what the graph does with that task: a template whose folded
    weights are off (here doubled) is caught, and nothing is written."""
    built = llama[0]
    real = _graft._hot_weight
    monkeypatch.setattr(_graft, "_hot_weight", lambda op, group: op("Add", *[real(op, group)] * 2))
    with pytest.raises(VeraExportError, match="hot template, task '(alpha|beta)', vs the graph"):
        _export(built, "fp32", name="bad-template", hot_template=True)
    assert not list((built.root / "bad-template-fp32").iterdir())


def test_an_int4_hot_template_that_cannot_rebuild_the_builders_weights_fails_the_export(llama, monkeypatch):
    """The weights the merge file keeps must be those the builder quantized: with k and v swapped in the packed
    q|k|v, ONNX Runtime's quantization of them is not the builder's int4 blocks, and nothing is written."""
    built = llama[0]
    monkeypatch.setitem(_graft._PACKED, "qkv_proj", ("q_proj", "v_proj", "k_proj"))
    with pytest.raises(VeraExportError, match="int4 quantization of the model's weights for .*qkv_proj.* is not the"):
        _export(built, "int4", name="unbuildable", hot_template=True)
    assert not list((built.root / "unbuildable-int4").iterdir())


def test_an_int4_merge_plan_with_a_delta_out_of_place_fails_the_export(llama, monkeypatch):
    """The plan's merged weights must be PEFT's: v's delta moved onto q's columns is caught before anything
    is written."""
    built = llama[0]
    real = _merge_template._plan_entry

    def misplaced(node, fp32, group):
        entry = real(node, fp32, group)
        entry["parts"][-1]["offset"] = 0
        return entry

    monkeypatch.setattr(_merge_template, "_plan_entry", misplaced)
    with pytest.raises(VeraExportError, match="merged weight of .*qkv_proj.* differs from PEFT's merged weight"):
        _export(built, "int4", name="misplaced", hot_template=True)
    assert not list((built.root / "misplaced-int4").iterdir())


def test_an_int4_hot_session_that_does_not_take_its_weights_fails_the_export(llama, monkeypatch):
    """Each merged hot session must run the weights its task's plan gives: one built without them (the
    builder's base weights) differs from a copy of the template with them written in, and nothing is written."""
    from vera_export import _verify_fused

    built = llama[0]
    real = _verify_fused._hot_session
    monkeypatch.setattr(_verify_fused, "_hot_session", lambda template, tensors, merges: real(template, {}, merges))
    with pytest.raises(VeraExportError, match="task '(alpha|beta)' merged, vs its weights written in the graph"):
        _export(built, "int4", name="untaken", hot_template=True)
    assert not list((built.root / "untaken-int4").iterdir())


@pytest.mark.parametrize("plan, message", [
    ('[{"weight": 1}]', "a plan entry has not the fields"),
    ("not json", "its plan"),
    (None, "does not fit the graph's task inputs"),  # the real plan, v's columns past the weight's
])
def test_a_malformed_merge_file_is_refused_with_its_name(llama, tmp_path, plan, message):
    import json as json_

    from safetensors.numpy import load_file, save_file

    from vera_runtime import GraphError
    from vera_runtime._header import read_header
    from vera_runtime.files import MergePlan
    from vera_runtime.layout import KEY_MERGE

    source = llama[2].with_name("model.hot.merge.safetensors")
    if plan is None:
        entries = json_.loads(read_header(source).metadata[KEY_MERGE])
        entries[0]["parts"][-1]["offset"] = 10_000
        plan = json_.dumps(entries)
    path = tmp_path / "m.hot.merge.safetensors"
    save_file(load_file(source), path, metadata={KEY_MERGE: plan})
    with pytest.raises(GraphError, match=f"{path}.*{message}.*export again with --hot-template"):
        MergePlan(path, _session(llama[2]).contract)


def test_a_branch_in_the_wrong_slot_fails_the_export(llama, monkeypatch):
    """The packed q|k|v offsets matter: with k and v swapped, v's delta lands on k's columns, PEFT disagrees,
    and nothing is written."""
    built = llama[0]
    monkeypatch.setitem(_graft._PACKED, "qkv_proj", ("q_proj", "v_proj", "k_proj"))
    with pytest.raises(VeraExportError, match="differs from PyTorch"):
        _export(built, "fp32", name="swapped")
    assert not list((built.root / "swapped-fp32").iterdir())


def test_layers_the_builder_has_no_place_for_are_refused(llama):
    built, fp32, _ = llama
    import onnx_ir as ir

    from vera_runtime import LayerSpec

    model = ir.load(fp32)
    with pytest.raises(VeraExportError, match="'base_model.model.lm_head' cannot be grafted.*not a projection"):
        _graft.find_targets(model, (LayerSpec("base_model.model.lm_head", 64, 1000),), {})
    with pytest.raises(VeraExportError, match="no MatMul for it under /model/layers.0/attn/"):
        _graft.find_targets(model, (LayerSpec("m.layers.0.self_attn.rotary", 64, 64),), {})


def test_a_builder_python_without_genai_and_a_base_without_tokenizer_are_refused(llama, tmp_path):
    built = llama[0]
    with pytest.raises(VeraExportError, match="cannot import onnxruntime-genai's model builder.*--builder-python"):
        export_fused(built.adapters, tmp_path / "m.onnx", base=built.base, builder=sys.executable)  # no genai here
    with pytest.raises(VeraExportError, match="precision 'int8' is not one of fp32, int4"):
        export_fused(built.adapters, tmp_path / "m.onnx", base=built.base, precision="int8", builder=genai_python())
    bare = make_base(tmp_path / "bare", "llama", hidden_size=64)
    with pytest.raises(VeraExportError, match="has no tokenizer"):
        export_fused(built.adapters, tmp_path / "m.onnx", base=bare, builder=genai_python())
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("model, extra, message", [
    ("alpha", ["--input", "input_ids:int64:batch=1,sequence=4"], "--input do not apply to --fused"),
    ("model.pt", [], "--fused exports PEFT adapter folders"),
])
def test_the_cli_refuses_what_fused_cannot_do(llama, tmp_path, model, extra, message):
    built = llama[0]
    (tmp_path / "model.pt").write_bytes(b"")
    source = built.adapters.get(model, str(tmp_path / model))
    result = CliRunner().invoke(main, [source, "--base", str(built.base), "--fused", "fp32",
                                       "--out", str(tmp_path / "m.onnx"), *extra])
    assert result.exit_code == 2 and message in result.output, result.output


def test_the_cli_exports_fused(llama, tmp_path):
    built = llama[0]
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, [built.adapters["alpha"], "--base", str(built.base), "--fused", "int4",
                                       "--builder-python", str(genai_python()), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "vs each task alone" not in result.output  # one task: no per-row check to report
    assert out.with_name("m.onnx.data").is_file() and out.with_name("m.alpha.onnx_adapter").is_file()
    assert json.loads(out.with_name("genai_config.json").read_text())["model"]["decoder"]["filename"] == "m.onnx"


def test_vera_run_generate_runs_the_fused_graph(llama, capsys):
    """Prompts of unequal length, a task per row, through the CLI: each line is what the session generates."""
    from tokenizers import Tokenizer

    from vera_runtime.cli import main as vera_run

    built, _, int4 = llama
    prompts = ["w5 w17 w300 w42", "w7 w8"]
    tokenizer = Tokenizer.from_file(str(built.base / "tokenizer.json"))
    assert vera_run(["generate", str(int4), "--prompt", prompts[0], "--prompt", prompts[1], "--tasks", "alpha,beta",
                     "--max-new-tokens", "6", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    session = _session(int4)
    for line, prompt, task in zip(lines, prompts, ("alpha", "beta"), strict=True):
        ids = np.array([tokenizer.encode(prompt).ids])
        new = session.generate(ids, task=task, max_new_tokens=6)[0, ids.shape[1]:]
        assert line == f"[{task}] {tokenizer.decode(new.tolist(), skip_special_tokens=True)}"


def test_convert_refuses_a_fused_graph(llama, tmp_path):
    from vera_export import convert

    with pytest.raises(VeraExportError, match="is a fused graph.*--fused int4"):
        convert(llama[1], tmp_path / "m.int4.onnx", "int4")
    assert not (tmp_path / "m.int4.onnx").exists()

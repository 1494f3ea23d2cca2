"""PEFT save_pretrained folders in: one graph, one task file per adapter, equal to PEFT itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft_folders import FAMILIES, example_feeds, make_adapter, make_base, model_class

from helpers import assert_clean_failure
from vera_export.cli import main
from vera_runtime import VeraSession

FAMILY_NAMES = list(FAMILIES)
TASKS = ("first", "second", "third")

_EXPORTED: dict[str, tuple] = {}


def _invoke(*args) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _duplicate_modules_to_save(adapter) -> None:
    """PEFT extends a reused VeraConfig's modules_to_save in place: saved configs can repeat entries."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    if config.get("modules_to_save"):
        config["modules_to_save"] = config["modules_to_save"] * 2
        path.write_text(json.dumps(config))


def exported_family(name: str, tmp_path_factory) -> tuple:
    """A base folder, three adapters and the graph: 'first' and 'second' exported together through the
    CLI, 'third' added with `vera-export task ADAPTER_DIR`. Half the families export adapters saved with
    task_type and add one saved without (PEFT's default); the other half the reverse."""
    if name not in _EXPORTED:
        root = tmp_path_factory.mktemp(name)
        base = make_base(root / "base", name)
        typed = FAMILY_NAMES.index(name) % 2 == 0
        adapters = {
            task: make_adapter(root / task, base, name, seed=seed, typed=typed if task != "third" else not typed)
            for seed, task in enumerate(TASKS, start=1)
        }
        _duplicate_modules_to_save(adapters["second"])
        out = root / "m.onnx"
        _invoke(adapters["first"], "--base", base, "--adapter", f"second={adapters['second']}", "--out", out)
        _invoke("task", adapters["third"], "--base", base, "--graph", out)
        _EXPORTED[name] = name, base, adapters, out
    return _EXPORTED[name]


FAST_FAMILIES = ("bert-cls", "gpt2", "llama")  # a head, Conv1D, a causal LM; the rest run with -m slow


@pytest.fixture(params=[name if name in FAST_FAMILIES else pytest.param(name, marks=pytest.mark.slow)
                        for name in FAMILY_NAMES])
def family(request, tmp_path_factory):
    return exported_family(request.param, tmp_path_factory)


def _peft_outputs(name, base, adapters, feeds) -> dict[str, dict[str, np.ndarray]]:
    """PEFT itself, with each adapter active in turn."""
    from peft import PeftModel

    model = model_class(name).from_pretrained(base, attn_implementation="eager")
    model.config.use_cache = False
    model = PeftModel.from_pretrained(model, adapters["first"], adapter_name="first").eval()
    for task in TASKS[1:]:
        model.load_adapter(adapters[task], adapter_name=task)
    outputs = {}
    for task in TASKS:
        model.set_adapter(task)
        with torch.no_grad():  # PEFT's VeRA layers inside the transformers model: PeftModelForSeq2SeqLM's
            # own forward passes input_ids=None, which Whisper refuses
            output = model.get_base_model()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        outputs[task] = {k: v.numpy() for k, v in output.items() if isinstance(v, torch.Tensor)}
    return outputs


def test_each_task_equals_peft_alone_and_in_a_mixed_batch(family):
    name, base, adapters, out = family
    session = VeraSession(out, device="cpu")
    assert session.load_tasks_beside() == list(TASKS)
    feeds = example_feeds(session.inputs)
    want = _peft_outputs(name, base, adapters, feeds)
    got = {task: session.run(feeds, task=task) for task in TASKS}
    for task in TASKS:
        for key in session.output_names:
            scale = np.abs(want[task][key]).max()
            assert np.abs(got[task][key] - want[task][key]).max() <= 1e-5 * scale, (task, key)
    key = session.output_names[0]
    assert not np.allclose(got["first"][key], got["third"][key])
    mixed = session.run(feeds, tasks=list(TASKS))  # row i runs task i
    for row, task in enumerate(TASKS):
        scale = np.abs(want[task][key][row]).max()
        assert np.abs(mixed[key][row] - want[task][key][row]).max() <= 1e-5 * scale, (row, task)


def test_the_exporters_onnx_adapter_files_load_and_equal_the_task_files(family):
    _, _, _, out = family
    session = VeraSession(out, device="cpu")
    session.load_tasks_beside()
    feeds = example_feeds(session.inputs, batch=2)
    for task in TASKS:
        session.load_task(f"{task}-adapter", out.with_name(f"m.{task}.onnx_adapter"))
        for key, value in session.run(feeds, task=task).items():
            np.testing.assert_array_equal(session.run(feeds, task=f"{task}-adapter")[key], value)


@pytest.mark.parametrize(("name", "heads"), [
    ("bert-cls", {"classifier": (3, 32)}),
    pytest.param("distilbert-cls", {"pre_classifier": (32, 32), "classifier": (3, 32)}, marks=pytest.mark.slow),
    ("roberta-cls", {"classifier.dense": (32, 32), "classifier.out_proj": (3, 32)}),
])
def test_heads_are_every_linear_that_peft_saved(name, heads, tmp_path_factory):
    _, _, adapters, out = exported_family(name, tmp_path_factory)
    session = VeraSession(out, device="cpu")
    shapes = session.contract.task_shapes()
    assert {h.name.removeprefix("base_model.model.") for h in session.contract.heads} == set(heads)
    for head, shape in heads.items():
        assert shapes[f"base_model.model.{head}.weight"] == shape
        assert shapes[f"base_model.model.{head}.bias"] == shape[:1]
    # PEFT's own adapter file loads as a task too: its keys map 1:1 onto the graph's task inputs
    session.load_task("peft-file", adapters["second"] / "adapter_model.safetensors")
    session.load_tasks_beside()
    feeds = example_feeds(session.inputs, batch=2)
    from_peft, from_ours = (session.run(feeds, task=task)["logits"] for task in ("peft-file", "second"))
    np.testing.assert_array_equal(from_peft, from_ours)
    listed = CliRunner().invoke(main, ["inspect", str(out)])
    assert f"{len(heads)} per-task head layers" in listed.output
    assert all(f"base_model.model.{head}  in=32" in listed.output for head in heads)


def _fail(args, out_dir, *fragments):
    assert_clean_failure(CliRunner().invoke(main, [str(a) for a in args]), out_dir, *fragments, exit_code=1)


def test_folder_without_adapter_config(bert_folders, tmp_path):
    base = bert_folders.base
    (tmp_path / "empty").mkdir()
    _fail([tmp_path / "empty", "--base", base, "--out", tmp_path / "m.onnx"], tmp_path,
          "has no adapter_config.json", "save_pretrained")


def test_lora_adapter_is_refused(bert_folders, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = bert_folders.base
    lora = get_peft_model(model_class("bert-features").from_pretrained(base), LoraConfig(target_modules=["query"]))
    lora.save_pretrained(tmp_path / "lora")
    _fail([tmp_path / "lora", "--base", base, "--out", tmp_path / "m.onnx"], tmp_path, "holds a LORA adapter, not VeRA")


@pytest.mark.parametrize(("field", "value", "shown"), [("projection_prng_key", 5, "(0 vs 5)"), ("r", 8, "(16 vs 8)")])
def test_adapters_with_mismatched_seed_or_rank(bert_folders, tmp_path, field, value, shown):
    base, good = bert_folders.base, bert_folders.first
    other = make_adapter(tmp_path / "other", base, "bert-features", seed=2, **{field: value})
    _fail([good, "--base", base, "--adapter", f"other={other}", "--out", tmp_path / "m.onnx"], tmp_path,
          f"adapters 'first' and 'other' cannot share one graph: {field} differs {shown}")


def test_base_folder_that_does_not_match_the_adapter_names_each_class_tried(bert_folders, tmp_path):
    good = bert_folders.first
    wrong = make_base(tmp_path / "wrong-base", "bert-features", num_hidden_layers=1)
    _fail([good, "--base", wrong, "--out", tmp_path / "m.onnx"], tmp_path,
          f"base model {wrong} does not match adapter {good}: no class reproduces its saved keys",
          "BertModel (auto_mapping): 'base_model.model.encoder.layer.1.attention.self.query.vera_lambda_b'"
          " has no such layer", "AutoModel (fallback)", "or its class with --model-class NAME")


@pytest.mark.slow
def test_model_class_option_chooses_the_class_and_is_checked_too(bert_folders, tmp_path):
    base, good = bert_folders.base, bert_folders.first
    _fail([good, "--base", base, "--model-class", "NoSuchModel", "--out", tmp_path / "m.onnx"], tmp_path,
          "Tried NoSuchModel (--model-class): not a transformers class")
    _fail([good, "--base", base, "--model-class", "BertForMaskedLM", "--out", tmp_path / "m.onnx"], tmp_path,
          "BertForMaskedLM (--model-class): 'base_model.model.bert.encoder.layer.0.attention.self.query")
    result = CliRunner().invoke(main, [str(a) for a in (good, "--base", base, "--model-class", "BertModel",
                                                         "--out", tmp_path / "m.onnx", "--no-verify")])
    assert result.exit_code == 0, result.output


def test_peft_options_on_a_model_file_are_usage_errors(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    result = CliRunner().invoke(main, [str(tmp_path / "model.pt"), "--model-class", "BertModel", "--out",
                                       str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--model-class applies to PEFT adapter folders" in result.output


def test_head_with_parameters_outside_linear_layers_is_refused(bert_folders, tmp_path):
    base = bert_folders.base
    odd = make_adapter(tmp_path / "odd", base, "bert-features", seed=2, modules_to_save=["embeddings.LayerNorm"])
    _fail([odd, "--base", base, "--out", tmp_path / "m.onnx"], tmp_path,
          "modules_to_save 'base_model.model.embeddings.LayerNorm' (LayerNorm) has parameter 'weight' in a"
          " LayerNorm: only nn.Linear layers", "Leave 'LayerNorm' out of modules_to_save")


@pytest.mark.slow
def test_task_command_refuses_an_adapter_of_another_graph(bert_folders, tmp_path):
    base, good = bert_folders.base, bert_folders.first
    out = tmp_path / "m.onnx"
    assert CliRunner().invoke(main, [str(good), "--base", str(base), "--out", str(out), "--no-verify"]).exit_code == 0
    other = make_adapter(tmp_path / "other", base, "bert-features", seed=2, projection_prng_key=5)
    result = CliRunner().invoke(main, ["task", str(other), "--base", str(base), "--graph", str(out)])
    assert result.exit_code == 1 and "do not fit" in result.stderr, result.output
    result = CliRunner().invoke(main, ["task", str(tmp_path), "--base", str(base), "--graph", str(out)])
    assert result.exit_code == 1 and "has no adapter_config.json" in result.stderr, result.output
    names = sorted(p.name for p in tmp_path.glob("m.*"))
    assert names == ["m.first.onnx_adapter", "m.first.task.safetensors", "m.onnx"]


@pytest.mark.slow
def test_base_defaults_to_the_adapters_local_base_folder_else_must_be_given(bert_folders, tmp_path):
    base, good = bert_folders.base, bert_folders.first
    config = json.loads((good / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)  # PEFT records the folder it loaded
    result = CliRunner().invoke(main, [str(good), "--out", str(tmp_path / "m.onnx"), "--no-verify"])
    assert result.exit_code == 0, result.output
    hub = tmp_path / "hub"
    shutil.copytree(good, hub)
    config["base_model_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"
    (hub / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "m.onnx").unlink()
    for leftover in tmp_path.glob("m.*"):
        leftover.unlink()
    _fail([hub, "--out", tmp_path / "m.onnx"], tmp_path, "'sentence-transformers/all-MiniLM-L6-v2', which is not",
          "pass the base model's folder with --base")


@pytest.mark.slow
def test_bias_modes_shared_biases_export_and_differing_ones_are_refused(bert_folders, tmp_path):
    base = bert_folders.base
    first = make_adapter(tmp_path / "first", base, "bert-features", seed=3, bias="vera_only")
    out = tmp_path / "one" / "m.onnx"
    out.parent.mkdir()
    result = CliRunner().invoke(main, [str(first), "--base", str(base), "--out", str(out)])
    assert result.exit_code == 0, result.output  # its verification compares against PEFT's own forward
    second = make_adapter(tmp_path / "second", base, "bert-features", seed=4, bias="vera_only")
    (tmp_path / "two").mkdir()
    _fail([first, "--base", base, "--adapter", f"second={second}", "--out", tmp_path / "two" / "m.onnx"],
          tmp_path / "two", "train different biases", "bias='vera_only'")


@pytest.mark.slow
def test_input_specs_replace_the_defaults(tmp_path_factory, tmp_path):
    """--input describes every model input itself: no text defaults are computed for a vision model."""
    _, base, adapters, _ = exported_family("vit", tmp_path_factory)
    out = tmp_path / "m.onnx"
    spec = "pixel_values:float32:batch=2,3,32,32"
    result = CliRunner().invoke(main, [str(adapters["first"]), "--base", str(base), "--input", spec, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert list(VeraSession(out, device="cpu").inputs) == ["pixel_values"]

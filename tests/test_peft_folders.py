"""PEFT save_pretrained folders in: one graph, one task file per adapter, equal to PEFT itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft_folders import FAMILIES, make_adapter, make_base, model_class

from vera_export.cli import main
from vera_runtime import VeraSession

FAMILY_NAMES = list(FAMILIES)


_EXPORTED: dict[str, tuple] = {}


def exported_family(name: str, tmp_path_factory) -> tuple:
    """A base folder, two adapters (first and second) and the graph exported from both, once per family."""
    if name not in _EXPORTED:
        root = tmp_path_factory.mktemp(name)
        base = make_base(root / "base", name)
        first = make_adapter(root / "first", base, name, seed=1)
        second = make_adapter(root / "second", base, name, seed=2)
        out = root / "m.onnx"
        args = [first, "--base", base, "--task", f"second={second}", "--out", out]
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        _EXPORTED[name] = name, base, {"first": first, "second": second}, out
    return _EXPORTED[name]


@pytest.fixture(params=FAMILY_NAMES)
def family(request, tmp_path_factory):
    return exported_family(request.param, tmp_path_factory)


def _peft_outputs(name, base, adapters, adapter, ids, mask):
    from peft import PeftModel

    model = model_class(name).from_pretrained(base, attn_implementation="eager")
    model.config.use_cache = False
    model = PeftModel.from_pretrained(model, adapters["first"], adapter_name="first")
    model.load_adapter(adapters["second"], adapter_name="second")
    model.set_adapter(adapter)
    with torch.no_grad():
        output = model.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return {k: v.numpy() for k, v in output.items() if isinstance(v, torch.Tensor)}


def test_each_task_file_equals_peft_with_that_adapter_active(family):
    name, base, adapters, out = family
    session = VeraSession(out, device="cpu")
    assert session.load_tasks_beside() == ["first", "second"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[2, 6:] = 0
    results = {}
    for adapter in ("first", "second"):
        want = _peft_outputs(name, base, adapters, adapter, ids, mask)
        got = session.run({"input_ids": ids, "attention_mask": mask}, task=adapter)
        for key in want:
            scale = np.abs(want[key]).max()
            assert np.abs(got[key] - want[key]).max() <= 1e-5 * scale, (adapter, key)
        results[adapter] = got
    key = session.output_names[0]
    assert not np.allclose(results["first"][key], results["second"][key])
    mixed = session.run({"input_ids": ids, "attention_mask": mask}, tasks=["second", "first", "second"])
    for row, adapter in enumerate(["second", "first", "second"]):
        np.testing.assert_allclose(mixed[key][row], results[adapter][key][row], rtol=0, atol=1e-5)


def test_heads_are_task_inputs_for_classification(tmp_path_factory):
    _, _, adapters, out = exported_family("bert-cls", tmp_path_factory)
    session = VeraSession(out, device="cpu")
    shapes = session.contract.task_shapes()
    assert shapes["base_model.model.classifier.weight"] == (3, 64)
    assert shapes["base_model.model.classifier.bias"] == (3,)
    # PEFT's own adapter file loads as a task too: its keys map 1:1 onto the graph's task inputs
    session.load_task("peft-file", adapters["second"] / "adapter_model.safetensors")
    session.load_tasks_beside()
    ids = np.ones((1, 5), np.int64)
    feeds = {"input_ids": ids, "attention_mask": ids}
    from_peft, from_ours = (session.run(feeds, task=name)["logits"] for name in ("peft-file", "second"))
    np.testing.assert_array_equal(from_peft, from_ours)


def _fail(args, out_dir, *fragments):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in error[0]
    assert not [p for p in out_dir.rglob("*") if p.suffix in (".onnx", ".onnx_adapter") or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = make_base(root / "base", "bert-features")
    return root, base, make_adapter(root / "good", base, "bert-features", seed=1)


def test_folder_without_adapter_config(bert_folders, tmp_path):
    root, base, _ = bert_folders
    (tmp_path / "empty").mkdir()
    _fail([tmp_path / "empty", "--base", base, "--out", tmp_path / "m.onnx"], tmp_path,
          "has no adapter_config.json", "save_pretrained")


def test_lora_adapter_is_refused(bert_folders, tmp_path):
    from peft import LoraConfig, get_peft_model

    root, base, _ = bert_folders
    lora = get_peft_model(model_class("bert-features").from_pretrained(base), LoraConfig(target_modules=["query"]))
    lora.save_pretrained(tmp_path / "lora")
    _fail([tmp_path / "lora", "--base", base, "--out", tmp_path / "m.onnx"], tmp_path, "holds a LORA adapter, not VeRA")


@pytest.mark.parametrize(("field", "value", "shown"), [("projection_prng_key", 5, "(0 vs 5)"), ("r", 8, "(16 vs 8)")])
def test_adapters_with_mismatched_seed_or_rank(bert_folders, tmp_path, field, value, shown):
    root, base, good = bert_folders
    other = make_adapter(tmp_path / "other", base, "bert-features", seed=2, **{field: value})
    _fail([good, "--base", base, "--task", f"other={other}", "--out", tmp_path / "m.onnx"], tmp_path,
          f"adapters 'good' and 'other' cannot share one graph: {field} differs {shown}")


def test_base_folder_that_does_not_match_the_adapter(bert_folders, tmp_path):
    _, _, good = bert_folders
    wrong = make_base(tmp_path / "wrong-base", "bert-features", hidden_size=32, intermediate_size=64)
    _fail([good, "--base", wrong, "--out", tmp_path / "m.onnx"], tmp_path, "does not match")


def test_base_defaults_to_the_adapters_local_base_folder_else_must_be_given(bert_folders, tmp_path):
    _, base, good = bert_folders
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


def test_bias_modes_shared_biases_export_and_differing_ones_are_refused(bert_folders, tmp_path):
    _, base, _ = bert_folders
    first = make_adapter(tmp_path / "first", base, "bert-features", seed=3, bias="vera_only")
    out = tmp_path / "one" / "m.onnx"
    out.parent.mkdir()
    result = CliRunner().invoke(main, [str(first), "--base", str(base), "--out", str(out)])
    assert result.exit_code == 0, result.output  # its verification compares against PEFT's own forward
    second = make_adapter(tmp_path / "second", base, "bert-features", seed=4, bias="vera_only")
    (tmp_path / "two").mkdir()
    _fail([first, "--base", base, "--task", f"second={second}", "--out", tmp_path / "two" / "m.onnx"],
          tmp_path / "two", "train different biases", "bias='vera_only'")

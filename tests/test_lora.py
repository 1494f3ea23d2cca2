"""``vera-export lora``: a VeRA task as the LoRA computing the same function, checked against the real
clients: PEFT's LoRA over the base (every family of the test matrix) and onnxruntime-genai's model builder,
whose model with the LoRA baked in must generate PEFT VeRA's greedy tokens."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft_folders import FAMILIES, add_tokenizer, make_adapter, make_base, model_class
from safetensors import safe_open

import vera_models
from helpers import genai_python
from vera_export import VeraExportError, export_lora, export_peft, save_checkpoint
from vera_export import _lora as lora_module
from vera_export._layer import VeraLinear
from vera_export.cli import main as cli

EXACT = 1e-5
# the test matrix's kinds: encoder heads (one Linear, RoBERTa's dense+out_proj, DistilBERT's pre_classifier),
# causal LMs, GPT-2's Conv1D (fan_in_fan_out), an encoder-decoder and a vision model
LORA_FAMILIES = ["bert-cls", "roberta-cls", "distilbert-cls", "llama", "opt", "gpt2", "t5-seq2seq", "vit"]
GRAPHS = ["bert-cls", "roberta-cls", "gpt2"]  # the families whose task files are exported to LoRA too


def _peft(base: Path, family: str, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model_class(family).from_pretrained(base), str(adapter)).eval()


def _outputs(peft_model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = peft_model.base_model.model(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()})
    return out.logits.numpy()


def _feeds(family: str) -> dict[str, np.ndarray]:
    """Inputs of our own making (not the exporter's examples): ids, a right-padded row, decoder ids, pixels."""
    rng = np.random.default_rng(7)
    if family == "vit":
        return {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    feeds = {"input_ids": rng.integers(0, 1000, (2, 9)), "attention_mask": np.ones((2, 9), np.int64)}
    feeds["attention_mask"][1, 6:] = 0
    if family == "t5-seq2seq":
        feeds["decoder_input_ids"] = rng.integers(0, 1000, (2, 4))
    return feeds


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per family: a base folder, a VeRA adapter over it, and (for GRAPHS) a graph exported from the adapter."""
    root = tmp_path_factory.mktemp("lora")
    made = {}
    for family in LORA_FAMILIES:
        base = make_base(root / family / "base", family)
        adapter = make_adapter(root / family / "topic", base, family, seed=3)
        graph = root / family / "graph" / "m.onnx"
        if family in GRAPHS:
            graph.parent.mkdir()
            export_peft({"topic": adapter}, graph, base=base)
        made[family] = (base, adapter, graph)
    return made


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_peft_lora_equals_peft_vera(family, folders, tmp_path):
    base, adapter, _ = folders[family]
    result = export_lora(adapter, tmp_path / "lora")
    assert result.exact.relative <= EXACT
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    vera = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", vera["r"], vera["r"])
    assert sorted(config["target_modules"]) == sorted(FAMILIES[family].targets)
    assert config["fan_in_fan_out"] == (family == "gpt2")
    if FAMILIES[family].head:  # the trained head comes along, under PEFT's saved keys
        assert set(FAMILIES[family].head) <= set(config["modules_to_save"])
    feeds = _feeds(family)
    vera_out = _outputs(_peft(base, family, adapter), feeds)
    lora_out = _outputs(_peft(base, family, tmp_path / "lora"), feeds)
    assert _relative(lora_out, vera_out) <= EXACT
    with torch.no_grad():
        bare = model_class(family).from_pretrained(base).eval()
        plain = bare(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}).logits.numpy()
    assert _relative(plain, vera_out) > 1e-3  # the task does change the outputs: equal is not trivially so


def test_the_lora_factors_are_the_vera_layers_own(folders, tmp_path):
    """lora_A = Λd ⊙ A[:, :in], lora_B = Λb ⊙ B[:out, :], read back from the files."""
    base, adapter, _ = folders["llama"]
    export_lora(adapter, tmp_path / "lora")
    vera = _peft(base, "llama", adapter)
    layer = vera.base_model.model.model.layers[1].self_attn.v_proj
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as f:
        lora_a, lora_b = f.get_tensor(f"{key}.lora_A.weight"), f.get_tensor(f"{key}.lora_B.weight")
    vera_a = layer.vera_A["default"][:, : layer.in_features]
    vera_b = layer.vera_B["default"][: layer.out_features, :]
    torch.testing.assert_close(lora_a, layer.vera_lambda_d["default"].detach()[:, None] * vera_a)
    torch.testing.assert_close(lora_b, layer.vera_lambda_b["default"].detach()[:, None] * vera_b)


@pytest.mark.parametrize("options", [{"bias": "vera_only"}, {"bias": "all"}, {"layers_to_transform": [1]},
                                     {"save_projection": False}],
                         ids=["bias-vera_only", "bias-all", "layers_to_transform", "A-B-from-the-seed"])
def test_bias_modes_layer_selection_and_unsaved_projections_carry_over(options, tmp_path):
    base = make_base(tmp_path / "base", "bert-cls")
    adapter = make_adapter(tmp_path / "vera", base, "bert-cls", seed=5, **options)
    export_lora(adapter, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    expected = {"bias": {"vera_only": "lora_only"}.get(options.get("bias"), options.get("bias", "none"))}
    if "layers_to_transform" in options:
        expected["layers_to_transform"] = [1]
    assert {key: config[key] for key in expected} == expected
    feeds = {"input_ids": np.random.default_rng(1).integers(0, 1000, (2, 9)), "attention_mask": np.ones((2, 9), int)}
    assert _relative(_outputs(_peft(base, "bert-cls", tmp_path / "lora"), feeds),
                     _outputs(_peft(base, "bert-cls", adapter), feeds)) <= EXACT


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_are_checked_in_float32_and_as_written(dtype, folders, tmp_path):
    base, adapter, _ = folders["llama"]
    result = export_lora(adapter, tmp_path / "lora", dtype=dtype)
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    assert result.exact.relative <= EXACT < result.written.relative < 0.05
    assert result.lora_bytes < export_lora(adapter, tmp_path / "fp32").lora_bytes * 0.6


@pytest.mark.parametrize("family", GRAPHS)
def test_a_task_file_of_a_graph_gives_the_same_lora_as_its_folder(family, folders, tmp_path):
    base, adapter, graph = folders[family]
    export_lora(adapter, tmp_path / "from-folder")
    for source in (graph.with_name("m.topic.task.safetensors"), graph.with_name("m.topic.onnx_adapter")):
        out = tmp_path / source.name.replace(".", "-")
        result = export_lora(source, out, graph=graph, base=base)
        assert result.exact.relative <= EXACT
        with safe_open(out / "adapter_model.safetensors", "pt") as got, \
                safe_open(tmp_path / "from-folder" / "adapter_model.safetensors", "pt") as want:
            assert set(got.keys()) == set(want.keys())
            for key in want.keys():
                torch.testing.assert_close(got.get_tensor(key), want.get_tensor(key), rtol=0, atol=0)


def test_a_task_file_over_another_base_is_refused(folders, tmp_path):
    """Same architecture, other weights: the fingerprint says it is not the graph's base."""
    _, _, graph = folders["bert-cls"]
    other = make_base(tmp_path / "other", "bert-cls", initializer_range=0.5)
    with pytest.raises(VeraExportError, match=r"not the one .*m.onnx was exported from"):
        export_lora(graph.with_name("m.topic.task.safetensors"), tmp_path / "lora", graph=graph, base=other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_task_file_needs_its_graph_and_base(folders, tmp_path):
    base, _, graph = folders["bert-cls"]
    task = graph.with_name("m.topic.task.safetensors")
    with pytest.raises(VeraExportError, match=r"give the graph it belongs to with --graph"):
        export_lora(task, tmp_path / "lora", base=base)
    with pytest.raises(VeraExportError, match=r"give its folder with --base"):
        export_lora(task, tmp_path / "lora", graph=graph)


def test_a_checkpoint_becomes_a_lora_of_its_vera_layers(tmp_path):
    """Our own layers: PEFT's LoRA over the model with each VeraLinear put back to its nn.Linear."""
    from peft import PeftModel

    model = vera_models.make_task(vera_models.build("tiny-decoder"), 2).eval()
    save_checkpoint(model, tmp_path / "m.pt", "topic")
    result = export_lora(tmp_path / "m.pt", tmp_path / "lora")
    names = {name for name, module in model.named_modules() if isinstance(module, VeraLinear)}
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == names and result.layers == len(names)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids)["logits"]
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, model.get_submodule(name).base_layer)
        got = PeftModel.from_pretrained(model, str(tmp_path / "lora")).eval()(ids)["logits"]
    assert float((got - want).abs().max() / want.abs().max()) <= EXACT


def test_a_wrong_translation_is_refused_and_nothing_is_written(folders, tmp_path, monkeypatch):
    """The check can fail: a LoRA 1% off is not the VeRA task."""
    _, adapter, _ = folders["llama"]
    real = lora_module.lora_tensors
    monkeypatch.setattr(lora_module, "lora_tensors", lambda *a: {k: v * 1.01 for k, v in real(*a).items()})
    with pytest.raises(VeraExportError, match=r"PEFT's LoRA differs from the VeRA model .* nothing was written"):
        export_lora(adapter, tmp_path / "lora")
    assert list(tmp_path.iterdir()) == []


def test_the_output_folder_is_new_or_a_previous_lora(folders, tmp_path):
    base, adapter, _ = folders["bert-cls"]
    export_lora(adapter, tmp_path / "lora")
    export_lora(adapter, tmp_path / "lora", dtype="float16")  # replaces its own two files
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(VeraExportError, match=r"busy already holds 'notes.txt': give a new or empty folder"):
        export_lora(adapter, tmp_path / "busy")
    with pytest.raises(VeraExportError, match=r"an input of this command"):
        export_lora(adapter, adapter)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "lora"]


def test_cli_prints_the_check_and_the_sizes(folders, tmp_path):
    _, adapter, _ = folders["llama"]
    result = CliRunner().invoke(cli, ["lora", str(adapter), "--out", str(tmp_path / "lora"), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert "PEFT LoRA (float32) vs VeRA: max |diff|" in result.output
    assert "PEFT LoRA (as written) vs VeRA" in result.output
    assert "a rank-16 LoRA of 4 layers" in result.output and "the VeRA task itself is 640 B" in result.output
    failed = CliRunner().invoke(cli, ["lora", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert failed.exit_code == 1 and "missing" in failed.output


@pytest.mark.slow
def test_onnxruntime_genai_builder_bakes_the_lora_and_generates_peft_veras_tokens(tmp_path):
    """The builder (fp32, CPU) with --extra_options adapter_path=LORA_DIR: greedy tokens equal PEFT VeRA's,
    and differ from the bare base's. GroupQueryAttention needs a head size that is a multiple of 16."""
    python = genai_python("onnxruntime_genai.models.builder", "torch", "transformers", "peft")
    base = add_tokenizer(make_base(tmp_path / "base", "llama", hidden_size=64, intermediate_size=128), 1000)
    adapter = make_adapter(tmp_path / "vera", base, "llama", seed=1)
    export_lora(adapter, tmp_path / "lora")
    built = tmp_path / "built"
    build = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(built), "-p", "fp32",
             "-e", "cpu", "-c", str(tmp_path / "cache"), "--extra_options", f"adapter_path={tmp_path / 'lora'}"]
    done = subprocess.run(build, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    prompt, new = [5, 17, 300, 42], 10
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"prompt": prompt, "max_length": len(prompt) + new, "adapters": {"": ""}}))
    script = Path(__file__).parent / "genai" / "generate.py"
    done = subprocess.run([str(python), str(script), str(built), str(request)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)[""]
    vera = _peft(base, "llama", adapter)
    vera.get_base_model().generation_config.eos_token_id = None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = torch.tensor([prompt])
        expected = vera.generate(input_ids=ids, max_new_tokens=new, do_sample=False, pad_token_id=0)[0].tolist()
        with vera.disable_adapter():
            bare = vera.generate(input_ids=ids, max_new_tokens=new, do_sample=False, pad_token_id=0)[0].tolist()
    assert got == expected
    assert bare != expected

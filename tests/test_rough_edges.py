"""What a newcomer and PEFT's own VeRA test cases hit (issue 20, items 7 and 8): each now gets the right
message, or just works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import vera_models
from vera_export import VeraConfig, VeraExportError, add_task, apply_vera, export
from vera_export.cli import main as export_main
from vera_runtime.cli import main as run_main

# -- item 7: a newcomer's first commands ----------------------------------------------------------------


def test_generate_on_a_graph_without_a_cache_names_the_cache_not_the_tokenizer(two_task_encoder, capsys):
    assert run_main(["generate", str(two_task_encoder), "--prompt", "hello"]) == 1
    err = capsys.readouterr().err
    assert "has no KV cache" in err and "tokenizer" not in err, err


def test_an_onnx_file_given_as_the_model_is_named_at_once_without_torch(two_task_encoder, tmp_path):
    code = (
        "import sys\nfrom vera_export.cli import main\n"
        f"try:\n    main([{str(two_task_encoder)!r}, '--out', {str(tmp_path / 'x.onnx')!r}])\n"
        "except SystemExit as e:\n    print('torch' in sys.modules, e.code)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.stdout.split() == ["False", "1"], child.stdout + child.stderr
    assert "is an ONNX graph, not a PyTorch model" in child.stderr and "vera-export inspect" in child.stderr


def test_an_unknown_task_on_the_command_line_says_how_to_load_one(two_task_encoder, encoder_inputs, capsys):
    assert run_main(["run", str(two_task_encoder), "--input", str(encoder_inputs), "--task", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert "--load nosuch=PATH" in err and "load_task()" not in err, err


def test_the_top_level_help_shows_the_peft_folder_form():
    result = CliRunner().invoke(export_main, ["--help"])
    assert result.exit_code == 0 and "vera-export ADAPTER_DIR --base BASE_DIR --out m.onnx" in result.output


def test_a_sliding_window_too_small_to_trace_is_refused_up_front(tmp_path):
    from peft_folders import make_adapter, make_base

    from vera_export import export_peft

    base = make_base(tmp_path / "base", "mistral", sliding_window=6)
    adapter = make_adapter(tmp_path / "adapter", base, "mistral", 1)
    with pytest.raises(VeraExportError, match="sliding window is 6 tokens: too small to trace.*at least 8"):
        export_peft({"a": adapter}, tmp_path / "m.onnx", base=base, kv_cache=True)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_a_sliding_window_of_8_traces_within_its_bound(tmp_path):
    from peft_folders import make_adapter, make_base

    from vera_export import export_peft
    from vera_runtime import VeraSession

    base = make_base(tmp_path / "base", "mistral", sliding_window=8)
    adapter = make_adapter(tmp_path / "adapter", base, "mistral", 1)
    result = export_peft({"a": adapter}, tmp_path / "m.onnx", base=base, kv_cache=True)
    assert result.export.verification.passed
    assert VeraSession(tmp_path / "m.onnx", device="cpu").contract.dim_limits["total_sequence"] == 7


class _Branchy(nn.Module):
    """Control flow on a value: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y if y.sum() > 0 else -y


def test_a_model_torch_export_cannot_trace_gets_the_cause_not_next_steps(tmp_path):
    model = _Branchy()
    apply_vera(model, VeraConfig(target_modules=["proj"], r=4))
    with pytest.raises(VeraExportError, match="torch.export could not trace the model") as error:
        export(model, tmp_path / "m.onnx", inputs=["x:float32:batch=2,8"])
    message = str(error.value)  # torch 2.13: "... the model: GuardOnDataDependentSymNode: Could not guard on ..."
    assert "Next steps" not in message and re.search(r"trace the model: [A-Za-z]+: \w", message), message


# -- item 8: what PEFT's own VeRA test cases hit ----------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(20, 20), nn.Linear(20, 20), nn.Linear(20, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(X)))))


def test_two_adapters_on_different_targets_each_export_as_peft_runs_them(tmp_path):
    """PEFT's test_requires_grad_vera_different_targets: a layer without the active adapter runs as its
    base layer in PEFT's forward, and so it does in the graph."""
    from peft import VeraConfig as PeftVeraConfig
    from peft import get_peft_model

    from helpers import run, session

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_MLP(), PeftVeraConfig(r=8, target_modules=["lin0"], init_weights=False), "adapter0")
        model.add_adapter("adapter1", PeftVeraConfig(r=8, target_modules=["lin1"], init_weights=False))
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    for adapter, layer in (("adapter0", "lin0"), ("adapter1", "lin1")):
        model.set_adapter(adapter)
        result = export(model.eval(), tmp_path / f"{adapter}.onnx", inputs=["X:float32:batch=2,20"])
        assert [spec.name for spec in result.contract.layers] == [f"base_model.model.{layer}"]
        with torch.no_grad():
            want = model(x).numpy()
        got = run(session(result.onnx_path), {"X": x.numpy()})["output"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(VeraExportError, match="adapted layers differ"):  # adapter1's λ cannot ride adapter0's graph
        add_task(model, tmp_path / "adapter0.onnx", "adapter1")


@pytest.mark.slow
def test_a_causal_lm_with_an_attention_mask_spec_verifies(tmp_path):
    """Realistic example masks (padded on the right, no empty row): random 0/1 masks left positions with
    nothing to attend to, and the export failed verification blaming the model class."""
    from conftest import GPT_INPUTS, peft_gpt2

    inputs = [*GPT_INPUTS, "attention_mask:int64<2:batch=2,sequence=8"]
    assert export(peft_gpt2(), tmp_path / "gpt2.onnx", inputs=inputs).verification.passed


def test_a_half_precision_model_is_refused_by_the_library_and_converted_by_the_cli(tmp_path):
    model = vera_models.make_task(vera_models.build("tiny-encoder"), 1).half()
    with pytest.raises(VeraExportError, match=r"has '.*' \(float16\) weights: vera-export traces float32 models"):
        export(model, tmp_path / "lib.onnx")
    assert not (tmp_path / "lib.onnx").exists()
    path = tmp_path / "half.pt"
    torch.save(model, path)
    result = CliRunner().invoke(export_main, [str(path), "--out", str(tmp_path / "cli.onnx")])
    assert result.exit_code == 0, result.output
    assert "(float16) weights; exported in float32" in result.stderr


@pytest.mark.slow
def test_a_pickle_whose_module_is_missing_gets_advice_that_works(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.proj = torch.nn.Linear(4, 4)\n    def forward(self, x):\n        return self.proj(x)\n"
    )
    save = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import torch, mymodels\n"
            "from vera_export import apply_vera, VeraConfig\n"
            "m = mymodels.Net(); apply_vera(m, VeraConfig(target_modules=['proj'], r=2))\n"
            f"torch.save(m, {str(tmp_path / 'net.pt')!r})\n")
    subprocess.run([sys.executable, "-c", save], check=True, timeout=120)
    args = [str(tmp_path / "net.pt"), "--out", str(tmp_path / "net.onnx"), "--trust-pickle",
            "--input", "x:float32:batch=2,4", "--no-verify"]
    result = subprocess.run([sys.executable, "-m", "vera_export.cli", *args], capture_output=True, text=True,
                            timeout=300, cwd="/")
    assert result.returncode == 1 and "PYTHONPATH=FOLDER" in result.stderr, result.stderr
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    again = subprocess.run([sys.executable, "-m", "vera_export.cli", *args], capture_output=True, text=True,
                           timeout=300, cwd="/", env=env)
    assert again.returncode == 0, again.stderr

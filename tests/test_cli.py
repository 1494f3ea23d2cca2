"""The vera-export command: a working export and inspect, and a clean failure for each bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import vera_models
from helpers import CustomNet, assert_clean_failure, export_leftovers
from vera_export import VeraConfig, VeraExportError, apply_vera, save_checkpoint
from vera_export.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "encoder.pt"
    return save_checkpoint(vera_models.make_task(vera_models.build("tiny-encoder"), 1), path, task_name="sentiment")


def test_export_then_inspect(checkpoint, decoder, tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke(checkpoint, "--out", out)
    assert result.exit_code == 0, result.output
    assert "random λ fed as inputs: max |diff|" in result.stderr
    assert (tmp_path / "m.sentiment.task.safetensors").is_file()
    assert (tmp_path / "m.sentiment.onnx_adapter").is_file()
    (tmp_path / "m.foreign.task.safetensors").write_bytes(decoder.result.task_path.read_bytes())
    (tmp_path / "other.default.task.safetensors").write_bytes(decoder.result.task_path.read_bytes())
    (tmp_path / "m.v2.a1.task.safetensors").write_bytes(decoder.result.task_path.read_bytes())  # m.v2.onnx's
    report = invoke("inspect", out)
    assert report.exit_code == 0, report.output
    for expected in ("r=64", "projection seed=0", "default task='sentiment'",
                     "blocks.1.attention.value  in=128 out=128",
                     "input_ids ['batch', 'sequence']", "m.sentiment.task.safetensors  task='sentiment'",
                     "m.foreign.task.safetensors  task='foreign'  (does not fit this graph)", "vera_A + vera_B 65,536"):
        assert expected in report.output
    assert "other.default" not in report.output and "m.v2.a1" not in report.output


def test_help_everywhere():
    for args in ([], ["export"], ["inspect"]):
        result = invoke(*args, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_missing_file(tmp_path):
    assert_clean_failure(invoke(tmp_path / "nope.pt", "--out", tmp_path / "m.onnx"), tmp_path, "nope.pt does not exist")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_model(checkpoint, tmp_path, damage):
    data = checkpoint.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x80\x02garbage" * 100)
    assert_clean_failure(invoke(bad, "--out", tmp_path / "m.onnx"), tmp_path, "bad.pt is not a readable PyTorch file")


def test_pickle_needing_untrusted_code_is_refused_then_loads_when_trusted(tmp_path):
    model = CustomNet()
    apply_vera(model, VeraConfig(["proj"], r=4))
    path = tmp_path / "custom.pt"
    torch.save(model, path)
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke(path, "--out", out, "--input", "x:float32:batch=2,8"),
                         tmp_path, "needs class helpers.CustomNet", "rerun with --trust-pickle")
    result = invoke(path, "--out", out, "--input", "x:float32:batch=2,8", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_model_without_vera_layer(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(vera_models.build_base("tiny-encoder"), path)
    assert_clean_failure(invoke(path, "--out", tmp_path / "m.onnx"), tmp_path,
                         "TinyEncoderClassifier has no VeRA layer", "apply_vera")


def test_unsupported_layer_type(tmp_path):
    with pytest.raises(VeraExportError, match="layer 'conv' is Conv2d; VeRA adapts only nn.Linear"):
        apply_vera(nn.ModuleDict({"conv": nn.Conv2d(3, 3, 3)}), VeraConfig(["conv"], r=4))
    model = nn.Sequential(nn.Linear(8, 8))
    apply_vera(model, VeraConfig(["0"], r=4))
    model[0].base_layer = nn.Embedding(8, 8)  # a VeRA layer around something we cannot export
    path = tmp_path / "odd.pt"
    torch.save(model, path)
    assert_clean_failure(invoke(path, "--out", tmp_path / "m.onnx", "--input", "x:int64<8:batch=2"), tmp_path,
                         "VeRA layer '0' wraps a Embedding")


def _two_projections(tmp_path, first: VeraConfig, second: VeraConfig):
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8)))
    apply_vera(model[0], first)
    apply_vera(model[1], second)
    path = tmp_path / "mixed.pt"
    torch.save(model, path)
    return invoke(path, "--out", tmp_path / "m.onnx", "--input", "x:float32:batch=2,8")


def test_layers_with_inconsistent_r(tmp_path):
    result = _two_projections(tmp_path, VeraConfig(["0"], r=4), VeraConfig(["0"], r=8))
    assert_clean_failure(result, tmp_path, "layers '0.0' (r=4) and '1.0' (r=8) have inconsistent r")


def test_layers_with_inconsistent_seed(tmp_path):
    result = _two_projections(tmp_path, VeraConfig(["0"], r=4), VeraConfig(["0"], r=4, projection_prng_key=1))
    assert_clean_failure(result, tmp_path, "'0.0' (seed 0) and '1.0' (seed 1) use different A/B projections")


def test_peft_lora_is_not_vera(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(target_modules=["0"], r=2))
    path = tmp_path / "lora.pt"
    torch.save(model, path)
    result = invoke(path, "--out", tmp_path / "m.onnx", "--input", "x:float32:batch=2,8", "--trust-pickle")
    assert_clean_failure(result, tmp_path, "layer 'base_model.model.0' is a PEFT lora layer, not VeRA")


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("missing-dir/m.onnx", "directory"),
        ("a-directory", "is a directory"),
        ("/proc/m.onnx", "cannot write /proc/m.onnx"),
    ],
)
def test_unwritable_output(checkpoint, tmp_path, out, message):
    (tmp_path / "a-directory").mkdir()
    target = out if out.startswith("/") else tmp_path / out
    assert_clean_failure(invoke(checkpoint, "--out", target, "--no-verify"), tmp_path, message)


def test_failed_verification_leaves_nothing(checkpoint, tmp_path):
    result = invoke(checkpoint, "--out", tmp_path / "m.onnx", "--tolerance", "1e-12")
    assert_clean_failure(result, tmp_path, "ONNX Runtime differs from PyTorch", "nothing was written",
                         "Raise --tolerance if this is expected")  # a rounding-sized gap


def test_bad_input_spec(checkpoint, tmp_path):
    result = invoke(checkpoint, "--out", tmp_path / "m.onnx", "--input", "input_ids:int64:batch=1,8")
    assert_clean_failure(result, tmp_path, "symbolic dimension 'batch' must be traced at size >= 2")
    result = invoke(checkpoint, "--out", tmp_path / "m.onnx", "--input", "input_ids")
    assert_clean_failure(result, tmp_path, "bad input spec 'input_ids'")


def test_task_command_adds_a_task_and_refuses_another_graphs_model(checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    assert invoke(checkpoint, "--out", out, "--no-verify").exit_code == 0
    other = save_checkpoint(vera_models.make_task(vera_models.build("tiny-encoder"), 7), tmp_path / "o.pt", "topic")
    result = invoke("task", other, "--graph", out)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.topic.task.safetensors").is_file() and (tmp_path / "m.topic.onnx_adapter").is_file()
    foreign = save_checkpoint(vera_models.make_task(vera_models.build("tiny-decoder"), 7), tmp_path / "d.pt", "lm")
    result = invoke("task", foreign, "--graph", out)
    assert result.exit_code == 1
    assert "do not fit" in result.stderr and "export it as its own graph" in result.stderr
    assert not (tmp_path / "m.lm.task.safetensors").exists()


@pytest.mark.slow
def test_failed_export_with_hot_template_leaves_nothing(checkpoint, tmp_path):
    result = invoke(checkpoint, "--out", tmp_path / "m.onnx", "--hot-template", "--tolerance", "1e-12")
    assert_clean_failure(result, tmp_path, "ONNX Runtime differs from PyTorch")
    assert list(tmp_path.iterdir()) == []  # no .hot.onnx.data, no temporary either


@pytest.mark.parametrize("args", [["--help"], ["task"], ["inspect", "{graph}"]])
def test_help_usage_errors_and_inspect_never_import_torch(args, encoder):
    """The CLI imports the library inside each command: these answer without loading torch (~4 s)."""
    import subprocess
    import sys

    args = [a.format(graph=encoder.path) for a in args]
    code = (
        "import sys\nfrom vera_export.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported', code)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    answer = result.stdout.strip()
    assert answer.endswith(("torch not imported 0", "torch not imported 2")), answer + result.stderr


def test_every_package_is_installed_by_a_plain_pip_install():
    """A non-editable install ships only the packages pyproject.toml lists (the tests run editable)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "vera_export").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


@pytest.mark.parametrize("flag", ["--adapter", "--task"])
def test_another_adapter_is_given_with_adapter_and_the_old_task_flag_still_means_it(flag, tmp_path):
    """One meaning of --task per word: NAME=ADAPTER_DIR is --adapter now (--task, hidden, is kept)."""
    (tmp_path / "model.pt").write_bytes(b"PK")
    result = CliRunner().invoke(main, [str(tmp_path / "model.pt"), flag, "b=dir", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--adapter applies to PEFT adapter folders" in result.output, result.output
    assert "--adapter NAME=ADAPTER_DIR" in CliRunner().invoke(main, ["export", "--help"]).output


def test_reference_models_take_task_seed(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "vera_models", "tiny-encoder", "--out-dir", str(tmp_path), "--task-seed", "a=3"]
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.npz", "tiny-encoder.a.pt"]


def test_the_clean_failure_check_sees_a_staged_file_left_behind(tmp_path):
    """assert_clean_failure once looked for '.tmp' while staging writes '.vera-tmp': it could not fail."""

    class Failed:
        exit_code, stderr, output = 1, "Error: it failed\n", "Error: it failed\n"

    assert_clean_failure(Failed(), tmp_path, "it failed")
    (tmp_path / ".m.onnx.123.abcdef12.vera-tmp").write_bytes(b"half a graph")
    assert export_leftovers(tmp_path) == [".m.onnx.123.abcdef12.vera-tmp"]
    with pytest.raises(AssertionError, match="left behind"):
        assert_clean_failure(Failed(), tmp_path, "it failed")


def test_verbose_shows_the_third_party_cause_of_an_error(tmp_path):
    """Errors that wrap another library's raise `from` it: --verbose shows both."""
    import subprocess
    import sys

    (tmp_path / "m.onnx").write_bytes(b"\x08\x07 not really a graph")
    args = [sys.executable, "-m", "vera_export.cli", "inspect", str(tmp_path / "m.onnx")]
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1 and "is not a readable ONNX file" in quiet.stderr and "Traceback" not in quiet.stderr
    loud = subprocess.run([*args, "--verbose"], capture_output=True, text=True, timeout=120)
    assert "direct cause of the following exception" in loud.stderr and "VeraExportError" in loud.stderr, loud.stderr

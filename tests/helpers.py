"""Shared test helpers: build models, run graphs, compare with PyTorch."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from vera_export._discover import AdaptedModel, find_vera_layers
from vera_export._verify import ort_session, random_task, task_tensors_set, torch_outputs

TOLERANCE = 1e-5
CI = os.environ.get("CI", "").lower() in ("1", "true")  # a missing piece fails the test in CI, skips it here
GENAI_PYTHON = Path(os.environ.get("VERA_GENAI_PYTHON", Path(__file__).parents[1] / ".venv-genai" / "bin" / "python"))


JS = Path(__file__).resolve().parents[1] / "runtime" / "js"


def require_js(ready: bool, what: str) -> None:
    """A piece the JavaScript tests need (node_modules, chromium): fail in CI, skip elsewhere."""
    if not ready:
        if CI:
            pytest.fail(f"{what} is missing: .ci/run installs it")
        pytest.skip(f"{what} is missing: run `npm ci --ignore-scripts --prefix runtime/js` and install chromium")


def genai_python(*modules: str) -> Path:
    """The interpreter of onnxruntime-genai's own environment (it pins a CPU onnxruntime that must not meet
    onnxruntime-gpu), able to import ``modules`` too; the test fails in CI and is skipped elsewhere without it."""
    probe = [str(GENAI_PYTHON), "-c", f"import onnxruntime_genai{''.join(f', {m}' for m in modules)}"]
    if not GENAI_PYTHON.is_file() or subprocess.run(probe, capture_output=True).returncode:
        why = (f"no onnxruntime-genai environment at {GENAI_PYTHON} that imports onnxruntime_genai"
               f"{''.join(f', {m}' for m in modules)}: create it as .ci/run does (or set VERA_GENAI_PYTHON)")
        pytest.fail(why) if CI else pytest.skip(why)
    return GENAI_PYTHON


def genai_generate(folder: Path, prompt: list[int], max_length: int, adapters: dict[str, str],
                   work: Path) -> dict[str, list[int]]:
    """Greedy tokens (prompt included) from onnxruntime-genai on ``folder``, one entry per adapter name
    (``""``: no adapter), run by tests/genai/generate.py in genai's own environment."""
    import json

    request = work / "request.json"
    request.write_text(json.dumps({"prompt": prompt, "max_length": max_length, "adapters": adapters}))
    script = Path(__file__).parent / "genai" / "generate.py"
    done = subprocess.run([str(genai_python()), str(script), str(folder), str(request)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


class CustomNet(nn.Module):
    """A class outside vera-export's allowlist: loading its pickle needs --trust-pickle."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclasses.dataclass
class Exported:
    """A model, its exported graph and what the exporter returned."""

    model: nn.Module
    adapted: AdaptedModel
    result: object
    specs: list

    @property
    def path(self) -> Path:
        return self.result.onnx_path


session = ort_session  # a quiet CPU session, as the exporter's verification uses


def run(sess: ort.InferenceSession, feeds: dict, run_options=None) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds, run_options), strict=True))


def inputs_for(exported: Exported, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs at a batch and sequence length other than the traced ones."""
    generator = torch.Generator().manual_seed(seed)
    feeds = {}
    for spec in exported.specs:
        shape = [batch, seq][: len(spec.dims)]
        high = spec.high or 2
        feeds[spec.name] = torch.randint(0, high, shape, generator=generator)
        if spec.name == "attention_mask":
            feeds[spec.name][:, 0] = 1  # at least one visible token per row
    return feeds


def task_of(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    """The λ values the model holds now."""
    return {name: param.detach().clone() for name, param in adapted.task_params().items()}


def torch_reference(exported: Exported, feeds: dict, task: dict | None = None) -> dict[str, np.ndarray]:
    """The model's own forward (ours or PEFT's) with ``task``'s λ loaded into its parameters."""
    with task_tensors_set(exported.adapted, task) if task else contextlib.nullcontext():
        return torch_outputs(exported.model, feeds)


def as_feeds(task: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.numpy()[None] for name, value in task.items()}


def max_relative_diff(got: dict, want: dict) -> float:
    scale = max(float(np.abs(v).max()) for v in want.values())
    return max(float(np.abs(got[k] - want[k]).max()) for k in want) / scale


__all__ = [
    "CustomNet", "Exported", "TOLERANCE", "as_feeds", "assert_clean_failure", "export_leftovers", "find_vera_layers",
    "inputs_for",
    "max_relative_diff", "random_task", "run", "session", "task_of", "torch_reference",
]


def export_two_task_encoder(path: Path) -> Path:
    """The tiny encoder exported at ``path`` with task 'first', plus task 'second' beside it."""
    import vera_models
    from vera_export import add_task, export

    export(vera_models.make_task(vera_models.build("tiny-encoder"), 1), path, task_name="first")
    add_task(vera_models.make_task(vera_models.build("tiny-encoder"), 2), path, "second")
    return path


_WRITTEN = (".onnx", ".onnx.data", ".ort", ".onnx_adapter", ".task.safetensors", ".vera-tmp", ".vera-publish",
            "genai_config.json")


def export_leftovers(folder: Path) -> list[str]:
    """Every file under ``folder`` that an export writes or stages (hidden staged files included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(_WRITTEN))


def assert_clean_failure(result, out_dir: Path, *fragments: str, exit_code: int | None = None) -> None:
    """A CLI failure as promised: the exit code (any but 0 by default), exactly one 'Error:' line holding
    every fragment, no traceback, and nothing an export writes or stages left in ``out_dir``."""
    assert result.exit_code != 0 if exit_code is None else result.exit_code == exit_code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    missing = [fragment for fragment in fragments if fragment not in errors[0]]
    assert not missing, f"{missing} not in {errors[0]}"
    assert export_leftovers(out_dir) == [], f"left behind: {export_leftovers(out_dir)}"

"""Check the exported graph in ONNX Runtime against the model's own PyTorch forward."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vera_runtime.layout import LAMBDA_D

from ._agreement import PER_ROW, Check, compare_outputs
from ._discover import AdaptedModel
from ._kv_cache import CachedCausalLM
from ._trace import flatten_outputs
from ._verify_cache import generation_check, mixed_generation_check


@dataclasses.dataclass(frozen=True)
class Verification:
    checks: tuple[Check, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(check.relative <= self.tolerance for check in self.checks)

    @property
    def worst(self) -> Check:
        return max(self.checks, key=lambda check: check.relative)

    @property
    def only_mixed_batches_fail(self) -> bool:
        """Every single-task check passes: the per-row routing, not the arithmetic, is wrong."""
        return not self.passed and all(c.relative <= self.tolerance for c in self.checks if c.name != PER_ROW)


def ort_session(path: str | Path | bytes):
    """A CPU session that stays quiet about the λ inputs' default initializers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns once per input-with-default: expected here
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def task_tensors_set(adapted: AdaptedModel, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily load other task tensors (λ and heads) into the model's own parameters."""
    params = adapted.task_params()
    saved = {name: param.detach().clone() for name, param in params.items()}
    with torch.no_grad():
        try:
            for name, value in values.items():
                params[name].copy_(value)
            yield
        finally:
            for name, value in saved.items():
                params[name].copy_(value)


def random_task(adapted: AdaptedModel, seed: int = 1) -> dict[str, torch.Tensor]:
    """λ values unlike any trained task, large enough to move every output."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(param.shape, generator=generator) * (1.0 if name.endswith(LAMBDA_D) else 0.2)
        for name, param in adapted.task_params().items()
    }


def torch_outputs(model: nn.Module, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {name: value.float().numpy() for name, value in flatten_outputs(model(**feeds)).items()}


def verify_export(
    model: nn.Module,
    adapted: AdaptedModel,
    onnx_path: Path,
    examples: dict[str, torch.Tensor],
    tolerance: float,
    hot_template: bytes | None = None,
) -> Verification:
    """Compare ORT with PyTorch for the exported task (λ defaults), a random λ set fed as inputs,
    and a mixed batch whose rows alternate between those two tasks (T = batch)."""
    session = ort_session(onnx_path)
    output_names = [o.name for o in session.get_outputs()]
    feeds = {name: value.numpy() for name, value in examples.items()}

    def run(extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(output_names, session.run(output_names, {**feeds, **extra}), strict=True))

    exported = torch_outputs(model, examples)
    other = random_task(adapted)
    with task_tensors_set(adapted, other):
        randomised = torch_outputs(model, examples)
    checks = [
        compare_outputs("exported task (λ defaults)", run({}), exported),
        compare_outputs("random λ fed as inputs", run({k: v.numpy()[None] for k, v in other.items()}), randomised),
    ]
    batch = next(iter(examples.values())).shape[0]
    if batch >= 2 and all(value.shape[:1] == (batch,) for value in exported.values()):
        current = {name: param.detach() for name, param in adapted.task_params().items()}
        rows = [(current, exported) if i % 2 == 0 else (other, randomised) for i in range(batch)]
        mixed = {k: np.stack([task[k].numpy() for task, _ in rows]) for k in other}
        expected = {k: np.stack([ref[k][i] for i, (_, ref) in enumerate(rows)]) for k in exported}
        checks.append(compare_outputs(PER_ROW, run(mixed), expected))
    if isinstance(model, CachedCausalLM):
        checks += _generation_checks(model, adapted, session, other)
    if hot_template is not None:
        hot = ort_session(hot_template)
        hot_outputs = dict(zip(output_names, hot.run(output_names, feeds), strict=True))
        checks.append(compare_outputs("hot template (exported task)", hot_outputs, exported))
    return Verification(tuple(checks), tolerance)


def _generation_checks(model: CachedCausalLM, adapted: AdaptedModel, session, other: dict) -> list[Check]:
    """Prefill and decode steps through the cache: the exported task, random λ, and one per row."""
    current = {name: param.detach().numpy()[None] for name, param in adapted.task_params().items()}
    fed = {name: value.numpy()[None] for name, value in other.items()}
    with task_tensors_set(adapted, other):
        randomised = generation_check("generation with random λ", model, session, fed)
    rows = [(current, contextlib.nullcontext), (fed, lambda: task_tensors_set(adapted, other))]
    return [
        generation_check("generation (exported task)", model, session, {}),
        randomised,
        mixed_generation_check("generation with a task per row", model, session, rows),
    ]

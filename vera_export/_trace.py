"""Trace a VeRA model into ONNX with every lambda as a named graph input of shape [T, n].

The model's own VeRA layers (ours or PEFT's) are patched for the duration of the trace: each
reads its task tensors from the wrapper's inputs instead of its parameters, and its A/B slices from
the wrapper's single ``vera_A`` / ``vera_B`` buffers, so the graph stores each projection once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence

import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from ._discover import AdaptedHead, AdaptedLayer, AdaptedModel
from ._errors import VeraExportError
from ._inputs import Dim, InputSpec, dynamic_shapes

TASK_DIM = "tasks"
_TASKS_EXAMPLE = 3  # >= 2 so torch.export keeps T symbolic, and unlike any batch size we trace at


def flatten_outputs(output) -> dict[str, torch.Tensor]:
    """Name a model's tensor outputs: mapping keys (e.g. transformers' ModelOutput) or positions."""
    if isinstance(output, torch.Tensor):
        return {"output": output}
    if isinstance(output, Mapping):
        items = output.items()
    elif isinstance(output, Sequence):
        items = ((f"output_{i}", value) for i, value in enumerate(output))
    else:
        raise VeraExportError(f"the model returned a {type(output).__name__}: return tensors, a tuple or a dict.")
    return {name: value for name, value in items if isinstance(value, torch.Tensor)}


def _rows(per_task: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Which task each leading row of x uses: T = 1 (one task) or T = batch (a task per row).

    Row i of N leading rows takes task i * T // N, so the batch row decides whatever the layer's
    layout: [batch, ...] (N = batch) and batch-major flattened [batch * seq, d] (OPT's fc1/fc2)
    alike. Rows are gathered explicitly: broadcasting a [T, n] tensor as [T, 1, n] would make
    torch.export unify T with the batch size, and the graph would then refuse T = 1.
    """
    # T and N as tensors: the ONNX translation of integer ops on SymInts (e.g. `% SymInt`) fails.
    tasks = torch.scalar_tensor(per_task.shape[0], dtype=torch.long, device=x.device)
    rows = torch.scalar_tensor(x.shape[0], dtype=torch.long, device=x.device)
    return torch.div(torch.arange(x.shape[0], device=x.device) * tasks, rows, rounding_mode="floor")


def _per_row(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [T, n] lambda, shaped to scale x's last dimension row by row."""
    if x.dim() == 1:
        return lam[0]
    return lam[_rows(lam, x)].reshape(x.shape[0], *([1] * (x.dim() - 2)), lam.shape[1])


def _per_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear layer with a [T, out, in] weight (and [T, out] bias): one head per task."""
    if x.dim() == 1:
        return F.linear(x, weight[0], None if bias is None else bias[0])
    rows = _rows(weight, x)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, in]
    out = flat @ weight[rows].transpose(1, 2)  # [N, L, out]
    if bias is not None:
        out = out + bias[rows][:, None, :]
    return out.reshape(*x.shape[:-1], weight.shape[1])


class _Tracer(nn.Module):
    def __init__(self, model: nn.Module, adapted: AdaptedModel, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model = model
        # The same tensor objects the model holds: torch.export sees aliases, not copies.
        self.register_buffer("vera_A", adapted.vera_a)
        self.register_buffer("vera_B", adapted.vera_b)
        self.input_names = input_names
        self.output_names = output_names
        self.task_tensors: tuple[torch.Tensor, ...] = ()
        self.merged = False  # True: trace the hot template, W + ΔW(λ) for one task (T = 1)

    def run(self, inputs: tuple[torch.Tensor, ...], task_tensors: tuple[torch.Tensor, ...]):
        self.task_tensors = task_tensors
        try:
            outputs = flatten_outputs(self.model(**dict(zip(self.input_names, inputs, strict=True))))
        finally:
            self.task_tensors = ()
        return tuple(outputs[name] for name in self.output_names)

    def vera_forward(self, index: int, layer: AdaptedLayer):
        def forward(x: torch.Tensor) -> torch.Tensor:
            lambda_d, lambda_b = self.task_tensors[2 * index], self.task_tensors[2 * index + 1]
            vera_a = self.vera_A[:, : layer.in_features]
            vera_b = self.vera_B[: layer.out_features, :]
            if self.merged:  # once λ are constants, ONNX Runtime folds all of this into one weight
                delta = (lambda_b[0][:, None] * vera_b) @ (lambda_d[0][:, None] * vera_a)
                weight = layer.base.weight if isinstance(layer.base, nn.Linear) else layer.base.weight.T
                return F.linear(x.to(lambda_d.dtype), weight + delta, layer.base.bias)
            hidden = _per_row(lambda_d, x) * F.linear(x.to(lambda_d.dtype), vera_a)
            return layer.base(x) + _per_row(lambda_b, x) * F.linear(hidden, vera_b)

        return forward

    def head_forward(self, start: int, head: AdaptedHead):
        def forward(x: torch.Tensor) -> torch.Tensor:
            bias = self.task_tensors[start + 1] if head.linear.bias is not None else None
            if self.merged:
                return F.linear(x, self.task_tensors[start][0], None if bias is None else bias[0])
            return _per_row_linear(x, self.task_tensors[start], bias)

        return forward


def _tracer_class(n_inputs: int, n_task_inputs: int) -> type[_Tracer]:
    """A _Tracer subclass whose forward has one named parameter per graph input.

    torch.export's dynamic shapes do not work through ``*args``, so the signature is generated.
    """
    inputs = [f"input_{i}" for i in range(n_inputs)]
    task_inputs = [f"task_{i}" for i in range(n_task_inputs)]
    source = (
        f"def forward(self, {', '.join(inputs + task_inputs)}):\n"
        f"    return self.run(({''.join(n + ', ' for n in inputs)}), ({''.join(n + ', ' for n in task_inputs)}))\n"
    )
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - the source is built above from integers only
    return type("VeraTracer", (_Tracer,), {"forward": namespace["forward"]})


def _patches(tracer: _Tracer, adapted: AdaptedModel) -> list[tuple[nn.Module, object]]:
    """(module, forward) pairs: VeRA layers read their λ inputs, heads their weight inputs."""
    patches = [(layer.module, tracer.vera_forward(i, layer)) for i, layer in enumerate(adapted.layers)]
    start = 2 * len(adapted.layers)
    for head in adapted.heads:
        patches.append((head.linear, tracer.head_forward(start, head)))
        start += len(head.params())
    return patches


@contextlib.contextmanager
def _patched(patches: list[tuple[nn.Module, object]]) -> Iterator[None]:
    """Route each module's forward through the tracer; restore whatever was there after."""
    saved = [module.__dict__.get("forward") for module, _ in patches]
    for module, forward in patches:
        module.forward = forward
    try:
        yield
    finally:
        for (module, _), forward in zip(patches, saved, strict=True):
            del module.forward
            if forward is not None:
                module.forward = forward


def trace_to_onnx(
    model: nn.Module,
    adapted: AdaptedModel,
    specs: list[InputSpec],
    examples: list[torch.Tensor],
    output_names: list[str],
    opset: int,
    merged: bool = False,
) -> ir.Model:
    """Export ``model`` with torch.export; λ inputs come after the model inputs, d then b per layer.

    ``merged`` traces the hot template instead: each adapted layer as one linear layer with weight
    ``W + ΔW(λ)``, for a single task (λ inputs of shape ``[1, n]``).
    """
    if any(isinstance(d, Dim) and d.name == TASK_DIM for s in specs for d in s.dims):
        raise VeraExportError(f"the dimension name '{TASK_DIM}' is reserved for the task dimension of λ inputs.")
    generator = torch.Generator().manual_seed(0)
    task_inputs = adapted.task_params()
    task_examples = [
        torch.randn((1 if merged else _TASKS_EXAMPLE, *param.shape), generator=generator, dtype=param.dtype)
        for param in task_inputs.values()
    ]
    tasks = None if merged else torch.export.Dim(TASK_DIM, min=1)
    shapes = dynamic_shapes(specs) + [{0: tasks} if tasks else {}] * len(task_examples)
    tracer = _tracer_class(len(specs), len(task_examples))(model, adapted, [s.name for s in specs], output_names)
    tracer.merged = merged
    failure = "torch.export could not trace the model"
    with _patched(_patches(tracer, adapted)), quiet_export(), _as_export_error(failure):
        program = torch.onnx.export(
            tracer.eval(),
            tuple(examples + task_examples),
            input_names=[s.name for s in specs] + list(task_inputs),
            output_names=output_names,
            opset_version=opset,
            dynamic_shapes=tuple(shapes),
            dynamo=True,
            verbose=False,
            optimize=False,
        )
    if program is None:
        raise VeraExportError("torch.onnx.export returned no program.")
    return program.model


@contextlib.contextmanager
def _as_export_error(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise VeraExportError(f"{what}: {root_cause(exc)} (rerun with --verbose for the full report)") from exc


def root_cause(exc: BaseException) -> str:
    """The innermost cause of a chained exception, as ``Type: first line``: torch.onnx wraps torch.export's
    error in a report whose first line says only that export failed and where its "Next steps:" are."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """torch.export and onnxscript log and warn freely; the CLI shows its own progress instead."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)

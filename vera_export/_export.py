"""``export``: a VeRA model in, one ONNX graph plus the exported task's files out."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from vera_runtime import (
    ADAPTER_SUFFIX,
    TASK_SUFFIX,
    Contract,
    HeadSpec,
    LayerSpec,
    Task,
    fingerprint,
    write_onnx_adapter,
    write_task,
)
from vera_runtime._io import atomic_path
from vera_runtime._taskfile import check_task_name

from . import _passes
from ._discover import AdaptedModel, find_vera_layers
from ._errors import VeraExportError
from ._graphfile import read_contract
from ._inputs import InputSpec, parse_specs
from ._options import DEFAULT_OPSET, DEFAULT_TOLERANCE
from ._projection import RECIPE, make_projections
from ._trace import flatten_outputs, trace_to_onnx
from ._verify import Verification, verify_export

_EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps one file at 2 GiB: move weights out well before


@dataclasses.dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    task_path: Path
    adapter_path: Path
    contract: Contract
    verification: Verification | None
    seconds: float


def task_paths(onnx_path: Path, task: str) -> tuple[Path, Path]:
    """Where a graph's task files live: beside it, named ``<stem>.<task>.task.safetensors`` etc."""
    stem = onnx_path.with_suffix("").name
    return (onnx_path.with_name(f"{stem}.{task}{TASK_SUFFIX}"), onnx_path.with_name(f"{stem}.{task}{ADAPTER_SUFFIX}"))


def model_input_specs(model: nn.Module, inputs: Sequence[str | InputSpec] | None) -> list[InputSpec]:
    """Input specs given by the caller, else the model's own ``vera_input_specs()``."""
    if inputs:
        return parse_specs(inputs)
    describe = getattr(model, "vera_input_specs", None)
    if describe is None:
        raise VeraExportError(
            f"{type(model).__name__} does not describe its inputs: pass them, e.g."
            " --input input_ids:int64<1000:batch=2,sequence=8 (one --input per forward argument)."
        )
    return parse_specs(describe())


def _check_writable(out: Path) -> None:
    """Fail before the slow trace, with a probe file: permission bits don't tell (e.g. for root)."""
    if out.is_dir():
        raise VeraExportError(f"output path {out} is a directory: give a file name such as {out / 'model.onnx'}.")
    if not out.parent.is_dir():
        raise VeraExportError(f"cannot write {out}: directory {out.parent} does not exist; create it first.")
    try:
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise VeraExportError(f"cannot write {out}: {exc.strerror or exc}; choose another --out.") from None


def _recipe(adapted: AdaptedModel) -> str:
    """The seed recipe when it reproduces A and B, else a note that they were stored."""
    if adapted.seed is not None:
        vera_a, vera_b = make_projections(adapted.r, adapted.vera_a.shape[1], adapted.vera_b.shape[0], adapted.seed)
        if torch.equal(vera_a, adapted.vera_a.cpu()) and torch.equal(vera_b, adapted.vera_b.cpu()):
            return RECIPE
    return "stored: A and B are not reproduced by the seed recipe; use the initializers vera_A and vera_B"


def _contract(adapted: AdaptedModel) -> Contract:
    layers = tuple(LayerSpec(layer.name, layer.in_features, layer.out_features) for layer in adapted.layers)
    heads = tuple(
        HeadSpec(h.name, h.linear.in_features, h.linear.out_features, h.linear.bias is not None)
        for h in adapted.heads
    )
    vera_a = adapted.vera_a.detach().cpu().numpy()
    vera_b = adapted.vera_b.detach().cpu().numpy()
    return Contract(
        r=adapted.r, seed=adapted.seed, recipe=_recipe(adapted), layers=layers, heads=heads,
        default_task=adapted.task_name, fingerprint=fingerprint(vera_a, vera_b, layers, heads),
    )


def current_task(adapted: AdaptedModel, contract: Contract) -> Task:
    """The λ values the model holds now, as a task of ``contract``'s graph."""
    tensors = {name: param.detach().float().cpu().numpy() for name, param in adapted.task_params().items()}
    return Task(adapted.task_name, contract.fingerprint, tensors)


def hot_template_path(onnx_path: Path) -> Path:
    """The hot template of a graph: ``<stem>.hot.onnx`` beside it."""
    return onnx_path.with_name(f"{onnx_path.with_suffix('').name}.hot.onnx")


def _build_graph(model, adapted, specs, examples, output_names, opset, contract, task, merged=False) -> ir.Model:
    graph = trace_to_onnx(model, adapted, specs, list(examples.values()), output_names, opset, merged)
    _passes.fold_constants(graph)
    _passes.strip_trace_metadata(graph)
    _passes.name_projections(graph, adapted.vera_a.detach().cpu().numpy(), adapted.vera_b.detach().cpu().numpy())
    _passes.strip_prefix(graph, "model.")
    if merged:
        _passes.inline_task(graph, task.tensors)
    else:
        _passes.add_task_defaults(graph, task.tensors)
    _passes.set_metadata(graph, contract)
    return graph


def _eager(model: nn.Module, examples: dict[str, torch.Tensor]):
    with torch.no_grad():
        return model(**examples)


def _save(graph: ir.Model, path: Path, final: Path, stack: contextlib.ExitStack) -> None:
    if graph.metadata_props.get(_passes.HOT_TEMPLATE_KEY):
        return _save_hot_template(graph, path, final, stack)
    nbytes = sum(v.const_value.nbytes for v in graph.graph.initializers.values() if v.const_value is not None)
    external = f"{final.name}.data" if nbytes > _EXTERNAL_DATA_BYTES else None
    ir.save(graph, path, external_data=external)


def _save_hot_template(graph: ir.Model, path: Path, final: Path, stack: contextlib.ExitStack) -> None:
    """The task tensors go to ``<final>.data``: ONNX Runtime replaces external initializers
    (SessionOptions.add_external_initializers) before it optimises, so a hot session folds the
    task's values into the weights. Values replaced with add_initializer come too late for that.
    The data file, like every other, is renamed into place only when the whole export succeeds."""
    import onnx
    from onnx import external_data_helper

    proto = ir.to_proto(graph)
    task_names = set(json.loads(graph.metadata_props[_passes.HOT_TEMPLATE_KEY]))
    data_name = f"{final.name}.data"
    for tensor in proto.graph.initializer:
        if tensor.name in task_names:
            external_data_helper.set_external_data(tensor, location=data_name)
    data_tmp = stack.enter_context(atomic_path(final.with_name(data_name)))
    with tempfile.TemporaryDirectory(dir=final.parent) as scratch:
        external_data_helper.write_external_data_tensors(proto, scratch)
        os.replace(Path(scratch) / data_name, data_tmp)
    onnx.save(proto, str(path))


_ROUNDING = 1e-3  # a relative gap below this is float rounding, which a looser --tolerance may accept


def _require_pass(verification: Verification) -> Verification:
    if verification.passed:
        return verification
    worst = verification.worst
    gap = (
        f"max |diff| {worst.max_abs_diff:.3g} for outputs of scale {worst.scale:.3g} (relative {worst.relative:.3g}"
        f" > tolerance {verification.tolerance:g}); nothing was written."
    )
    if verification.only_mixed_batches_fail:
        raise VeraExportError(
            f"ONNX Runtime differs from PyTorch only on '{worst.name}': {gap} This model's layout breaks per-row"
            " tasks (an adapted layer sees batch rows in another order than the batch); single-task runs are"
            " unaffected. Please report the model class to vera-export."
        )
    advice = (
        "Raise --tolerance if this is expected." if worst.relative < _ROUNDING
        else "This is not rounding: rerun with --verbose and report the model class to vera-export."
    )
    raise VeraExportError(f"ONNX Runtime differs from PyTorch on '{worst.name}': {gap} {advice}")


def _write_all(graphs: dict[Path, ir.Model], task: Task, paths: tuple[Path, Path], check) -> Verification | None:
    """Write the graphs and both task files under temporary names; rename them only if all succeed
    (and ``check``, given the first graph's temporary file, passes)."""
    with contextlib.ExitStack() as stack:
        temporary = []
        for final, graph in graphs.items():
            temporary.append(stack.enter_context(atomic_path(final)))
            _save(graph, temporary[-1], final, stack)
        tmp_task, tmp_adapter = (stack.enter_context(atomic_path(p)) for p in paths)
        verification = check(temporary[0]) if check else None
        write_task(tmp_task, task)
        write_onnx_adapter(tmp_adapter, task)
    return verification


def export(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    inputs: Sequence[str | InputSpec] | None = None,
    task_name: str | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    hot_template: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export a VeRA-adapted ``model`` (ours or PEFT's) to one ONNX graph at ``out``.

    Writes ``out``, plus the exported task as ``<stem>.<task>.task.safetensors`` and
    ``<stem>.<task>.onnx_adapter`` beside it. Nothing is left behind if any step fails.
    ``hot_template`` also writes ``<stem>.hot.onnx``, the merged form that lets the runtime serve
    one task at merged-graph speed (a second copy of the weights on disk).
    """
    start = time.perf_counter()
    out = Path(out)
    _check_writable(out)
    specs = model_input_specs(model, inputs)
    model.eval()
    adapted = find_vera_layers(model, task_name)
    check_task_name(adapted.task_name)
    generator = torch.Generator().manual_seed(0)
    examples = {spec.name: spec.example(generator) for spec in specs}
    contract = _contract(adapted)
    task = current_task(adapted, contract)
    progress(f"Tracing {len(adapted.layers)} VeRA layers (r={adapted.r}) with torch.export ...")
    output_names = list(flatten_outputs(_eager(model, examples)))
    build = (model, adapted, specs, examples, output_names, opset, contract, task)
    graphs = {out: _build_graph(*build)}
    hot = None
    if hot_template:
        progress("Tracing the hot template (merged weights) ...")
        graphs[hot_template_path(out)] = _build_graph(*build, merged=True)
        hot = ir.to_proto(graphs[hot_template_path(out)]).SerializeToString()  # its task values inline
    task_path, adapter_path = task_paths(out, adapted.task_name)

    def check(path: Path) -> Verification:
        progress("Verifying ONNX Runtime against PyTorch ...")
        return _require_pass(verify_export(model, adapted, path, examples, tolerance, hot))

    try:
        verification = _write_all(graphs, task, (task_path, adapter_path), check if verify else None)
    except OSError as exc:
        raise VeraExportError(f"cannot write {out}: {exc.strerror or exc}; choose another --out.") from None
    return ExportResult(out, task_path, adapter_path, contract, verification, time.perf_counter() - start)


def add_task(model: nn.Module, graph: str | os.PathLike, task_name: str | None = None) -> tuple[Path, Path]:
    """Write ``model``'s current λ as another task of an exported graph, beside it.

    The model must share the graph's A, B and layers (same fingerprint): typically the same base
    model fine-tuned on another task. Returns the task file and the ``.onnx_adapter`` paths.
    """
    graph = Path(graph)
    contract = read_contract(graph)
    adapted = find_vera_layers(model, task_name)
    check_task_name(adapted.task_name)
    mine = _contract(adapted)
    if mine.fingerprint != contract.fingerprint:
        raise VeraExportError(
            f"this model's VeRA layers do not fit {graph} (fingerprint {mine.fingerprint[:12]}, the graph"
            f" has {contract.fingerprint[:12]}): its A/B, r or adapted layers differ; export it as its own graph."
        )
    task = current_task(adapted, contract)
    paths = task_paths(graph, adapted.task_name)
    try:
        with contextlib.ExitStack() as stack:
            tmp_task, tmp_adapter = (stack.enter_context(atomic_path(p)) for p in paths)
            write_task(tmp_task, task)
            write_onnx_adapter(tmp_adapter, task)
    except OSError as exc:
        raise VeraExportError(f"cannot write {paths[0]}: {exc.strerror or exc}.") from None
    return paths

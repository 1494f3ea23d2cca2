"""``export``: a VeRA model in, one ONNX graph plus the exported task's files out."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from vera_runtime import (
    Contract,
    HeadSpec,
    LayerSpec,
    Task,
    fingerprint,
    write_onnx_adapter,
    write_task,
)
from vera_runtime.files import template_digest
from vera_runtime.layout import KEY_HOT_TEMPLATE, check_task_name, hot_template_path, task_file_paths

from . import _defaults, _passes
from ._defaults import DEFAULT_OPSET, DEFAULT_TOLERANCE
from ._digest import base_digest
from ._discover import AdaptedModel, find_vera_layers
from ._errors import VeraExportError
from ._graphfile import read_contract
from ._inputs import InputSpec, parse_specs
from ._kv_cache import CachedCausalLM, name_cache_dims
from ._limits import dim_limits, input_highs
from ._projection import RECIPE, make_projections
from ._staging import Staging, check_writable, writing
from ._trace import flatten_outputs, trace_to_onnx
from ._verify import Verification, verify_export


@dataclasses.dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    task_path: Path
    adapter_path: Path
    contract: Contract
    verification: Verification | None
    seconds: float


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


def not_float32(model: nn.Module) -> str | None:
    """The first floating parameter or buffer that is not float32, as ``'name' (dtype)``; None if none."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            return f"'{name}' ({str(tensor.dtype).removeprefix('torch.')})"
    return None


def _check_float32(model: nn.Module) -> None:
    """The graph is float32 (``convert --to fp16`` makes a half-precision form of it): a half-precision
    model is refused up front, rather than converted behind the caller's back or failing in ONNX Runtime."""
    if found := not_float32(model):
        raise VeraExportError(
            f"{type(model).__name__} has {found} weights: vera-export traces float32 models. Call model.float()"
            " before exporting, then `vera-export convert m.onnx --to fp16` for a float16 graph."
        )


def _recipe(adapted: AdaptedModel) -> str:
    """The seed recipe when it reproduces A and B, else a note that they were stored."""
    if adapted.seed is not None:
        vera_a, vera_b = make_projections(adapted.r, adapted.vera_a.shape[1], adapted.vera_b.shape[0], adapted.seed)
        if torch.equal(vera_a, adapted.vera_a.cpu()) and torch.equal(vera_b, adapted.vera_b.cpu()):
            return RECIPE
    return "stored: A and B are not reproduced by the seed recipe; use the initializers vera_A and vera_B"


def _contract(
    adapted: AdaptedModel, model: nn.Module, digest: str | None, specs: list[InputSpec] | None = None
) -> Contract:
    """The graph contract for ``adapted``; ``digest`` is ``base_digest(model)``, or None for graphs
    exported before base digests (computed by the caller: hashing the weights is the costly part)."""
    layers = tuple(LayerSpec(layer.name, layer.in_features, layer.out_features) for layer in adapted.layers)
    heads = tuple(
        HeadSpec(h.name, h.linear.in_features, h.linear.out_features, h.linear.bias is not None)
        for h in adapted.heads
    )
    vera_a = adapted.vera_a.detach().cpu().numpy()
    vera_b = adapted.vera_b.detach().cpu().numpy()
    return Contract(
        r=adapted.r, seed=adapted.seed, recipe=_recipe(adapted), layers=layers, heads=heads,
        default_task=adapted.task_name, fingerprint=fingerprint(vera_a, vera_b, layers, heads, digest),
        base_digest=digest,
        input_highs=input_highs(model, specs or []),
        dim_limits=dim_limits(model, specs or []),
    )


def current_task(adapted: AdaptedModel, contract: Contract) -> Task:
    """The λ values the model holds now, as a task of ``contract``'s graph."""
    tensors = {name: param.detach().float().cpu().numpy() for name, param in adapted.task_params().items()}
    return Task(adapted.task_name, contract.fingerprint, tensors, contract.base_digest)


def _build_ir_model(model, adapted, specs, examples, output_names, opset, contract, task, merged=False) -> ir.Model:
    ir_model = trace_to_onnx(model, adapted, specs, list(examples.values()), output_names, opset, merged)
    if isinstance(model, CachedCausalLM):
        name_cache_dims(ir_model)
    _passes.fold_constants(ir_model)
    _passes.strip_trace_metadata(ir_model)
    _passes.name_projections(ir_model, adapted.vera_a.detach().cpu().numpy(), adapted.vera_b.detach().cpu().numpy())
    _passes.store_weights_as_consumed(ir_model)
    _passes.strip_prefix(ir_model, "model.")
    if merged:
        _passes.inline_task(ir_model, task.tensors)
    else:
        _passes.add_task_defaults(ir_model, task.tensors)
    _passes.set_metadata(ir_model, contract)
    return ir_model


def _eager(model: nn.Module, examples: dict[str, torch.Tensor]):
    with torch.no_grad():
        return model(**examples)


def _save(ir_model: ir.Model, folder: Path, name: str) -> None:
    """Write ``ir_model`` as ``folder/name``, with ``name.data`` beside it when its weights need one."""
    if ir_model.metadata_props.get(_passes.HOT_TEMPLATE_KEY):
        return _save_hot_template(ir_model, folder, name)
    nbytes = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    ir.save(ir_model, folder / name, external_data=f"{name}.data" if nbytes > _defaults.EXTERNAL_DATA_BYTES else None)


def _save_hot_template(ir_model: ir.Model, folder: Path, name: str) -> None:
    """The task tensors go to ``<name>.data``, with the weights: ONNX Runtime replaces external
    initializers (SessionOptions.add_external_initializers) before it optimises, so a hot session folds
    the task's values into the weights. Values replaced with add_initializer come too late for that."""
    import onnx
    from onnx import external_data_helper

    ir.save(ir_model, folder / name, external_data=f"{name}.data")  # never one protobuf over 2 GB
    task_names = set(json.loads(ir_model.metadata_props[_passes.HOT_TEMPLATE_KEY]))
    proto = onnx.load(str(folder / name), load_external_data=False)
    with open(folder / f"{name}.data", "ab") as data:  # the small ones were saved inline: append them
        for tensor in proto.graph.initializer:
            if tensor.name in task_names and tensor.HasField("raw_data"):
                offset = data.tell()
                data.write(tensor.raw_data)
                external_data_helper.set_external_data(tensor, f"{name}.data", offset, len(tensor.raw_data))
                tensor.ClearField("raw_data")
    onnx.save(proto, str(folder / name))


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


def _stage_all(ir_models: dict[Path, ir.Model], task: Task, stage: Staging, check) -> tuple[Verification | None, str]:
    """Write the graphs (``ir_models``, in a scratch folder where ``check`` runs the first one with its
    external data) and the task's files, all under staged names: nothing is in place until ``stage.publish()``.
    The hot template, when there is one, is written first: the graph records its digest (returned).

    ``ir_models`` is emptied once they are written: their transposed weights are a copy of the model's,
    and ONNX Runtime is about to load a third (a 2.8 GB Llama peaked at 3.2× its weights otherwise)."""
    scratch = stage.scratch()
    main = next(iter(ir_models))
    hot_digest = ""
    while ir_models:
        final, ir_model = ir_models.popitem()  # the hot template (added last) comes first
        if final != main:
            _save(ir_model, scratch, final.name)
            hot_digest = template_digest(scratch / final.name)
        else:
            if hot_digest:
                ir_model.metadata_props[KEY_HOT_TEMPLATE] = hot_digest  # the only template sessions will use
            _save(ir_model, scratch, final.name)
        del ir_model
    gc.collect()  # an IR graph is a web of cycles (nodes <-> values): only the collector frees it
    verification = check(scratch / main.name) if check else None
    for written in sorted(scratch.iterdir()):
        os.replace(written, stage.path(main.parent / written.name))
    _stage_task(task, main, stage)
    return verification, hot_digest


def _stage_task(task: Task, graph: Path, stage: Staging) -> tuple[Path, Path]:
    paths = task_file_paths(graph, task.name)
    write_task(stage.path(paths[0]), task)
    write_onnx_adapter(stage.path(paths[1]), task)
    return paths


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
    kv_cache: bool = False,
    progress: Callable[[str], None] = lambda message: None,
    staging: Staging | None = None,
    reads: Sequence[str | os.PathLike] = (),
) -> ExportResult:
    """Export a VeRA-adapted ``model`` (ours or PEFT's) to one ONNX graph at ``out``.

    Writes ``out``, plus the exported task as ``<stem>.<task>.task.safetensors`` and
    ``<stem>.<task>.onnx_adapter`` beside it. Nothing is left behind if any step fails.
    ``hot_template`` also writes ``<stem>.hot.onnx``, the merged form that lets the runtime serve
    one task at merged-graph speed (a second copy of the weights on disk). An export to an existing
    graph replaces its whole set of files: task files of the old graph do not stay beside the new one.
    With ``staging`` (several tasks in one command), the files are staged there for the caller to publish.
    ``reads``: the files the model came from (a checkpoint): an output that is one of them is refused.
    ``kv_cache`` (causal LMs): a graph for generation, which takes and returns the KV cache
    (``past_key_values.{i}.key``/``.value`` in, ``present.{i}.…`` out) and sets its inputs itself.
    """
    start = time.perf_counter()
    out = Path(out)
    # 1. Check what can be checked before the slow trace: the output, the inputs, the model's precision.
    check_writable(out, reads)
    if kv_cache:
        if inputs:
            raise VeraExportError("--kv-cache sets the graph's inputs itself (the genai layout): drop --input.")
        model = model if isinstance(model, CachedCausalLM) else CachedCausalLM(model)
    specs = model_input_specs(model, inputs)
    _check_float32(model)
    model.eval()
    # 2. Find the VeRA layers and heads; write the contract and the exported task.
    adapted = find_vera_layers(model, task_name)
    check_task_name(adapted.task_name)
    generator = torch.Generator().manual_seed(0)
    examples = {spec.name: spec.example(generator) for spec in specs}
    contract = _contract(adapted, model, base_digest(model), specs)
    task = current_task(adapted, contract)
    # 3. Trace with torch.export, then run the graph passes (and the same for the hot template).
    progress(f"Tracing {len(adapted.layers)} VeRA layers (r={adapted.r}) with torch.export ...")
    output_names = list(flatten_outputs(_eager(model, examples)))
    build = (model, adapted, specs, examples, output_names, opset, contract, task)
    ir_models = {out: _build_ir_model(*build)}
    hot = None
    if hot_template:
        progress("Tracing the hot template (merged weights) ...")
        ir_models[hot_template_path(out)] = _build_ir_model(*build, merged=True)
        hot = ir.to_proto(ir_models[hot_template_path(out)]).SerializeToString()  # its task values inline
    task_path, adapter_path = task_file_paths(out, adapted.task_name)

    def check(path: Path) -> Verification:
        progress("Verifying ONNX Runtime against PyTorch ...")
        return _require_pass(verify_export(model, adapted, path, examples, tolerance, hot))

    # 4. Stage every file, verify ONNX Runtime against PyTorch, then publish the set (or nothing).
    with writing(out, staging, replaces_set=True, inputs=tuple(map(Path, reads))) as stage:
        verification, hot_digest = _stage_all(ir_models, task, stage, check if verify else None)
    contract = dataclasses.replace(contract, hot_template_sha256=hot_digest or None)
    return ExportResult(out, task_path, adapter_path, contract, verification, time.perf_counter() - start)


def add_task(
    model: nn.Module, graph: str | os.PathLike, task_name: str | None = None, *, overwrite: bool = False,
    reads: Sequence[str | os.PathLike] = (), also: Callable[[Staging, Contract, str], None] | None = None,
) -> tuple[Path, Path]:
    """Write ``model``'s current λ as another task of an exported graph, beside it.

    The model must share the graph's base weights, A, B and layers (same fingerprint): typically the
    same base model fine-tuned on another task. A task the graph already has (its default task
    included) is replaced only with ``overwrite``. Returns the task file and ``.onnx_adapter`` paths.
    ``reads``: the files the model came from: a task file that is one of them is refused.
    ``also(stage, contract, name)`` stages more files in the same set (a PEFT task's label names).
    """
    graph = Path(graph)
    contract = read_contract(graph)
    name = check_task_name(find_vera_layers(model, task_name).task_name)
    paths = task_file_paths(graph, name)
    if not overwrite and (name == contract.default_task or _exists(paths)):
        raise VeraExportError(
            f"{graph} already has a task '{name}' ({paths[0].name}): choose another name with"
            " --task-name, or replace it with --overwrite."
        )
    digest = base_digest(model) if contract.base_digest else None  # graphs exported before digests have none
    with writing(graph, None, replaces_set=False, inputs=tuple(map(Path, reads))) as stage:
        paths = stage_task(model, graph, contract, stage, name, digest)
        if also:
            also(stage, contract, name)
        return paths


def stage_task(
    model: nn.Module, graph: Path, contract: Contract, stage: Staging, task_name: str, digest: str | None
) -> tuple[Path, Path]:
    """Stage ``model``'s current λ as task ``task_name`` of the graph ``contract`` describes; ``digest``
    is the model's ``base_digest`` (one per model, whatever the number of its tasks)."""
    adapted = find_vera_layers(model, task_name)
    _check_float32(model)
    _check_fits(adapted, model, contract, graph, digest)
    return _stage_task(current_task(adapted, contract), graph, stage)


def _exists(paths) -> bool:
    return any(path.exists() for path in paths)


def _check_fits(adapted: AdaptedModel, model: nn.Module, contract: Contract, graph: Path, digest: str | None) -> None:
    mine = _contract(adapted, model, digest)
    if mine.fingerprint != contract.fingerprint:
        reason = (
            f"its base weights differ (digest {mine.base_digest[:12]}, the graph's {contract.base_digest[:12]}),"
            " and a task only fits the base it was trained on"
        ) if mine.base_digest != contract.base_digest else "its A/B, r or adapted layers differ"
        raise VeraExportError(
            f"this model's VeRA layers do not fit {graph} (fingerprint {mine.fingerprint[:12]}, the graph"
            f" has {contract.fingerprint[:12]}): {reason}; export it as its own graph."
        )

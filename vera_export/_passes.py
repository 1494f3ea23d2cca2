"""Transformations of the traced ONNX graph, in the order ``_export`` applies them.

Each function is one in-place transformation of an ``onnx_ir.Model``, small enough to read whole.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer

from vera_runtime import Contract

from ._errors import VeraExportError

_PROJECTIONS = ("vera_A", "vera_B")
_FOLDABLE_WEIGHT_BYTES = 128  # larger initializers are never folded into new copies


def fold_constants(model: ir.Model) -> None:
    """Fold shape arithmetic, but never a weight into a derived copy (a slice of A, a transposed W).

    The exporter's default optimisation folds ``Slice(vera_A)`` into one copy per layer shape and
    ``Transpose(W)`` into a copy of tied weights; ONNX Runtime folds those at session creation
    instead, so the file keeps each tensor exactly once.
    """

    def should_fold(node: ir.Node) -> bool | None:
        for value in node.inputs:
            if value is not None and value.is_initializer() and value.const_value is not None:
                if value.const_value.nbytes > _FOLDABLE_WEIGHT_BYTES:
                    return False
        return None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
    _release_rewrite_rules()


def _release_rewrite_rules() -> None:
    """onnxscript (0.7) keeps its default rewrite rules at module level, and each rule's matcher keeps
    the last graph and node it matched: that pins the whole graph, every weight stored in it
    included, until the next optimisation. On a 2.8 GB Llama the export then peaked at 3.2× the
    weights, instead of 2.2×. Forget them (attributes that a later onnxscript lacks are skipped)."""
    from onnxscript import rewriter

    for rule in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()):
        matcher = getattr(rule, "_matcher", None)
        for attribute in ("_graph", "_current_node", "_match"):
            if hasattr(matcher, attribute):
                setattr(matcher, attribute, None)


def store_weights_as_consumed(model: ir.Model) -> None:
    """Store each weight that only a ``Transpose`` reads already transposed, and drop the Transpose.

    torch exports ``nn.Linear`` as ``MatMul(x, Transpose(W))``; quantizers and fp16 converters look
    for MatMul weights that are initializers and skip these. A weight with several readers (tied
    embeddings) keeps its one stored copy and its layout, and so do ``vera_A`` and ``vera_B``, whose
    layout the contract fixes (run after ``name_projections``).
    """
    readers: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):  # subgraphs read outer weights too
        for value in node.inputs:
            if value is not None and value.name:
                readers[value.name] = readers.get(value.name, 0) + 1
    graph_inputs = {value.name for value in model.graph.inputs}
    for node in list(model.graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" else None
        if weight is None or not _owned_weight(weight, readers, graph_inputs) or node.outputs[0].is_graph_output():
            continue
        array = weight.const_value.numpy()
        perm_attr = node.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(reversed(range(array.ndim)))
        weight.const_value = ir.tensor(np.ascontiguousarray(np.transpose(array, perm)), name=weight.name)
        weight.shape = ir.Shape(weight.const_value.shape)
        ir.convenience.replace_all_uses_with(node.outputs[0], weight)
        model.graph.remove(node, safe=True)


def _owned_weight(value: ir.Value, readers: dict[str, int], graph_inputs: set[str]) -> bool:
    """A stored weight, read by one node only, that the contract lets us re-lay out."""
    return (
        value.is_initializer() and value.const_value is not None and readers.get(value.name) == 1
        and value.name not in graph_inputs and value.name not in _PROJECTIONS
    )


def strip_trace_metadata(model: ir.Model) -> None:
    """Drop the per-node source locations and stack traces torch.export records (~1 KB a node)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()


def _find_initializer(model: ir.Model, array: np.ndarray, label: str) -> ir.Value:
    matches = [
        value for value in model.graph.initializers.values()
        if value.const_value is not None
        and tuple(value.shape or ()) == array.shape
        and np.array_equal(value.const_value.numpy(), array)
    ]
    if len(matches) != 1:
        raise VeraExportError(
            f"the traced graph holds {len(matches)} copies of {label}, not one: please report this"
            " with your torch and onnxscript versions."
        )
    return matches[0]


def name_projections(model: ir.Model, vera_a: np.ndarray, vera_b: np.ndarray) -> None:
    """Give the one A and the one B initializer the contract's names, ``vera_A`` and ``vera_B``."""
    for label, array in (("vera_A", vera_a), ("vera_B", vera_b)):
        _find_initializer(model, array, label).name = label


def strip_prefix(model: ir.Model, prefix: str) -> None:
    """Drop the tracing wrapper's prefix from weight names, so they read as in the model's state dict."""
    names = set(model.graph.initializers)
    for value in list(model.graph.initializers.values()):
        name = value.name or ""
        if name.startswith(prefix) and name[len(prefix):] not in names:
            value.name = name[len(prefix):]


def add_task_defaults(model: ir.Model, tensors: dict[str, np.ndarray]) -> None:
    """Give each task input a default initializer (shape ``[1, n]``) holding the exported task."""
    inputs = {value.name: value for value in model.graph.inputs}
    for name, array in tensors.items():
        value = inputs[name]
        value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32)[None], name=name)
        model.graph.register_initializer(value)


HOT_TEMPLATE_KEY = "vera.hot_template_tensors"


def inline_task(model: ir.Model, tensors: dict[str, np.ndarray]) -> None:
    """Turn task inputs into plain initializers (the hot template): values a session replaces
    with its task's, and that ONNX Runtime then treats as constants."""
    model.metadata_props[HOT_TEMPLATE_KEY] = json.dumps(list(tensors))
    for name, array in tensors.items():
        value = next(v for v in model.graph.inputs if v.name == name)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32)[None], name=name)
        value.shape = ir.Shape(value.const_value.shape)
        model.graph.register_initializer(value)


def set_metadata(model: ir.Model, contract: Contract) -> None:
    model.metadata_props.update(contract.to_metadata())

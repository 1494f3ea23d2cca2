"""Factored only: each adapted layer's ``If`` (form ΔW for a large one-task batch, else run factored)
replaced by its factored branch, inlined.

Quantized and float16 weights can't take ``W + ΔW`` at their precision; the factored path keeps the
base matmul on the converted weight, where the converters find it, and the adapter in float32.
"""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import onnx
import onnx_ir as ir


def _is_vera_branch(node: ir.Node) -> bool:
    """An ``If`` the exporter wrote for an adapted layer: its branches read the shared ``vera_B``."""
    if node.op_type != "If":
        return False
    branches = [attr.as_graph() for attr in node.attributes.values() if attr.type == ir.AttributeType.GRAPH]
    return any(value is not None and value.name == "vera_B"
               for branch in branches for inner in ir.traversal.RecursiveGraphIterator(branch)
               for value in inner.inputs)


@contextlib.contextmanager
def _quiet():
    """The optimizer's deduplication pass logs a warning per task input (it may not merge inputs)."""
    logger = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def factored_only(proto: onnx.ModelProto) -> onnx.ModelProto:
    from .. import _passes

    model = ir.from_proto(proto)
    # A x shared by several layers has an If of its own (computed, or zeros when ΔW is formed) on the
    # same condition as theirs: every If on a condition of the layers' decides with them.
    conditions = {node.inputs[0] for node in model.graph if _is_vera_branch(node)}
    for node in [n for n in model.graph if n.op_type == "If" and n.inputs[0] in conditions]:
        false = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(False))})
        model.graph.insert_before(node, false)
        node.replace_input_with(0, false.outputs[0])
    with _quiet():
        _passes.fold_constants(model)  # inlines each If whose condition is now constant
    _passes.store_weights_as_consumed(model)
    return ir.to_proto(model)

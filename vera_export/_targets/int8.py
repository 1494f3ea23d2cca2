"""``int8``: ONNX Runtime's dynamic quantization of the base weights only.

Quantized per channel: every MatMul, Gemm and Gather (embedding table) whose weight is a base
initializer. Kept in float32: ``vera_A`` and ``vera_B`` (quantizing them flips labels: they carry
every task's signal), the task inputs (λ, heads) and activations, so the same task files work.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import tempfile
from pathlib import Path

import onnx
from onnx import helper, numpy_helper

from vera_runtime import Contract

from .. import _defaults
from . import base_weights

_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}


def to_int8(proto: onnx.ModelProto, contract: Contract) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = base_weights(proto, contract)
    _gemms_as_matmuls(proto, weights)
    for index, node in enumerate(proto.graph.node):
        node.name = node.name or f"vera_node_{index}"
    chosen = [
        node.name for node in proto.graph.node
        if node.op_type in _WEIGHT_INPUT and node.domain in ("", "ai.onnx")
        and (weight := weights.get(node.input[_WEIGHT_INPUT[node.op_type]])) is not None and len(weight.dims) == 2
    ]
    big = sum(t.ByteSize() for t in proto.graph.initializer) > _defaults.EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory() as folder, _quiet_root_logger():  # it logs a pre-processing hint
        out = Path(folder) / "int8.onnx"
        quantize_dynamic(proto, out, weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=chosen,
                         op_types_to_quantize=list(_WEIGHT_INPUT), use_external_data_format=big)
        return onnx.load(str(out))


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _plain_gemm_weight(node, weights, readers) -> onnx.TensorProto | None:
    """The weight of ``Gemm(x, W[, b])`` (no transA, alpha = beta = 1) when W is a base weight read once."""
    if node.op_type != "Gemm" or node.input[1] not in weights or readers[node.input[1]] > 1:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plain = not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
    return weights[node.input[1]] if plain else None


def _gemms_as_matmuls(proto: onnx.ModelProto, weights: dict[str, onnx.TensorProto]) -> None:
    """ORT's dynamic quantizer skips Gemm: rewrite ``Gemm(x, W, b)`` with a base weight as MatMul + Add
    (``weights``: the base weights by name; a transposed one is rewritten in place)."""
    readers = collections.Counter(name for node in proto.graph.node for name in node.input)
    nodes = []
    for node in proto.graph.node:
        weight = _plain_gemm_weight(node, weights, readers)
        if weight is None:
            nodes.append(node)
            continue
        if any(a.name == "transB" and a.i for a in node.attribute):
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name))
            stale = [v for v in proto.graph.value_info if v.name == weight.name]  # its old shape
            for info in stale:
                proto.graph.value_info.remove(info)
        product = f"{node.output[0]}_matmul" if len(node.input) > 2 and node.input[2] else node.output[0]
        nodes.append(helper.make_node("MatMul", node.input[:2], [product], name=f"{node.name}_matmul"))
        if product != node.output[0]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_add"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)

"""Graph forms for other ONNX Runtime targets, one transformation per module.

``web``, ``int8`` and ``fp16`` rewrite an ONNX ModelProto; ``ort`` has ONNX Runtime save the result in
its mobile format. Each keeps the contract: the same task inputs, the same task files.
"""

from __future__ import annotations

import collections

import onnx
from onnx import helper, numpy_helper

from vera_runtime import Contract

PROJECTIONS = ("vera_A", "vera_B")


def base_weights(proto: onnx.ModelProto, contract: Contract) -> dict[str, onnx.TensorProto]:
    """The base model's float weights: every float initializer but A, B and the task defaults."""
    task_inputs = set(contract.task_shapes())
    return {
        tensor.name: tensor for tensor in proto.graph.initializer
        if tensor.name not in task_inputs and tensor.name not in PROJECTIONS
        and tensor.data_type == onnx.TensorProto.FLOAT
    }


def take_task_defaults(proto: onnx.ModelProto, contract: Contract) -> list[onnx.TensorProto]:
    """Take the task inputs' default initializers out of ``proto`` and return them."""
    task_inputs = set(contract.task_shapes())
    defaults = [t for t in proto.graph.initializer if t.name in task_inputs]
    kept = [t for t in proto.graph.initializer if t.name not in task_inputs]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return defaults


def _plain_gemm_weight(node, weights, readers) -> onnx.TensorProto | None:
    """The weight of ``Gemm(x, W[, b])`` (no transA, alpha = beta = 1) when W is a base weight read once."""
    if node.op_type != "Gemm" or node.input[1] not in weights or readers[node.input[1]] > 1:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plain = not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
    return weights[node.input[1]] if plain else None


def gemms_as_matmuls(proto: onnx.ModelProto, weights: dict[str, onnx.TensorProto]) -> None:
    """ORT's quantizers skip Gemm: rewrite ``Gemm(x, W, b)`` with a base weight as MatMul + Add
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

"""Graph forms for other ONNX Runtime targets, one transformation per module.

``web``, ``int8`` and ``fp16`` rewrite an ONNX ModelProto; ``ort`` has ONNX Runtime save the result in
its mobile format. Each keeps the contract: the same task inputs, the same task files.
"""

from __future__ import annotations

import onnx

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

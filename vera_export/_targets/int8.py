"""``int8``: ONNX Runtime's dynamic quantization of the base weights only.

Quantized per channel: every MatMul, Gemm and Gather (embedding table) whose weight is a base
initializer. Kept in float32: ``vera_A`` and ``vera_B`` (quantizing them flips labels: they carry
every task's signal), the task inputs (λ, heads) and activations, so the same task files work.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import onnx

from vera_runtime import Contract

from .. import _defaults
from . import base_weights, gemms_as_matmuls

_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}


def to_int8(proto: onnx.ModelProto, contract: Contract) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = base_weights(proto, contract)
    gemms_as_matmuls(proto, weights)
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

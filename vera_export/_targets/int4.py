"""``int4``: the base MatMul weights as MatMulNBits, 4-bit blocks, with ONNX Runtime's own quantizer.

Quantized: every MatMul whose weight is a base initializer with at least 64 outputs (attention and MLP
projections, an untied lm_head): symmetric, ``block_size`` weights per scale along the input dimension,
accuracy level 4 (int8 arithmetic on the CPU), as onnxruntime-genai's builder makes its int4 models.
Kept in float32: ``vera_A`` and ``vera_B`` (they carry every task's signal; their MatMuls read slices,
not initializers), the task inputs (λ, head tensors), so the same task files work; the embedding
tables (a Gather reads one row per token: 4 bits there cost precision and save no arithmetic); a tied
lm_head, which reads the embedding table through a Transpose and so stays with it; and layers with
fewer outputs, such as a classifier over a few labels: they hold almost no bytes, and their error
lands on the logits directly.
"""

from __future__ import annotations

import contextlib
import logging

import onnx

from vera_runtime import Contract

from . import base_weights, gemms_as_matmuls

BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits takes powers of two from 16
_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits on the CPU: the builder's choice for int4
_MIN_OUTPUTS = 64


def to_int4(proto: onnx.ModelProto, contract: Contract, block_size: int = 32) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weights = base_weights(proto, contract)
    gemms_as_matmuls(proto, weights)
    for index, node in enumerate(proto.graph.node):
        node.name = node.name or f"vera_node_{index}"
    chosen = {
        node.name for node in proto.graph.node
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
        and (weight := weights.get(node.input[1])) is not None and len(weight.dims) == 2
        and weight.dims[1] >= _MIN_OUTPUTS  # MatMul weights are [in, out]
    }
    # The quantizer takes every MatMul with a constant weight, nodes_to_include only adds to them: the
    # others (A/B slices, task defaults, small layers) are excluded by name.
    others = [node.name for node in proto.graph.node if node.op_type == "MatMul" and node.name not in chosen]
    with _quiet(logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")):  # a line per node
        quantizer = MatMulNBitsQuantizer(proto, block_size=block_size, is_symmetric=True,
                                         accuracy_level=_ACCURACY_LEVEL, nodes_to_exclude=others)
        quantizer.process()
    return quantizer.model.model


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

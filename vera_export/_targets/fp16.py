"""``fp16``: weights and arithmetic in float16; task inputs and outputs stay float32.

ONNX Runtime's float16 converter, with the fix the raw tool needs here: the task defaults are taken
out first (it would turn them into float16 while their inputs stay float32, and the graph would not
load) and put back unchanged, so the same float32 task files and ``.onnx_adapter`` files work.
"""

from __future__ import annotations

import onnx

from vera_runtime import Contract

from . import take_task_defaults


def to_fp16(proto: onnx.ModelProto, contract: Contract) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    defaults = take_task_defaults(proto, contract)
    half = convert_float_to_float16(proto, keep_io_types=True)  # out of topological order: _convert sorts
    half.graph.initializer.extend(defaults)
    return half

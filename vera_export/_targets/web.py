"""``web``: task inputs without default initializers, the form JavaScript runtimes accept.

onnxruntime-node and onnxruntime-web (1.30) hide graph inputs that have a default initializer: node
then silently runs the default task whatever λ is fed, web refuses the feed. With the defaults gone
every task input is a required input: a run must feed a task, which is what the runtimes do.
"""

from __future__ import annotations

import onnx

from vera_runtime import Contract

from . import take_task_defaults


def to_web(proto: onnx.ModelProto, contract: Contract) -> onnx.ModelProto:
    take_task_defaults(proto, contract)
    return proto

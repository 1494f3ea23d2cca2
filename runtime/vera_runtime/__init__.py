"""vera_runtime: the torch-free side of vera-export (numpy, safetensors and onnxruntime only)."""

from ._contract import CONTRACT_VERSION, Contract, ContractError, LayerSpec, fingerprint
from ._taskfile import (
    ADAPTER_SUFFIX,
    TASK_SUFFIX,
    Task,
    TaskFileError,
    read_onnx_adapter,
    read_task,
    write_onnx_adapter,
    write_task,
)

__all__ = [
    "ADAPTER_SUFFIX",
    "CONTRACT_VERSION",
    "Contract",
    "ContractError",
    "LayerSpec",
    "TASK_SUFFIX",
    "Task",
    "TaskFileError",
    "fingerprint",
    "read_onnx_adapter",
    "read_task",
    "write_onnx_adapter",
    "write_task",
]

"""vera_runtime: the torch-free side of vera-export (numpy, safetensors and onnxruntime only)."""

from ._bank import BankError, TaskBank
from ._contract import CONTRACT_VERSION, Contract, ContractError, HeadSpec, LayerSpec, fingerprint
from ._errors import ClosedError, DeviceError, FeedError, GraphError, VeraError
from ._feeds import InputInfo
from ._publish import JournalError
from ._session import VeraSession
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
    "BankError",
    "CONTRACT_VERSION",
    "ClosedError",
    "Contract",
    "ContractError",
    "DeviceError",
    "FeedError",
    "GraphError",
    "HeadSpec",
    "InputInfo",
    "JournalError",
    "LayerSpec",
    "TASK_SUFFIX",
    "Task",
    "TaskBank",
    "TaskFileError",
    "VeraError",
    "VeraSession",
    "fingerprint",
    "read_onnx_adapter",
    "read_task",
    "write_onnx_adapter",
    "write_task",
]

"""vera-export: VeRA-adapted PyTorch models to one ONNX graph, with each task's λ vectors as inputs.

Names are imported on first use (PEP 562): ``import vera_export`` and the CLI's help stay fast, and
torch is imported only when a model is loaded or exported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "Dim": "_inputs",
    "ExportResult": "_export",
    "InputSpec": "_inputs",
    "LoadedModel": "_checkpoint",
    "LoraResult": "_lora",
    "PeftExportResult": "_peft",
    "UntrustedFileError": "_errors",
    "Verification": "_verify",
    "VeraConfig": "_layer",
    "VeraExportError": "_errors",
    "VeraLinear": "_layer",
    "add_peft_task": "_peft",
    "add_task": "_export",
    "ConvertResult": "_convert",
    "convert": "_convert",
    "apply_vera": "_layer",
    "export": "_export",
    "export_peft": "_peft",
    "export_fused": "_fused",
    "export_lora": "_lora",
    "export_plain": "_plain",
    "load_model": "_checkpoint",
    "read_contract": "_graphfile",
    "save_checkpoint": "_checkpoint",
}

__all__ = [
    "ConvertResult", "Dim", "ExportResult", "InputSpec", "LoadedModel", "LoraResult", "PeftExportResult",
    "UntrustedFileError", "Verification", "VeraConfig", "VeraExportError", "VeraLinear", "add_peft_task", "add_task",
    "apply_vera", "convert", "export", "export_fused", "export_lora", "export_peft", "export_plain", "load_model",
    "read_contract", "save_checkpoint",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'vera_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._checkpoint import LoadedModel, load_model, save_checkpoint
    from ._convert import ConvertResult, convert
    from ._errors import UntrustedFileError, VeraExportError
    from ._export import ExportResult, add_task, export
    from ._fused import export_fused
    from ._graphfile import read_contract
    from ._inputs import Dim, InputSpec
    from ._layer import VeraConfig, VeraLinear, apply_vera
    from ._lora import LoraResult, export_lora
    from ._peft import PeftExportResult, add_peft_task, export_peft
    from ._plain import export_plain
    from ._verify import Verification

"""vera-export: VeRA-adapted PyTorch models to one ONNX graph, with each task's λ vectors as inputs."""

from ._checkpoint import LoadedModel, load_model, save_checkpoint
from ._errors import UntrustedFileError, VeraExportError
from ._export import ExportResult, add_task, export, read_contract
from ._inputs import Dim, InputSpec
from ._layer import VeraConfig, VeraLinear, apply_vera
from ._peft import PeftExportResult, export_peft
from ._verify import Verification

__all__ = [
    "Dim",
    "ExportResult",
    "InputSpec",
    "LoadedModel",
    "PeftExportResult",
    "UntrustedFileError",
    "Verification",
    "VeraConfig",
    "VeraExportError",
    "VeraLinear",
    "add_task",
    "apply_vera",
    "export",
    "export_peft",
    "load_model",
    "read_contract",
    "save_checkpoint",
]

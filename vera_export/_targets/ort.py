"""``ort``: ONNX Runtime's mobile format (``.ort``), with the task inputs still overridable.

Saved by ONNX Runtime itself after its basic, provider-independent optimisations (what
``convert_onnx_models_to_ort`` calls the Runtime style: NNAPI and CoreML can still take nodes).
ORT never folds through inputs that have defaults, so λ stays an input; the metadata stays too.
"""

from __future__ import annotations

from pathlib import Path


def save_as_ort(onnx_path: Path, out: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # one warning per task input's default otherwise
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

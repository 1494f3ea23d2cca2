"""Choosing ONNX Runtime's execution provider without error spam on CPU-only machines.

Asking ORT for CUDA where its libraries are missing logs an error and silently falls back to the
CPU. So we first check that ORT's CUDA provider library can be loaded at all (``dlopen`` reports
the exact missing library), and after creating a session we check which provider it really got.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import sys
from pathlib import Path

import onnxruntime as ort

from ._errors import DeviceError, GraphError, printable

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_INSTALL_HINT = "install CUDA 13 and cuDNN 9, e.g. pip install 'onnxruntime-gpu[cuda,cudnn]'"


def cuda_problem() -> str | None:
    """None when ORT's CUDA provider can load here, else what is missing, in words."""
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime ({ort.__version__}) has no CUDA provider: install onnxruntime-gpu instead"
    if importlib.util.find_spec("nvidia") is not None and hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()):  # it prints each library it can't find
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, which are not on the search path
    name = "onnxruntime_providers_cuda.dll" if sys.platform == "win32" else "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(Path(ort.__file__).parent / "capi" / name))
    except OSError as exc:
        return f"ONNX Runtime's CUDA provider cannot load ({exc}): {_INSTALL_HINT}"
    return None


def _load(path: str, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """ORT's session, or GraphError naming the file and what ORT refused (a damaged graph, external data
    outside the graph's folder or missing, a link loop)."""
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf/NoSuchFile types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphError(f"ONNX Runtime cannot load {path}: {printable(first, 400)}. Export the graph again, or"
                         " copy its whole folder (the graph with its .data file).") from exc


def create_session(path: str, device: str, options: ort.SessionOptions) -> tuple[ort.InferenceSession, str]:
    """An InferenceSession on ``device`` ("auto", "cpu" or "cuda") and the device it really uses."""
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device {device!r} is not one of 'auto', 'cpu', 'cuda'.")
    problem = cuda_problem() if device != "cpu" else "not asked for"
    if device == "cuda" and problem:
        raise DeviceError(f"device='cuda' was asked for, but {problem}.")
    if problem:
        return _load(path, options, [CPU]), "cpu"
    session = _load(path, options, [CUDA, CPU])
    if session.get_providers()[0] == CUDA:
        return session, "cuda"
    if device == "cuda":
        raise DeviceError(f"ONNX Runtime could not start its CUDA provider for {path} (no usable GPU?).")
    return _load(path, options, [CPU]), "cpu"

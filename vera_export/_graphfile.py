"""Read an exported graph's contract without torch: ``inspect`` and ``task`` start fast."""

from __future__ import annotations

import os
from pathlib import Path

from vera_runtime import Contract
from vera_runtime.files import file_problem

from ._errors import VeraExportError


def refuse_graph_as_model(path: str | os.PathLike) -> None:
    """An ONNX file given where a PyTorch model belongs: say so before torch is even imported. (ONNX files
    open with the ir_version field, tag 0x08; torch.save writes a zip, "PK", or a pickle, 0x80.)"""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            first = handle.read(1)
    except OSError:
        return  # the loader names what is wrong with the file
    if path.suffix in (".onnx", ".ort") or first == b"\x08":
        raise VeraExportError(
            f"{path} is an ONNX graph, not a PyTorch model: vera-export takes the model you fine-tuned"
            " (torch.save(model), a vera-export checkpoint, or a PEFT adapter folder). To see what a graph"
            f" holds: vera-export inspect {path}; to add a task to it: vera-export task MODEL --graph {path}."
        )


def load_graph(graph_path: str | os.PathLike):
    """A graph's ModelProto (external weights not loaded) and its contract."""
    import onnx

    graph_path = Path(graph_path)
    if problem := file_problem(graph_path):
        raise VeraExportError(f"graph file {graph_path} {problem}.")
    try:
        proto = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise VeraExportError(f"{graph_path} is not a readable ONNX file: {exc}") from exc
    return proto, Contract.from_metadata({p.key: p.value for p in proto.metadata_props}, str(graph_path))


def read_contract(graph_path: str | os.PathLike) -> Contract:
    """The contract in a vera-export graph's metadata."""
    return load_graph(graph_path)[1]

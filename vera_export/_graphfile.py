"""Read an exported graph's contract without torch: ``inspect`` and ``task`` start fast."""

from __future__ import annotations

import os
from pathlib import Path

from vera_runtime import Contract
from vera_runtime._io import file_problem

from ._errors import VeraExportError


def load_graph(graph_path: str | os.PathLike):
    """A graph's ModelProto (external weights not loaded) and its contract."""
    import onnx

    graph_path = Path(graph_path)
    if problem := file_problem(graph_path):
        raise VeraExportError(f"graph file {graph_path} {problem}.")
    try:
        proto = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise VeraExportError(f"{graph_path} is not a readable ONNX file: {exc}") from None
    return proto, Contract.from_metadata({p.key: p.value for p in proto.metadata_props}, str(graph_path))


def read_contract(graph_path: str | os.PathLike) -> Contract:
    """The contract in a vera-export graph's metadata."""
    return load_graph(graph_path)[1]

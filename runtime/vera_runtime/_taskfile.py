"""Task files: one task's vectors, tagged with the fingerprint of the graph they belong to.

Two formats carry the same tensors:
- ``NAME.task.safetensors`` (native): tensors without the task dimension, e.g. ``(r,)``, plus
  metadata with the task name and fingerprint;
- ``NAME.onnx_adapter`` (ONNX Runtime's adapter format): tensors shaped as graph feeds, e.g.
  ``(1, r)``, so plain ONNX Runtime can activate them with ``RunOptions.add_active_adapter``.
  The format has no string metadata: the first 28 bits of the fingerprint go into its
  ``model_version`` field.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import re
from pathlib import Path

import numpy as np

from ._contract import CONTRACT_VERSION, Contract
from ._io import atomic_path, atomic_write_bytes, file_problem

TASK_SUFFIX = ".task.safetensors"
ADAPTER_SUFFIX = ".onnx_adapter"
_FORMAT = "vera-task"
_TASK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # no dots: <stem>.<task>.task.safetensors stays unambiguous


class TaskFileError(ValueError):
    """A task file is missing, unreadable, or does not fit the graph."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its name, the graph fingerprint it was made for, and its tensors.

    ``tensors`` maps graph input names to float32 arrays without the leading task dimension.
    """

    name: str
    fingerprint: str
    tensors: dict[str, np.ndarray]
    base_digest: str | None = None  # of the base weights it was trained over (native files write it)


def is_task_name(name: object) -> bool:
    return isinstance(name, str) and _TASK_NAME.fullmatch(name) is not None


def check_task_name(name: str) -> str:
    if not is_task_name(name):
        raise TaskFileError(
            f"task name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-' (no dots: task files"
            " are named <graph stem>.<task>.task.safetensors)."
        )
    return name


def adapter_model_version(fingerprint: str) -> int:
    """The part of a fingerprint that fits ONNX Runtime's adapter ``model_version`` field."""
    return int(fingerprint[:7], 16)


def check_task(task: Task, contract: Contract, source: str) -> None:
    """Refuse a task whose base weights, fingerprint, tensor names, shapes, dtypes or values don't fit."""
    if task.fingerprint != contract.fingerprint:
        other_base = task.base_digest and contract.base_digest and task.base_digest != contract.base_digest
        base = (
            f"; it was trained over other base weights (digest {task.base_digest[:12]}, this graph's base is"
            f" {contract.base_digest[:12]}), and a task only fits the base model it was trained on"
        ) if other_base else ""
        raise TaskFileError(
            f"{source} was made for another graph (fingerprint {task.fingerprint[:12]}, this graph"
            f" has {contract.fingerprint[:12]}){base}: use the task files exported with this graph, or"
            " re-export the task against it."
        )
    expected = contract.task_shapes()
    missing = sorted(set(expected) - set(task.tensors))
    unknown = sorted(set(task.tensors) - set(expected))
    if missing or unknown:
        detail = f"missing {missing[:3]}" if missing else f"unknown {unknown[:3]}"
        raise TaskFileError(f"{source} does not match the graph's layers: {detail} tensors.")
    for name, shape in expected.items():
        array = task.tensors[name]
        if array.dtype != np.float32 or array.shape != shape:
            raise TaskFileError(
                f"{source}: tensor '{name}' is {array.dtype}{list(array.shape)}, the graph needs"
                f" float32{list(shape)}."
            )
        if not np.isfinite(array).all():
            raise TaskFileError(f"{source}: tensor '{name}' holds NaN or Inf values.")


def write_task(path: str | os.PathLike, task: Task) -> Path:
    """Write ``task`` as a native task file (safetensors), atomically."""
    from safetensors.numpy import save

    check_task_name(task.name)
    metadata = {
        "format": _FORMAT,
        "vera.contract_version": CONTRACT_VERSION,
        "vera.task": task.name,
        "vera.fingerprint": task.fingerprint,
    }
    if task.base_digest:
        metadata["vera.base_digest"] = task.base_digest
    tensors = {name: np.ascontiguousarray(array) for name, array in task.tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return Path(path)


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """A safetensors file's metadata and tensors, read once; TaskFileError if it is missing or damaged."""
    from safetensors import SafetensorError, safe_open

    if problem := file_problem(path):
        raise TaskFileError(f"task file {path} {problem}.")
    try:
        with safe_open(path, framework="numpy") as reader:
            return reader.metadata() or {}, {name: reader.get_tensor(name) for name in reader.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise TaskFileError(f"{path} is not a readable task file (truncated or corrupt?): {exc}") from exc


def is_native(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == _FORMAT


def looks_native(metadata: dict[str, str]) -> bool:
    """Any of our keys: a task file, even one whose 'format' was lost, is never read as a PEFT file."""
    return is_native(metadata) or any(key.startswith("vera.") for key in metadata)


def native_task(metadata: dict[str, str], tensors: dict[str, np.ndarray], source: str) -> Task:
    """A native task file's task, refused unless it says what it is and which contract it follows."""
    if not is_native(metadata):
        raise TaskFileError(
            f"{source} carries vera-export metadata but not format={_FORMAT!r}: it is damaged or was edited;"
            " re-export the task with `vera-export task`."
        )
    version = metadata.get("vera.contract_version")
    if version != CONTRACT_VERSION:
        raise TaskFileError(
            f"{source} follows task contract version {version!r}; this vera-runtime reads version"
            f" {CONTRACT_VERSION}. Re-export the task, or upgrade vera-runtime."
        )
    return Task(metadata.get("vera.task", ""), metadata.get("vera.fingerprint", ""), tensors,
                metadata.get("vera.base_digest") or None)


def read_task(path: str | os.PathLike, contract: Contract | None = None) -> Task:
    """Read a native task file; with ``contract``, also refuse one that does not fit that graph."""
    path = Path(path)
    metadata, tensors = read_safetensors(path)
    if not looks_native(metadata):
        raise TaskFileError(f"{path} is a safetensors file but not a vera-export task file.")
    task = native_task(metadata, tensors, str(path))
    if contract is not None:
        check_task(task, contract, str(path))
    return task


def task_files_beside(graph: str | os.PathLike, suffix: str = TASK_SUFFIX) -> dict[str, Path]:
    """A graph's task files, by task name: exactly ``<stem>.<task><suffix>`` beside it. Task names have
    no dots, so ``encoder.v2.a1.task.safetensors`` belongs to ``encoder.v2.onnx``, never ``encoder.onnx``."""
    graph = Path(graph)
    stem = graph.with_suffix("").name
    found = {}
    for path in sorted(graph.parent.glob(f"{glob.escape(stem)}.*{suffix}")):
        name = path.name[len(stem) + 1 : -len(suffix)]
        if is_task_name(name):
            found[name] = path
    return found


def write_onnx_adapter(path: str | os.PathLike, task: Task) -> Path:
    """Write ``task`` as an ONNX Runtime ``.onnx_adapter`` file (feeds shaped ``(1, n)``), atomically."""
    import onnxruntime as ort

    # OrtValue.ortvalue_from_numpy does not own its array: keep every array alive until written.
    arrays = {name: np.ascontiguousarray(a, dtype=np.float32)[None] for name, a in task.tensors.items()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(int(CONTRACT_VERSION))
    adapter.set_model_version(adapter_model_version(task.fingerprint))
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()})
    with atomic_path(path) as tmp:
        try:
            adapter.export_adapter(str(tmp))
        except RuntimeError as exc:  # ORT's "Failed to write": say which file, as for any other OSError
            raise OSError(errno.EIO, f"ONNX Runtime could not write the adapter ({exc})", str(path)) from None
    return Path(path)


def read_onnx_adapter(path: str | os.PathLike) -> tuple[int, dict[str, np.ndarray]]:
    """Return an ``.onnx_adapter``'s model_version and its tensors, copied out of the reader."""
    import onnxruntime as ort

    path = Path(path)
    if problem := file_problem(path):
        raise TaskFileError(f"adapter file {path} {problem}.")
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
        # The arrays view memory owned by `adapter`: copy them before it goes away.
        tensors = {name: np.array(v.numpy(), copy=True) for name, v in adapter.get_parameters().items()}
        return adapter.get_model_version(), tensors
    except Exception as exc:  # ORT raises bare RuntimeError/Fail for any bad file
        raise TaskFileError(f"{path} is not a readable .onnx_adapter file: {exc}") from exc

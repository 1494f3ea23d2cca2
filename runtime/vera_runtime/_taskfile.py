"""Task files: one task's vectors, tagged with the fingerprint of the graph they belong to.

Two formats carry the same tensors:
- ``NAME.task.safetensors`` (native): tensors without the task dimension, e.g. ``(r,)``, plus
  metadata with the task name, the fingerprint and a SHA-256 of the tensors (a changed byte is refused);
- ``NAME.onnx_adapter`` (ONNX Runtime's adapter format): tensors shaped as graph feeds, e.g.
  ``(1, r)``, so plain ONNX Runtime can activate them with ``RunOptions.add_active_adapter``.
  The format has no string metadata: the first 28 bits of the fingerprint go into its
  ``model_version`` field, and it has no room for a digest: an adapter is checked against the native
  task file written beside it, when there is one.

Every reader checks a file's declared tensors (names, dtypes, shapes, sizes) against the graph before it
reads any of their bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ._contract import CONTRACT_VERSION, Contract
from ._errors import VeraError, printable
from ._header import Header, read_header, read_tensors
from ._io import atomic_path, atomic_write_bytes, file_problem

TASK_SUFFIX = ".task.safetensors"
ADAPTER_SUFFIX = ".onnx_adapter"
_FORMAT = "vera-task"
KEY_DIGEST = "vera.tensors_sha256"
_TASK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # no dots: <stem>.<task>.task.safetensors stays unambiguous


class TaskFileError(VeraError, ValueError):
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


def check_fingerprint(fingerprint: str, base_digest: str | None, contract: Contract, source: str) -> None:
    """Refuse a task made for another graph, naming other base weights when that is the reason."""
    if fingerprint != contract.fingerprint:
        other_base = base_digest and contract.base_digest and base_digest != contract.base_digest
        base = (
            f"; it was trained over other base weights (digest {printable(base_digest[:12])}, this graph's base is"
            f" {contract.base_digest[:12]}), and a task only fits the base model it was trained on"
        ) if other_base else ""
        raise TaskFileError(
            f"{source} was made for another graph (fingerprint {printable(fingerprint[:12])}, this graph"
            f" has {contract.fingerprint[:12]}){base}: use the task files exported with this graph, or"
            " re-export the task against it."
        )


def check_entries(header: Header, expected: Mapping[str, tuple[int, ...]], source: str,
                  optional: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Refuse a file whose declared tensors are not exactly the graph's (names, float32, shapes), before
    any tensor is read: a file cannot make us read what the graph does not take."""
    allowed = {**expected, **(optional or {})}
    _check_names(header.entries, expected, allowed, source)
    for name, entry in header.entries.items():
        if entry.dtype != "F32" or entry.shape != tuple(allowed[name]):
            dtype = entry.numpy_dtype.name if entry.numpy_dtype else printable(entry.dtype, 10)
            raise TaskFileError(
                f"{source}: tensor '{name}' is {dtype}{list(entry.shape)}, the graph needs"
                f" float32{list(allowed[name])}."
            )


def _check_names(found, expected, allowed, source: str) -> None:
    """Refuse names missing from ``expected`` or outside ``allowed``, naming a few of them."""
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(allowed))
    if missing or unknown:
        detail = f"missing {missing[:3]}" if missing else f"unknown {[printable(n, 80) for n in unknown[:3]]}"
        raise TaskFileError(f"{source} does not match the graph's layers: {detail} tensors.")


def check_task(task: Task, contract: Contract, source: str) -> None:
    """Refuse a task whose base weights, fingerprint, tensor names, shapes, dtypes or values don't fit."""
    check_fingerprint(task.fingerprint, task.base_digest, contract, source)
    expected = contract.task_shapes()
    _check_names(task.tensors, expected, expected, source)
    for name, shape in expected.items():
        array = task.tensors[name]
        if array.dtype != np.float32 or array.shape != shape:
            raise TaskFileError(
                f"{source}: tensor '{name}' is {array.dtype}{list(array.shape)}, the graph needs"
                f" float32{list(shape)}."
            )
        if not np.isfinite(array).all():
            raise TaskFileError(f"{source}: tensor '{name}' holds NaN or Inf values.")


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of tensors in name order: each name, dtype, shape and bytes (little-endian, C order)."""
    digest = hashlib.sha256(b"vera-export task tensors v1\0")
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        array = array.astype(array.dtype.newbyteorder("<"))
        digest.update(f"{name}\0{array.dtype.str}{list(array.shape)}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_digest(metadata: Mapping[str, str], tensors: Mapping[str, np.ndarray], source: str) -> None:
    """Refuse a native task file whose tensors are not the ones it was written with."""
    recorded = metadata.get(KEY_DIGEST)
    if not recorded:
        raise TaskFileError(
            f"{source} carries no digest of its tensors ('{KEY_DIGEST}'), so a changed byte could not be noticed:"
            " it was written by vera-export 0.1 or edited. Re-export the task with `vera-export task`."
        )
    if tensors_digest(tensors) != recorded:
        raise TaskFileError(
            f"{source}: its tensors do not match the digest it was written with: the file was damaged or edited"
            " after export. Re-export the task with `vera-export task`, or copy it again."
        )


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
    metadata[KEY_DIGEST] = tensors_digest(tensors)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return Path(path)


def read_safetensors_header(path: Path) -> Header:
    """A safetensors file's header, checked against the file's size; TaskFileError if missing or damaged."""
    if problem := file_problem(path):
        raise TaskFileError(f"task file {path} {problem}.")
    try:
        return read_header(path)
    except (OSError, ValueError) as exc:
        raise TaskFileError(f"{path} is not a readable task file (truncated or corrupt?): {exc}") from exc


def read_safetensors_tensors(path: Path, header: Header) -> dict[str, np.ndarray]:
    try:
        return read_tensors(path, header)
    except (OSError, ValueError) as exc:
        raise TaskFileError(f"{path} is not a readable task file (truncated or corrupt?): {exc}") from exc


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """A safetensors file's metadata and tensors, read once; TaskFileError if it is missing or damaged."""
    header = read_safetensors_header(path)
    return header.metadata, read_safetensors_tensors(path, header)


def is_native(metadata: Mapping[str, str]) -> bool:
    return metadata.get("format") == _FORMAT


def looks_native(metadata: Mapping[str, str]) -> bool:
    """Any of our keys: a task file, even one whose 'format' was lost, is never read as a PEFT file."""
    return is_native(metadata) or any(key.startswith("vera.") for key in metadata)


def _native_info(metadata: Mapping[str, str], source: str) -> tuple[str, str, str | None]:
    """A native task file's name, fingerprint and base digest, refused unless it says what it is and which
    contract it follows."""
    if not is_native(metadata):
        raise TaskFileError(
            f"{source} carries vera-export metadata but not format={_FORMAT!r}: it is damaged or was edited;"
            " re-export the task with `vera-export task`."
        )
    version = metadata.get("vera.contract_version")
    if version != CONTRACT_VERSION:
        raise TaskFileError(
            f"{source} follows task contract version {printable(version, 20)!r}; this vera-runtime reads version"
            f" {CONTRACT_VERSION}. Re-export the task, or upgrade vera-runtime."
        )
    return metadata.get("vera.task", ""), metadata.get("vera.fingerprint", ""), metadata.get("vera.base_digest") or None


def native_task(path: Path, header: Header, contract: Contract | None) -> Task:
    """A native task file's task: with ``contract``, its fingerprint and declared tensors are checked
    before any tensor is read; the tensors are always checked against the file's digest."""
    source = str(path)
    name, fingerprint, base = _native_info(header.metadata, source)
    if contract is not None:
        check_fingerprint(fingerprint, base, contract, source)
        check_entries(header, contract.task_shapes(), source)
    tensors = read_safetensors_tensors(path, header)
    check_digest(header.metadata, tensors, source)
    return Task(name, fingerprint, tensors, base)


def read_task(path: str | os.PathLike, contract: Contract | None = None) -> Task:
    """Read a native task file; with ``contract``, also refuse one that does not fit that graph."""
    path = Path(path)
    header = read_safetensors_header(path)
    if not looks_native(header.metadata):
        raise TaskFileError(f"{path} is a safetensors file but not a vera-export task file.")
    task = native_task(path, header, contract)
    if contract is not None:
        check_task(task, contract, str(path))
    return task


def read_task_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint a native task file declares, from its header alone (no tensor is read)."""
    path = Path(path)
    header = read_safetensors_header(path)
    if not looks_native(header.metadata):
        raise TaskFileError(f"{path} is a safetensors file but not a vera-export task file.")
    return _native_info(header.metadata, str(path))[1]


def adapter_size_limit(contract: Contract) -> int:
    """The most bytes an .onnx_adapter of this graph's tasks can take: its tensors, names and a margin."""
    shapes = contract.task_shapes()
    return 4096 + sum(4 * math.prod(shape) + len(name) + 128 for name, shape in shapes.items())


def task_file_paths(graph: str | os.PathLike, task: str) -> tuple[Path, Path]:
    """Where a graph's files of task ``task`` live: beside it, ``<stem>.<task>.task.safetensors`` and
    ``<stem>.<task>.onnx_adapter``."""
    graph = Path(graph)
    stem = graph.with_suffix("").name
    return graph.with_name(f"{stem}.{task}{TASK_SUFFIX}"), graph.with_name(f"{stem}.{task}{ADAPTER_SUFFIX}")


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
            raise OSError(errno.EIO, f"ONNX Runtime could not write the adapter ({exc})", str(path)) from exc
    return Path(path)


def read_onnx_adapter(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """Return an ``.onnx_adapter``'s model_version and its tensors, copied out of the reader; a file over
    ``max_bytes`` is refused before it is read (the format has no header to check first)."""
    import onnxruntime as ort

    path = Path(path)
    if problem := file_problem(path):
        raise TaskFileError(f"adapter file {path} {problem}.")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise TaskFileError(
            f"{path} is {size:,} bytes, more than an adapter of this graph can be ({max_bytes:,}): it was made for"
            " another graph, or holds tensors this graph does not take. Use the adapters exported with this graph."
        )
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
        # The arrays view memory owned by `adapter`: copy them before it goes away.
        tensors = {name: np.array(v.numpy(), copy=True) for name, v in adapter.get_parameters().items()}
        return adapter.get_model_version(), tensors
    except Exception as exc:  # ORT raises bare RuntimeError/Fail for any bad file
        raise TaskFileError(f"{path} is not a readable .onnx_adapter file: {exc}") from exc

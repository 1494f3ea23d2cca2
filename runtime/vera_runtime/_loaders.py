"""Reading a task from any file a user may have: our task file, an .onnx_adapter, or PEFT's
``adapter_model.safetensors``. Each reader checks what the file declares against the graph before it
reads any tensor, returns the tensors without the task dimension, or raises TaskFileError naming the
file and the tensor.

Integrity: native task files carry a SHA-256 of their tensors. The other two formats have no room for
one: an .onnx_adapter is compared with the native task file written beside it (when present); a PEFT
file's stored A and B are covered by the fingerprint, its λ only by the shape and finiteness checks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ._contract import Contract, fingerprint
from ._jsonio import read_adapter_config
from ._taskfile import (
    ADAPTER_SUFFIX,
    KEY_DIGEST,
    TASK_SUFFIX,
    Task,
    TaskFileError,
    adapter_model_version,
    adapter_size_limit,
    check_entries,
    check_task,
    looks_native,
    native_task,
    read_onnx_adapter,
    read_safetensors_header,
    read_safetensors_tensors,
    tensors_digest,
)

_PEFT_PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")
_PEFT_PREFIX = "base_model."


def _from_adapter(path: Path, contract: Contract) -> Task:
    version, tensors = read_onnx_adapter(path, adapter_size_limit(contract))
    if version != adapter_model_version(contract.fingerprint):
        raise TaskFileError(
            f"{path} was made for another graph (its model_version {version} is not this graph's"
            f" {adapter_model_version(contract.fingerprint)}): use the adapters exported with this graph."
        )
    for name, array in tensors.items():  # feeds: [1, n] for λ, [1, out, in] / [1, out] for head weights
        if array.ndim < 2 or array.shape[0] != 1:
            raise TaskFileError(
                f"{path}: tensor '{name}' is {list(array.shape)}; an adapter feed has a leading task dimension"
                " of 1 ([1, n], or [1, out, in] for a head weight). Re-export the task with vera-export."
            )
    task = Task(path.stem, contract.fingerprint, {name: array[0] for name, array in tensors.items()})
    _check_against_native(path, task)
    return task


def _check_against_native(path: Path, task: Task) -> None:
    """An adapter written beside a native task file holds the same tensors: the native file's digest
    catches a changed byte in the adapter."""
    native = path.with_name(path.name[: -len(ADAPTER_SUFFIX)] + TASK_SUFFIX)
    if not native.is_file():
        return
    recorded = read_safetensors_header(native).metadata.get(KEY_DIGEST)
    if recorded and recorded != tensors_digest(task.tensors):
        raise TaskFileError(
            f"{path} does not hold the tensors of {native.name}, the task file written with it: one of them was"
            " damaged or edited after export. Re-export the task with `vera-export task`."
        )


def _peft_fingerprint(path: Path, tensors: dict[str, np.ndarray], contract: Contract) -> str:
    """PEFT stores A and B when save_projection=True: then the fingerprint can be checked exactly.
    Without them, the seed and r in adapter_config.json are all there is to check."""
    if all(key in tensors for key in _PEFT_PROJECTIONS):
        vera_a, vera_b = (tensors[key] for key in _PEFT_PROJECTIONS)
        # PEFT files carry no digest of their base: the graph's stands in for it
        return fingerprint(vera_a, vera_b, contract.layers, contract.heads, contract.base_digest)
    config = _peft_config(path.with_name("adapter_config.json"), path)
    seed, rank = config.get("projection_prng_key"), config.get("r")
    if (seed, rank) != (contract.seed, contract.r):
        raise TaskFileError(
            f"{path} was trained with projection_prng_key={seed}, r={rank} (adapter_config.json);"
            f" this graph has projection_prng_key={contract.seed}, r={contract.r}."
        )
    return contract.fingerprint


def _peft_config(config_path: Path, path: Path) -> dict:
    """The adapter_config.json beside a PEFT file that stores no A/B: the only record of its seed and r."""
    if not config_path.is_file():
        raise TaskFileError(
            f"{path} stores no A/B and has no adapter_config.json beside it: nothing says which projection"
            " seed it was trained with. Keep PEFT's adapter_config.json next to it."
        )
    try:
        return read_adapter_config(config_path)
    except ValueError as exc:
        raise TaskFileError(str(exc)) from exc


def _from_peft(path: Path, tensors: dict[str, np.ndarray], contract: Contract) -> Task:
    own = _peft_fingerprint(path, tensors, contract)
    task_tensors = {name: array for name, array in tensors.items() if name not in _PEFT_PROJECTIONS}
    return Task(path.parent.name, own, task_tensors)


def task_tensors(source, contract: Contract) -> dict[str, np.ndarray]:
    """A task's tensors from ``source``: a task file (as ``load_any_task`` reads it) or a mapping of the names
    a native task file uses to arrays of its shapes, checked the same way (names, shapes, finite values)."""
    if isinstance(source, Mapping):
        tensors = {str(name): np.asarray(value) for name, value in source.items()}
        check_task(Task("given", contract.fingerprint, tensors, contract.base_digest), contract, "the tensors given")
        return tensors
    return load_any_task(source, contract).tensors


def load_any_task(path: str | Path, contract: Contract) -> Task:
    """A task for ``contract``'s graph from a native task file, an .onnx_adapter or a PEFT adapter file."""
    path = Path(path)
    if path.name.endswith(ADAPTER_SUFFIX):
        task = _from_adapter(path, contract)
    else:
        task = _from_safetensors(path, contract)
    check_task(task, contract, str(path))
    return task


def _from_safetensors(path: Path, contract: Contract) -> Task:
    header = read_safetensors_header(path)
    if looks_native(header.metadata):
        return native_task(path, header, contract)
    names = header.entries
    if not any("vera_lambda" in name for name in names) or not all(n.startswith(_PEFT_PREFIX) for n in names):
        raise TaskFileError(
            f"{path} is neither a vera-export task file nor a PEFT VeRA adapter file (adapter_model.safetensors,"
            " keys base_model.…vera_lambda_*): give a file the exporter or PEFT wrote."
        )
    check_entries(header, contract.task_shapes(), str(path), optional=_projection_shapes(contract))
    return _from_peft(path, read_safetensors_tensors(path, header), contract)


def _projection_shapes(contract: Contract) -> dict[str, tuple[int, int]]:
    """The shapes of A and B a PEFT file may store: [r, max_in] and [max_out, r] over the adapted layers."""
    max_in = max(layer.in_features for layer in contract.layers)
    max_out = max(layer.out_features for layer in contract.layers)
    return dict(zip(_PEFT_PROJECTIONS, ((contract.r, max_in), (max_out, contract.r)), strict=True))

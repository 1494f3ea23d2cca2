"""Model inputs from JSON, strictly: numbers only, rectangular, non-empty, integers (never booleans)
where the graph takes integers. Shared by ``vera-run`` (JSON files) and ``vera-serve`` (request bodies).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._errors import FeedError, printable
from ._feeds import InputInfo
from ._json import JsonError, load_file_bounded, loads_bounded


def parse_json(text: str | bytes, source: str):
    """JSON without NaN or Infinity, nested at most MAX_DEPTH levels; FeedError naming ``source`` otherwise."""
    try:
        return loads_bounded(text)
    except JsonError as exc:
        raise FeedError(f"{source}: {exc}") from exc


def read_adapter_config(path: Path) -> dict:
    """PEFT's adapter_config.json as a dict; ValueError naming the file and what to do otherwise.
    (The exporter and the runtime raise their own error types with this message.)"""
    try:
        config = load_file_bounded(path)
    except (OSError, JsonError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): re-save the adapter with PEFT.") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object: re-save it.")
    return config


def _rank(value) -> int:
    """How deep the first elements of nested lists go: the rank the value claims."""
    rank = 0
    while isinstance(value, list):
        if not value:
            raise ValueError("it has an empty dimension ([] where values belong): give at least one value")
        value, rank = value[0], rank + 1
    return rank


def _numbers(source: str, name: str, value, info: InputInfo) -> np.ndarray:
    """``value`` as an object array of the input's rank, holding only numbers JSON may give for it."""
    where = f"{source}: input '{printable(name, 80)}'"
    try:
        rank = _rank(value)
        if rank != len(info.shape):
            raise ValueError(f"it has {rank} dimensions, the graph needs {len(info.shape)} ({info.describe()})")
        array = np.array(value, dtype=object)
        if array.ndim != rank:
            raise ValueError("rows of different lengths: pad them to one length")
    except ValueError as exc:
        raise FeedError(f"{where}: {exc}.") from exc
    kinds = {type(v) for v in array.flat}
    if info.dtype == np.bool_:
        allowed, wanted = {bool}, "true/false"
    elif np.issubdtype(info.dtype, np.integer):
        allowed, wanted = {int}, "integers (whole numbers without a decimal point; not true/false)"
    else:
        allowed, wanted = {int, float}, "numbers"
    if not kinds <= allowed:
        odd = ", ".join(sorted({bool: "true/false", int: "integer", float: "decimal"}.get(k, k.__name__)
                               for k in kinds - allowed))
        raise FeedError(f"{where} takes {wanted} ({info.dtype.name}); it holds {odd} values.")
    return array


def json_array(source: str, name: str, value, info: InputInfo | None) -> np.ndarray:
    """A nested list as the array input ``name`` needs (``info``), or FeedError saying what is wrong."""
    if info is None:
        raise FeedError(f"{source}: the graph has no input '{printable(name, 80)}'.")
    array = _numbers(source, name, value, info)
    try:
        return array.astype(info.dtype)
    except OverflowError as exc:
        raise FeedError(f"{source}: input '{printable(name, 80)}' holds a value outside {info.dtype.name}.") from exc


def json_inputs(data, source: str, inputs: dict[str, InputInfo]) -> dict[str, np.ndarray]:
    """``{input name: nested list}`` as numpy arrays of the graph's dtypes."""
    if not isinstance(data, dict):
        raise FeedError(f"{source} holds a JSON {type(data).__name__}: give an object {{input name: nested list}}.")
    unknown = [name for name in data if name not in inputs]
    if unknown:
        raise FeedError(f"{source}: the graph has no input '{printable(unknown[0], 80)}'; its inputs are"
                        f" {sorted(inputs)}.")
    return {name: json_array(source, name, value, inputs[name]) for name, value in data.items()}

"""Model inputs from JSON, strictly: numbers only, rectangular, integers where the graph takes integers.

Shared by ``vera-run`` (JSON files) and ``vera-serve`` (request bodies).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ._errors import FeedError
from ._feeds import InputInfo


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str | bytes, source: str):
    """JSON without NaN or Infinity; FeedError naming ``source`` otherwise."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeedError(f"{source} is not valid JSON: {exc}") from None


def read_adapter_config(path: Path) -> dict:
    """PEFT's adapter_config.json as a dict; ValueError naming the file and what to do otherwise.
    (The exporter and the runtime raise their own error types with this message.)"""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): re-save the adapter with PEFT.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object: re-save it.")
    return config


def json_array(source: str, name: str, value, info: InputInfo | None) -> np.ndarray:
    """A nested list as the array input ``name`` needs (``info``), or FeedError saying what is wrong."""
    try:
        array = np.asarray(value)
    except ValueError:
        raise FeedError(f"{source}: input '{name}' is not a rectangular array (rows of different lengths?).") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise FeedError(f"{source}: input '{name}' must hold numbers in nested lists of equal lengths.")
    if info is None:
        return array
    if np.issubdtype(info.dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise FeedError(f"{source}: input '{name}' takes integers ({info.dtype.name}); it holds fractions.")
    return array.astype(info.dtype)


def json_inputs(data, source: str, inputs: dict[str, InputInfo]) -> dict[str, np.ndarray]:
    """``{input name: nested list}`` as numpy arrays of the graph's dtypes."""
    if not isinstance(data, dict):
        raise FeedError(f"{source} holds a JSON {type(data).__name__}: give an object {{input name: nested list}}.")
    return {name: json_array(source, name, value, inputs.get(name)) for name, value in data.items()}

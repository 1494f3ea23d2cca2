"""Checking model inputs against the graph before ONNX Runtime sees them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ._errors import FeedError

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
}


@dataclasses.dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # ints are fixed, strings symbolic

    @classmethod
    def from_ort(cls, node_arg) -> InputInfo:
        return cls(node_arg.name, np.dtype(_ORT_TYPES.get(node_arg.type, np.float32)), tuple(node_arg.shape))

    def describe(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"


def check_feeds(feeds: Mapping[str, np.ndarray], inputs: dict[str, InputInfo], task_inputs: set[str]) -> int:
    """Check names, dtypes, ranks and fixed dimensions; return the batch size (first dimension)."""
    for name in feeds:
        if name in task_inputs:
            raise FeedError(f"'{name}' is a task input: choose the task with run(..., task=NAME), don't feed it.")
        if name not in inputs:
            raise FeedError(f"the graph has no input '{name}'; its inputs are {sorted(inputs)}.")
    missing = [f"'{n}' ({info.describe()})" for n, info in inputs.items() if n not in feeds]
    if missing:
        raise FeedError(f"missing input {', '.join(missing)}.")
    batch = None
    for name, info in inputs.items():
        array = feeds[name]
        if not isinstance(array, np.ndarray):
            raise FeedError(f"input '{name}' is a {type(array).__name__}: pass a numpy array.")
        if array.dtype != info.dtype:
            raise FeedError(f"input '{name}' is {array.dtype.name}, the graph needs {info.dtype.name}: use .astype().")
        if array.ndim != len(info.shape) or any(
            isinstance(want, int) and have != want for have, want in zip(array.shape, info.shape, strict=False)
        ):
            raise FeedError(f"input '{name}' has shape {list(array.shape)}, the graph needs {info.describe()}.")
        if array.ndim and batch is None:
            batch = array.shape[0]
    return batch or 1

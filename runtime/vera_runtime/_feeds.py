"""Checking model inputs against the graph before ONNX Runtime sees them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ._contract import Contract
from ._errors import FeedError, printable

MASKS = ("attention_mask", "decoder_attention_mask")  # 0 (padding) or 1 (token), as transformers means them
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


def check_feeds(
    feeds: Mapping[str, np.ndarray],
    inputs: dict[str, InputInfo],
    task_inputs: set[str],
    contract: Contract | None = None,
) -> int:
    """Check names, dtypes, ranks, dimensions (fixed, and symbolic ones shared across inputs), token
    ids and sequence lengths against what the contract records; return the batch size."""
    if not isinstance(feeds, Mapping):
        raise FeedError(f"feeds is a {type(feeds).__name__}: pass a dict of input name -> numpy array.")
    for name in feeds:
        if name in task_inputs:
            raise FeedError(f"'{printable(name)}' is a task input: choose the task with run(..., task=NAME),"
                            " not a feed.")
        if name not in inputs:
            raise FeedError(f"the graph has no input '{printable(name, 80)}'; its inputs are {sorted(inputs)}.")
    missing = [f"'{n}' ({info.describe()})" for n, info in inputs.items() if n not in feeds]
    if missing:
        raise FeedError(f"missing input {', '.join(missing)}.")
    sizes: dict[str, tuple[int, str]] = {}
    for name, info in inputs.items():
        _check_array(name, feeds[name], info, sizes)
    batch = sizes["batch"][0] if "batch" in sizes else next(
        (feeds[n].shape[0] for n in inputs if feeds[n].ndim), 1
    )
    if batch == 0:
        raise FeedError("the batch is empty (0 rows): give at least one row.")
    if contract is not None:
        _check_limits(feeds, sizes, contract)
    return batch


def _check_array(name: str, array, info: InputInfo, sizes: dict[str, tuple[int, str]]) -> None:
    if isinstance(array, np.ma.MaskedArray):
        raise FeedError(f"input '{name}' is a masked array: ONNX Runtime ignores masks; pass array.filled(value).")
    if not isinstance(array, np.ndarray):
        raise FeedError(f"input '{name}' is a {type(array).__name__}: pass a numpy array.")
    if array.dtype.newbyteorder("=") == info.dtype and array.dtype != info.dtype:
        raise FeedError(
            f"input '{name}' is {info.dtype.name} in big-endian byte order ('{array.dtype.str}'); ONNX Runtime"
            f" takes native order: use .astype('{info.dtype.str}')."
        )
    if array.dtype != info.dtype:
        raise FeedError(f"input '{name}' is {array.dtype.name}, the graph needs {info.dtype.name}: use .astype().")
    if array.ndim != len(info.shape) or any(
        isinstance(want, int) and have != want for have, want in zip(array.shape, info.shape, strict=False)
    ):
        raise FeedError(f"input '{name}' has shape {list(array.shape)}, the graph needs {info.describe()}.")
    for have, want in zip(array.shape, info.shape, strict=True):
        if isinstance(want, str):
            seen, where = sizes.setdefault(want, (have, name))
            if seen != have:
                raise FeedError(
                    f"input '{name}' has {want}={have}, but '{where}' has {want}={seen}: inputs must agree on"
                    f" '{want}' (pad them to one length)."
                )


def _check_limits(feeds: Mapping[str, np.ndarray], sizes: dict[str, tuple[int, str]], contract: Contract) -> None:
    for dim, limit in contract.dim_limits.items():
        if dim in sizes and sizes[dim][0] > limit:
            raise FeedError(
                f"'{sizes[dim][1]}' has {dim}={sizes[dim][0]}, but the model has positions for {limit}:"
                " truncate the input."
            )
    for name in MASKS:
        array = feeds.get(name)
        if array is not None and array.size and not np.isin(array, (0, 1)).all():
            raise FeedError(f"input '{name}' holds {_first_outside(array)}; a mask holds 0 (padding) and 1 (token).")
    for name, high in contract.input_highs.items():
        array = feeds.get(name)
        if array is None or not array.size:
            continue
        low, top = int(array.min()), int(array.max())
        if low < 0 or top >= high:
            bad = low if low < 0 else top
            raise FeedError(
                f"input '{name}' holds {bad}, outside the model's vocabulary [0, {high}): check the tokenizer"
                " matches the model."
            )


def _first_outside(mask: np.ndarray) -> int:
    return int(mask.reshape(-1)[np.flatnonzero(~np.isin(mask, (0, 1)))[0]])

"""A safetensors file read in two steps: its header (names, dtypes, shapes, byte ranges), checked before
any tensor is read, then the tensors. A file that declares a tensor the graph does not take is refused
from its first few kilobytes, however large (or sparse) the file is.

The format: an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the tensors' bytes, back to back.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from pathlib import Path

import numpy as np

from ._json import JsonError, loads_bounded

DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U8": "u1", "BOOL": "?"}
MAX_HEADER = 16 << 20  # bytes of JSON; safetensors itself allows 100 MB


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor as the header declares it."""

    dtype: str  # safetensors' name: F32, F16, ...
    shape: tuple[int, ...]
    begin: int  # byte range within the data section
    end: int

    @property
    def numpy_dtype(self) -> np.dtype | None:
        return np.dtype(DTYPES[self.dtype]) if self.dtype in DTYPES else None


@dataclasses.dataclass(frozen=True)
class Header:
    metadata: dict[str, str]
    entries: dict[str, Entry]
    data_start: int  # where the data section begins in the file


def read_header(path: Path, max_header: int = MAX_HEADER) -> Header:
    """The header of ``path``, checked for consistency with the file (ValueError saying what is wrong)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("it is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(max_header, size - 8):
            raise ValueError(f"its header claims {length:,} bytes (the file has {size:,}; at most {max_header:,})")
        text = handle.read(length)
    try:
        raw = loads_bounded(text, max_depth=3)
    except JsonError as exc:
        raise ValueError(f"its header {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("its header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its __metadata__ is not an object of strings")
    entries = {name: _entry(name, value) for name, value in raw.items()}
    _check_layout(entries, size - 8 - length)
    return Header(metadata, entries, 8 + length)


def _entry(name: str, value) -> Entry:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {name[:80]!r} is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(
            type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name[:80]!r} has a malformed dtype or shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ValueError(f"tensor {name[:80]!r} has malformed data_offsets")
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(entries: dict[str, Entry], data_size: int) -> None:
    """Tensors lie back to back and fill the data section exactly, each as long as its shape says."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1].begin):
        itemsize = entry.numpy_dtype.itemsize if entry.numpy_dtype else 2  # BF16 and other 2-byte types
        if entry.begin != position or entry.end - entry.begin != math.prod(entry.shape) * itemsize:
            raise ValueError(f"tensor {name[:80]!r} has byte range {[entry.begin, entry.end]}, which does not"
                             f" follow the tensor before it with {math.prod(entry.shape) * itemsize:,} bytes")
        position = entry.end
    if position != data_size:
        raise ValueError(f"its tensors take {position:,} bytes but the file holds {data_size:,} after the header")


def read_tensors(path: Path, header: Header) -> dict[str, np.ndarray]:
    """Every tensor of ``path`` (whose header was read and checked), copied into its own array."""
    tensors = {}
    with open(path, "rb") as handle:
        for name, entry in header.entries.items():
            if entry.numpy_dtype is None:
                raise ValueError(f"tensor {name[:80]!r} has dtype {entry.dtype}, which numpy cannot hold")
            handle.seek(header.data_start + entry.begin)
            data = handle.read(entry.end - entry.begin)
            if len(data) != entry.end - entry.begin:
                raise ValueError(f"tensor {name[:80]!r} is cut short")
            tensors[name] = np.frombuffer(data, entry.numpy_dtype).reshape(entry.shape).astype(
                entry.numpy_dtype.newbyteorder("="))
    return tensors

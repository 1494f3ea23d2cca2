"""JSON that a file or a request cannot turn into a crash: no NaN or Infinity, and nesting bounded
(Python's own parser raises RecursionError, not ValueError, near 1,000 levels)."""

from __future__ import annotations

import json
import os
import stat

MAX_DEPTH = 32  # far deeper than any document we read; Python's json itself fails near 1,000
MAX_FILE_BYTES = 1 << 20  # configs and journals are kilobytes: a larger file is refused before it is read


class JsonError(ValueError):
    """Text that is not the JSON expected: invalid, NaN/Infinity, or nested too deeply."""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def loads_bounded(text: str | bytes, max_depth: int = MAX_DEPTH):
    """``json.loads`` that raises JsonError (a ValueError) for anything it refuses, RecursionError included."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise JsonError(f"it is nested deeper than {max_depth} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonError(f"it is not valid JSON: {exc}") from exc
    if _deeper_than(value, max_depth):
        raise JsonError(f"it is nested deeper than {max_depth} levels")
    return value


def _deeper_than(value, limit: int) -> bool:
    """Whether lists and objects nest more than ``limit`` levels (iterative: no recursion to exhaust)."""
    level = [value] if isinstance(value, (list, dict)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        children = (v for c in level for v in (c.values() if isinstance(c, dict) else c))
        level = [v for v in children if isinstance(v, (list, dict))]
    return False


def load_file_bounded(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES, max_depth: int = MAX_DEPTH,
                      follow_links: bool = True):
    """JSON from a regular file of at most ``max_bytes``, both checked before a byte is read (a folder from
    someone else may hold a sparse file of gigabytes); JsonError otherwise, OSError if it cannot be read.
    ``follow_links=False`` refuses a symbolic link too."""
    info = os.stat(path) if follow_links else os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise JsonError("it is not a regular file")
    if info.st_size > max_bytes:
        raise JsonError(f"it is {info.st_size:,} bytes, more than the {max_bytes:,} such a file takes")
    with open(path, "rb") as handle:
        return loads_bounded(handle.read(max_bytes + 1), max_depth)

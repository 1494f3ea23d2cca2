"""JSON that a file or a request cannot turn into a crash: no NaN or Infinity, and nesting bounded
(Python's own parser raises RecursionError, not ValueError, near 1,000 levels)."""

from __future__ import annotations

import json

MAX_DEPTH = 32  # far deeper than any document we read; Python's json itself fails near 1,000


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

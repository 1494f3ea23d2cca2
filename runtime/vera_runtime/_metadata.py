"""A graph's ``vera.*`` metadata read strictly: every key's type, range, size and nesting checked when a
session is built, so a damaged or hostile graph fails there, naming the key, and never later."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ._errors import printable
from ._json import JsonError, loads_bounded

MAX_VALUE_CHARS = 4 << 20  # a layer table of ~40,000 layers; 41 MB once took `vera-run tasks` to 849 MB
MAX_ENTRIES = 65_536  # layers or heads
MAX_FEATURES = 1 << 24  # in/out features of one layer
MAX_RANK = 1 << 16
MAX_NAME = 1024  # characters of a layer, head, input or dimension name
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LAYER_KEYS = {"name": str, "in_features": int, "out_features": int}
_HEAD_KEYS = {**_LAYER_KEYS, "bias": bool}


class MetadataError(ValueError):
    """One metadata value is malformed; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"'{key}' {problem}")


def text(metadata: Mapping[str, str], key: str, required: bool = True, limit: int = MAX_NAME) -> str | None:
    """A printable string of at most ``limit`` characters (None when absent and not required)."""
    value = metadata.get(key)
    if value is None:
        if required:
            raise MetadataError(key, "is missing")
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise MetadataError(key, f"is not a printable string of at most {limit:,} characters")
    return value


def integer(metadata: Mapping[str, str], key: str, low: int, high: int, required: bool = True) -> int | None:
    """A decimal integer in [low, high]; empty or absent means None unless ``required``."""
    value = text(metadata, key, required, limit=24)
    if not value and not required:
        return None
    if not value or not re.fullmatch(r"-?[0-9]+", value) or not low <= int(value) <= high:
        raise MetadataError(key, f"is {printable(value, 30)!r}, not an integer in [{low}, {high}]")
    return int(value)


def digest(metadata: Mapping[str, str], key: str, required: bool = True) -> str | None:
    """A SHA-256 in lowercase hex."""
    value = text(metadata, key, required, limit=64)
    if value is None or (not value and not required):
        return None
    if not _HEX64.fullmatch(value):
        raise MetadataError(key, f"is {printable(value, 30)!r}, not a SHA-256 in lowercase hex (64 characters)")
    return value


def _json(metadata: Mapping[str, str], key: str, default: str):
    value = metadata.get(key) or default
    if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
        raise MetadataError(key, f"is longer than {MAX_VALUE_CHARS:,} characters")
    try:
        return loads_bounded(value, max_depth=2)
    except JsonError as exc:
        raise MetadataError(key, str(exc)) from exc


def _checked_name(key: str, name, seen: set[str]) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise MetadataError(key, f"has a name {printable(name, 40)!r} that is not 1-{MAX_NAME} printable characters")
    if name in seen:
        raise MetadataError(key, f"names {printable(name, 80)!r} twice")
    seen.add(name)
    return name


def entries(metadata: Mapping[str, str], key: str, fields: Mapping[str, type], required: bool) -> list[dict]:
    """A JSON list of objects with exactly ``fields``: unique printable names, positive bounded sizes."""
    if required and key not in metadata:
        raise MetadataError(key, "is missing")
    value = _json(metadata, key, "[]")
    if not isinstance(value, list) or len(value) > MAX_ENTRIES or (required and not value):
        raise MetadataError(key, f"is not a JSON list of 1 to {MAX_ENTRIES:,} entries")
    seen: set[str] = set()
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != set(fields):
            raise MetadataError(key, f"has an entry {printable(entry, 80)} without exactly the keys {sorted(fields)}")
        _checked_name(key, entry["name"], seen)
        for field, kind in fields.items():
            number = entry[field]
            where = f"'{field}' = {printable(number, 20)} for {printable(entry['name'], 80)}"
            if kind is bool and not isinstance(number, bool):
                raise MetadataError(key, f"has {where}, not true or false")
            if kind is int and (type(number) is not int or not 0 < number <= MAX_FEATURES):
                raise MetadataError(key, f"has {where}, not an integer in [1, {MAX_FEATURES:,}]")
    return value


def layers(metadata: Mapping[str, str], key: str) -> list[dict]:
    return entries(metadata, key, _LAYER_KEYS, required=True)


def heads(metadata: Mapping[str, str], key: str) -> list[dict]:
    return entries(metadata, key, _HEAD_KEYS, required=False)


def int_map(metadata: Mapping[str, str], key: str, high: int) -> dict[str, int]:
    """A JSON object {name: integer in [1, high]} (booleans are not integers here)."""
    value = _json(metadata, key, "{}")
    if not isinstance(value, dict) or len(value) > 256:
        raise MetadataError(key, "is not a JSON object of at most 256 entries")
    seen: set[str] = set()
    for name, number in value.items():
        _checked_name(key, name, seen)
        if type(number) is not int or not 0 < number <= high:
            raise MetadataError(key, f"gives {printable(name, 80)!r} the value {printable(number, 20)}, not an"
                                     f" integer in [1, {high:,}]")
    return value


def choice(metadata: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> str:
    """``metadata[key]``, one of ``allowed``; absent means the first."""
    value = metadata.get(key) or allowed[0]
    if value not in allowed:
        raise MetadataError(key, f"is {printable(value, 40)!r}, not one of {allowed}")
    return value

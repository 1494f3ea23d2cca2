"""The hot template (``<stem>.hot.onnx``, ``vera-export --hot-template``): trusted by its content only.

The export records a SHA-256 of the template's bytes (and of its ``.data``) in the graph's metadata
(``vera.hot_template_sha256``). A session hashes the template once, before it builds anything from it:
an edited template, one from another graph, or a graph that records no digest is never served, and the
session says so once (a warning) instead of rebuilding and failing again.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path

HOT_SUFFIX = ".hot.onnx"
_CHUNK = 1 << 20


def hot_template_path(graph: Path) -> Path:
    """The hot template of a graph: ``<stem>.hot.onnx`` beside it."""
    return graph.with_name(graph.with_suffix("").name + HOT_SUFFIX)


def template_digest(template: Path) -> str:
    """SHA-256 of a hot template file and of its external data file (``<template>.data``, when present)."""
    digest = hashlib.sha256(b"vera-export hot template v1\0")
    for path in (template, Path(f"{template}.data")):
        if path == template or path.is_file():
            digest.update(f"{path.name}\0".encode())
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
    return digest.hexdigest()


class HotTemplate:
    """A graph's hot template and whether it may be used: checked once per session, on first use."""

    def __init__(self, graph: Path, expected: str | None) -> None:
        self.path = hot_template_path(graph)
        self._graph = graph
        self._expected = expected
        self._lock = threading.Lock()
        self._checked = False
        self._problem: str | None = None

    def exists(self) -> bool:
        return self.path.is_file()

    def refused(self) -> bool:
        """Whether the template was checked and refused (cheap: never hashes)."""
        return self._checked and self._problem is not None

    def problem(self) -> str | None:
        """None when the template's content is the one the graph records; else why not (warned once)."""
        with self._lock:
            if not self._checked:
                self._problem = self._check()
                self._checked = True
                if self._problem:
                    warnings.warn(self._problem, RuntimeWarning, stacklevel=3)
            return self._problem

    def _check(self) -> str | None:
        if not self._expected:
            return (f"{self.path} is not used: {self._graph.name} records no digest of its hot template (exported"
                    " before vera-export checked them); export again with --hot-template.")
        try:
            actual = template_digest(self.path)
        except OSError as exc:
            return f"{self.path} is not used: it cannot be read ({exc.strerror or exc})."
        if actual != self._expected:
            return (f"{self.path} is not used: its content is not the template exported with {self._graph.name}"
                    " (edited, or from another graph); tasks run on the factored graph. Export again with"
                    " --hot-template to restore it.")
        return None

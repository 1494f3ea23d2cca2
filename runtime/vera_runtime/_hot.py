"""Hot tasks: one task served at merged-graph speed from the hot template (``<stem>.hot.onnx``,
``vera-export --hot-template``), which is trusted by its content only.

The export records a SHA-256 of the template's bytes (and of its ``.data``) in the graph's metadata
(``vera.hot_template_sha256``). A session hashes the template once, before it builds anything from it:
an edited template, one from another graph, or a graph that records no digest is never served, and the
session says so once (a warning) instead of rebuilding and failing again.

A task's session replaces the template's task tensors with the task's, and ONNX Runtime folds ``W + ΔW``;
a fused int4 graph's template instead has its adapted int4 weights replaced by the task's merged weights,
quantized as onnxruntime-genai's builder quantizes (``_merge``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import threading
import warnings
from pathlib import Path

import onnxruntime as ort

from ._contract import Contract
from ._errors import GraphError
from ._merge import MergePlan, merge_path
from ._tasks import LoadedTask, TaskStore

HOT_SUFFIX = ".hot.onnx"
_CHUNK = 1 << 20


def hot_template_path(graph: Path) -> Path:
    """The hot template of a graph: ``<stem>.hot.onnx`` beside it."""
    return graph.with_name(graph.with_suffix("").name + HOT_SUFFIX)


def template_digest(template: Path) -> str:
    """SHA-256 of a hot template file, of its external data file (``<template>.data``) and of its merge
    file (``<stem>.hot.merge.safetensors``), those two when present."""
    digest = hashlib.sha256(b"vera-export hot template v1\0")
    for path in (template, Path(f"{template}.data"), merge_path(template)):
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

    def merges(self) -> bool:
        """Whether the template merges and requantizes int4 weights (a merge file beside it)."""
        return merge_path(self.path).is_file()

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


def replace_initializers(options: ort.SessionOptions, tensors: dict, values: list, merged: bool) -> None:
    """Give a hot session its task's tensors. λ go in as external initializers, which ONNX Runtime takes
    before it optimises, so ``W + ΔW`` folds into one constant (values given with ``add_initializer`` come
    too late for that). A merge template's int4 weights need no folding: ``add_initializer`` runs them at
    the builder graph's speed, where external ones ran 6–12% slower (two runs, a 125M Qwen2, batch 1)."""
    if merged:
        for name, value in zip(tensors, values, strict=True):
            options.add_initializer(name, value)
    else:
        options.add_external_initializers(list(tensors), values)


_HOT_AFTER = 8  # consecutive single-task calls before a task is specialised: alternating tasks don't thrash
_INHERITED_CONFIG = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


@dataclasses.dataclass(frozen=True)
class HotSession:
    """A session of the hot template with one task's tensors as constant initializers: ONNX Runtime
    folds W + ΔW at creation, so runs cost what a merged graph costs."""

    task: LoadedTask
    session: ort.InferenceSession
    values: list[ort.OrtValue]  # ORT does not own external initializers: they live as long as the session


class HotTasks:
    """Tasks served at merged-graph speed from the hot template: built in a thread of their own, at most
    ``capacity`` at a time (the least recently built dropped), each only while its task stays loaded."""

    def __init__(self, graph: Path, contract: Contract, store: TaskStore, options: ort.SessionOptions,
                 capacity: int | None) -> None:
        self.template = HotTemplate(graph, contract.hot_template_sha256)
        self.capacity = (1 if self.template.exists() else 0) if capacity is None else capacity
        self._store = store
        self._options = options
        self._hot: collections.OrderedDict[str, HotSession] = collections.OrderedDict()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._streak: tuple[str | None, int] = (None, 0)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._contract = contract
        self._plan: MergePlan | None = None
        # a merged int4 session rounds W + ΔW, not W: its logits are not the graph's, so only when asked
        self._merges = self.template.merges()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._hot)

    def specialize(self, task: LoadedTask) -> concurrent.futures.Future:
        if not self.template.exists():
            raise FileNotFoundError(
                f"no hot template {self.template.path}: export with `vera-export ... --hot-template`."
            )
        if problem := self.template.problem():
            raise GraphError(problem)
        with self._lock:
            return self._schedule(task)

    def session_for(self, task: str | None) -> HotSession | None:
        """The hot session that serves a single-task run of ``task``, scheduling one after a streak."""
        if task is None or not self.capacity:
            return None
        current = self._store.current(task)
        with self._lock:
            hot = self._hot.get(task)
            if hot is not None and hot.task is current:
                self._hot.move_to_end(task)
                return hot
            streak = self._streak[1] + 1 if self._streak[0] == task else 1
            self._streak = (task, streak)
            if (streak >= _HOT_AFTER and not self._merges and current is not None and self.template.exists()
                    and not self.template.refused()):
                self._schedule(current)
        return None

    def forget(self, name: str) -> None:
        with self._lock:
            self._hot.pop(name, None)

    def close(self) -> None:
        """Stop the builder thread (a build under way finishes first) and release every hot session."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._hot.clear()
            self._pending.clear()
            self.capacity = 0

    def _schedule(self, task: LoadedTask) -> concurrent.futures.Future:
        """Queue ``task``'s hot session unless it is queued already (call with the lock held)."""
        if task.name not in self._pending:
            if self._executor is None:  # the thread exists only once something is built
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vera-hot")
            self._pending[task.name] = self._executor.submit(self._build, task)
        return self._pending[task.name]

    def _build(self, task: LoadedTask) -> None:
        try:
            if self.template.problem():  # checked (and warned about) once; never built from
                return
            tensors = self._initializers(task)
            values = [ort.OrtValue.ortvalue_from_numpy(array) for array in tensors.values()]
            options = self._session_options()
            replace_initializers(options, tensors, values, merged=self._merges)
            session = ort.InferenceSession(str(self.template.path), options, providers=["CPUExecutionProvider"])
            with self._lock:
                if self._store.current(task.name) is task and self.capacity:  # not unloaded, replaced or closed
                    self._hot[task.name] = HotSession(task, session, values)
                    while len(self._hot) > max(self.capacity, 1):
                        self._hot.popitem(last=False)
        finally:
            with self._lock:
                self._pending.pop(task.name, None)

    def _initializers(self, task: LoadedTask) -> dict:
        """What replaces the template's initializers: the task's λ, or (merge templates) its merged weights."""
        if not self._merges:
            return task.feeds
        if self._plan is None:  # read once, after the digest check
            self._plan = MergePlan(merge_path(self.template.path), self._contract)
        return self._plan.initializers(task.feeds)

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = self._options.intra_op_num_threads
        for key in _INHERITED_CONFIG:  # what the caller set on their options applies here too
            with contextlib.suppress(Exception):  # ORT raises when the key was never set
                options.add_session_config_entry(key, self._options.get_session_config_entry(key))
        return options

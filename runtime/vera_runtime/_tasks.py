"""The tasks a session has loaded, and the task feeds of a run: one task for the batch, or one per row.

A task file is read and checked whole before it is installed, so a failed load keeps every task as it
was. Each task is kept as the arrays it is fed as (``[1, n]`` float32) and, on CUDA, as device copies
made once; stacks of tasks per row are made per run on the CPU, and cached on the GPU.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ._contract import Contract
from ._errors import FeedError
from ._loaders import task_tensors
from ._taskfile import check_task_name

_ROW_CACHE = 32  # device copies of recent per-row task stacks, on CUDA
_BANKED = 1024  # bank tasks whose feeds are kept ready (views of the mapped file: small)


@dataclasses.dataclass(frozen=True)
class LoadedTask:
    name: str
    path: Path | None  # None: given as arrays
    feeds: dict[str, np.ndarray]  # task tensors as fed on the CPU: float32 [1, n], contiguous
    on_device: dict[str, ort.OrtValue] | None  # the same, copied once to the GPU


class TaskStore:
    """Loaded tasks by name, for one graph (``contract``) on one device."""

    def __init__(self, contract: Contract, device: str, graph_name: str, bank=None) -> None:
        self.contract = contract
        self.bank = bank  # a TaskBank of this graph: names not loaded are looked up there
        self._banked: collections.OrderedDict[str, tuple[dict, LoadedTask]] = collections.OrderedDict()
        self.device = device
        self._graph_name = graph_name
        self._task_inputs = tuple(contract.task_shapes())
        self._tasks: dict[str, LoadedTask] = {}
        self._row_stacks: collections.OrderedDict[tuple[str, ...], dict[str, ort.OrtValue]] = collections.OrderedDict()
        self._lock = threading.RLock()  # feeds() holds it while get() may read the bank

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    def read(self, name: str, source) -> LoadedTask:
        """Read and check a task file (native, .onnx_adapter or PEFT), or a mapping of the tensor names a native
        file uses to arrays, as task ``name``; nothing changes."""
        check_task_name(name)
        tensors = task_tensors(source, self.contract)
        feeds = {key: np.ascontiguousarray(tensors[key], dtype=np.float32)[None] for key in self._task_inputs}
        path = Path(source) if isinstance(source, (str, os.PathLike)) else None
        on_device = None
        if self.device == "cuda":
            on_device = {key: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) for key, value in feeds.items()}
        return LoadedTask(name, path, feeds, on_device)

    def install(self, tasks: list[LoadedTask]) -> None:
        with self._lock:
            for task in tasks:
                self._tasks[task.name] = task
                self._forget_rows(task.name)

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise FeedError(f"task '{name}' is not loaded; loaded tasks: {sorted(self._tasks)}.")
            del self._tasks[name]
            self._forget_rows(name)

    def current(self, name: str) -> LoadedTask | None:
        """The task loaded under ``name`` now, or None."""
        return self._tasks.get(name)

    def get(self, name: str) -> LoadedTask:
        task = self._tasks.get(name)
        if task is None and self.bank is not None:
            task = self._from_bank(name)
        if task is None:
            where = f" nor in the bank {self.bank.path}" if self.bank is not None else ""
            raise FeedError(
                f"task '{name}' is not loaded{where}; loaded tasks: {sorted(self._tasks)}. Use load_task()."
            )
        return task

    def _from_bank(self, name: str) -> LoadedTask | None:
        """A bank's task as views of its mapped row (checked on first use), made once per version of it."""
        with self._lock:
            return self._from_bank_locked(name)

    def _from_bank_locked(self, name: str) -> LoadedTask | None:
        tensors = self.bank.tensors(name)
        if tensors is None:
            return None
        known = self._banked.get(name)
        if known is not None and known[0] is tensors:
            return known[1]
        feeds = {key: tensors[key][None] for key in self._task_inputs}
        on_device = None
        if self.device == "cuda":
            on_device = {key: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", 0)
                         for key, v in feeds.items()}
        loaded = LoadedTask(name, self.bank.path, feeds, on_device)
        self._banked[name] = (tensors, loaded)
        if len(self._banked) > _BANKED:
            self._banked.popitem(last=False)
        return loaded

    def feeds(self, task: str | None, tasks: Sequence[str] | None, batch: int) -> dict:
        """The task inputs of a run: ``task`` for the whole batch, ``tasks`` one per row, or neither (the
        graph's defaults; a graph without defaults, the web form, takes its default task's file)."""
        with self._lock:  # a consistent view of the tasks; the run itself is outside the lock
            if tasks is not None:
                tasks = tuple(tasks)
                if len(tasks) != batch:
                    raise FeedError(f"tasks= gives {len(tasks)} names for a batch of {batch} rows: give one per row.")
                if len(set(tasks)) > 1:
                    return self._per_row(tasks)
                task = tasks[0]
            if task is None and self.contract.task_defaults:
                return {}
            if task is None and self.contract.default_task not in self._tasks:
                raise FeedError(
                    f"{self._graph_name} holds no task values (a graph converted --to web): load its task files"
                    " first, e.g. load_tasks_beside(), or pass task=NAME; its default task is"
                    f" '{self.contract.default_task}'."
                )
            loaded = self.get(task or self.contract.default_task)
            return loaded.on_device if loaded.on_device is not None else loaded.feeds

    def _per_row(self, tasks: tuple[str, ...]) -> dict:
        if self.device == "cuda" and tasks in self._row_stacks:
            self._row_stacks.move_to_end(tasks)
            return self._row_stacks[tasks]
        loaded = [self.get(name) for name in tasks]
        stacked = {key: np.concatenate([t.feeds[key] for t in loaded]) for key in self._task_inputs}
        if self.device != "cuda":
            return stacked
        on_device = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in stacked.items()}
        if any(name not in self._tasks for name in tasks):
            return on_device  # bank tasks may change under their name: their stacks are not kept
        # one host->device copy per new combination of rows, then reused
        self._row_stacks[tasks] = on_device
        if len(self._row_stacks) > _ROW_CACHE:
            self._row_stacks.popitem(last=False)
        return self._row_stacks[tasks]

    def _forget_rows(self, name: str) -> None:
        for key in [key for key in self._row_stacks if name in key]:
            del self._row_stacks[key]

    def clear(self) -> None:
        """Drop every task and device copy (the session is closing)."""
        with self._lock:
            self._tasks.clear()
            self._row_stacks.clear()

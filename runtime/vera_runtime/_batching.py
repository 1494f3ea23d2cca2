"""Requests of different tasks in one ``VeraSession.run``: parse and check each request alone, group the
ones whose inputs can share a batch, run each group once with a task per row, and split the rows back.

Requests share a batch when their inputs have the same names, dtypes and shapes after the batch
dimension (e.g. the same sequence length). Requests of other shapes form groups of their own: no
padding, so a batched response is the response the request gets alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ._errors import FeedError
from ._feeds import check_feeds
from ._jsonio import json_inputs
from ._session import VeraSession

DEFAULT_MAX_BODY = 8 << 20  # bytes of JSON a request may send


class RequestError(ValueError):
    """A request the server refuses: an HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked request: its inputs, a task per row (None: the graph's defaults) and what it asked."""

    feeds: dict[str, np.ndarray]
    rows: tuple[str | None, ...]
    asked: object  # the "task" or "tasks" value, echoed in the response

    @property
    def key(self) -> tuple:
        """Requests with equal keys can be stacked into one batch."""
        defaults = self.rows[0] is None
        return defaults, tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(self.feeds.items()))


def parse_request(body, session: VeraSession) -> Request:
    """A JSON body ``{"task"|"tasks": ..., "inputs": {...}}`` checked against the graph and its tasks."""
    if not isinstance(body, Mapping) or not isinstance(body.get("inputs"), Mapping):
        raise RequestError(400, 'the body must be a JSON object {"task": NAME, "inputs": {input name: nested list}}.')
    unknown = sorted(set(body) - {"task", "tasks", "inputs"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}: a request has 'inputs' and 'task' or 'tasks'.")
    try:
        feeds = json_inputs(dict(body["inputs"]), "the request", session.inputs)
        batch = check_feeds(feeds, session.inputs, set(session.contract.task_shapes()), session.contract)
    except FeedError as exc:
        raise RequestError(400, str(exc)) from None
    return Request(feeds, _rows(body, batch, session), body.get("tasks", body.get("task")))


def _rows(body: Mapping, batch: int, session: VeraSession) -> tuple[str | None, ...]:
    task, tasks = body.get("task"), body.get("tasks")
    if task is not None and tasks is not None:
        raise RequestError(400, "give 'task' for the whole request or 'tasks' (one per row), not both.")
    if tasks is None:
        rows = (task,) * batch
    elif isinstance(tasks, list) and len(tasks) == batch:
        rows = tuple(tasks)
    else:
        raise RequestError(400, f"'tasks' must be a list of {batch} task names, one per row of the inputs.")
    for name in rows:
        if name is not None and not isinstance(name, str):
            raise RequestError(400, f"task names are strings; got {name!r:.60}.")
        if name is not None and name not in session.tasks:
            raise RequestError(404, f"task '{name:.64}' is not loaded; loaded tasks: {sorted(session.tasks)}.")
    if None in rows and any(rows):
        raise RequestError(400, "name every row's task in 'tasks', or none (the graph's default task).")
    return rows


def run_batch(requests: list[Request], session: VeraSession) -> list[dict[str, np.ndarray]]:
    """Outputs per request, computed with one ``session.run`` per group of stackable requests."""
    results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.key, []).append(index)
    for members in groups.values():
        names = requests[members[0]].feeds
        stacked = {name: np.concatenate([requests[i].feeds[name] for i in members]) for name in names}
        rows = [row for i in members for row in requests[i].rows]
        outputs = session.run(stacked) if rows[0] is None else session.run(stacked, tasks=rows)
        start = 0
        for i in members:
            count = len(requests[i].rows)
            results[i] = {name: value[start : start + count] for name, value in outputs.items()}
            start += count
    return results

"""Requests of different tasks in one ``VeraSession.run``: parse and check each request alone, group the
ones whose inputs can share a batch, run each group once with a task per row, and split the rows back.

Requests share a batch when their inputs have the same names, dtypes and shapes after the batch
dimension (e.g. the same sequence length). Requests of other shapes form groups of their own: no
padding, so a batched response is the response the request gets alone.

Memory is bounded per request (``Limits``: rows, and tokens = rows × the sizes of the inputs' symbolic
dimensions) and per run: a group of requests, or one large request, runs in slices of at most
``Limits.run_tokens`` tokens, so a run's activations stay within one slice's whatever was accepted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from ._errors import FeedError, printable
from ._feeds import InputInfo, check_feeds
from ._jsonio import json_inputs
from ._session import VeraSession

DEFAULT_MAX_BODY = 8 << 20  # bytes of JSON a request may send
DEFAULT_MAX_ROWS = 256
DEFAULT_MAX_TOKENS = 16_384  # e.g. 32 rows of 512 tokens
RUN_TOKENS = 4_096  # per ONNX Runtime run: 8 rows of 512 tokens of BERT-base is ~100 MB of activations


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (beyond it, 413), and the most tokens one run takes."""

    max_rows: int = DEFAULT_MAX_ROWS
    max_tokens: int = DEFAULT_MAX_TOKENS
    run_tokens: int = RUN_TOKENS


class RequestError(ValueError):
    """A request the server refuses: an HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked request: its inputs, the task of each row and what it asked."""

    feeds: dict[str, np.ndarray]
    row_tasks: tuple[str | None, ...]  # the task of each row (None: the graph's default task)
    asked: object  # the "task" or "tasks" value, echoed in the response
    tokens_per_row: int = 1

    @property
    def tokens(self) -> int:
        """What the request costs a run: its rows times the tokens of one row."""
        return len(self.row_tasks) * self.tokens_per_row

    @property
    def key(self) -> tuple:
        """Requests with equal keys can be stacked into one batch."""
        defaults = self.row_tasks[0] is None
        return defaults, tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(self.feeds.items()))


def parse_request(body, session: VeraSession, limits: Limits = Limits(), resolve=None) -> Request:
    """A JSON body ``{"task"|"tasks": ..., "inputs": {...}}`` checked against the graph, its tasks and ``limits``.
    ``resolve(name)``: the session's name for a requested task, or None when it has none (404); by default,
    a loaded task or one of the session's bank."""
    if not isinstance(body, Mapping) or not isinstance(body.get("inputs"), Mapping):
        raise RequestError(400, 'the body must be a JSON object {"task": NAME, "inputs": {input name: nested list}}.')
    unknown = sorted(set(body) - {"task", "tasks", "inputs"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {[printable(n, 40) for n in unknown[:5]]}: a request has 'inputs'"
                                " and 'task' or 'tasks'.")
    _check_size(body["inputs"], session.inputs, limits)
    try:
        feeds = json_inputs(dict(body["inputs"]), "the request", session.inputs)
        batch = check_feeds(feeds, session.inputs, set(session.contract.task_shapes()), session.contract)
    except FeedError as exc:
        raise RequestError(400, str(exc)) from exc
    per_row = tokens_per_row(feeds, session.inputs)
    if batch * per_row > limits.max_tokens:
        raise RequestError(413, f"the request has {batch} rows of {per_row} tokens, {batch * per_row:,} in all; this"
                                f" server takes up to {limits.max_tokens:,} per request: send fewer rows per request.")
    rows = _row_tasks(body, batch, session, resolve or (lambda name: name if session.has_task(name) else None))
    return Request(feeds, rows, body.get("tasks", body.get("task")), per_row)


def _check_size(inputs: Mapping, infos: Mapping[str, InputInfo], limits: Limits) -> None:
    """Refuse too many rows before building any array (413): the outer list's length is the row count."""
    for name, value in inputs.items():
        info = infos.get(name)
        if info is not None and info.shape and not isinstance(info.shape[0], int) and isinstance(value, list):
            if len(value) > limits.max_rows:
                raise RequestError(413, f"input '{name}' has {len(value):,} rows; this server takes up to"
                                        f" {limits.max_rows:,} per request: send fewer rows per request.")


def tokens_per_row(feeds: Mapping[str, np.ndarray], infos: Mapping[str, InputInfo]) -> int:
    """How much one row costs: the largest product, over inputs, of its symbolic dimensions after the batch."""
    sizes = [math.prod(n for n, dim in zip(feeds[name].shape[1:], info.shape[1:], strict=True)
                       if not isinstance(dim, int)) for name, info in infos.items() if name in feeds]
    return max([1, *sizes])


def _row_tasks(body: Mapping, batch: int, session: VeraSession, resolve) -> tuple[str | None, ...]:
    task, tasks = body.get("task"), body.get("tasks")
    if task is not None and tasks is not None:
        raise RequestError(400, "give 'task' for the whole request or 'tasks' (one per row), not both.")
    if tasks is None:
        rows = (task,) * batch
    elif isinstance(tasks, list) and len(tasks) == batch:
        rows = tuple(tasks)
    else:
        raise RequestError(400, f"'tasks' must be a list of {batch} task names, one per row of the inputs.")
    resolved = []
    for name in rows:
        if name is not None and not isinstance(name, str):
            raise RequestError(400, f"task names are strings; got {printable(name, 60)}.")
        if name is not None and (found := resolve(name)) is None:
            banked = session.bank is not None
            listed = "GET /v1/tasks lists them" if banked else f"loaded tasks: {sorted(session.tasks)}"
            raise RequestError(404, f"task '{printable(name, 64)}' is not loaded; {listed}.")
        resolved.append(None if name is None else found)
    if None in rows and any(rows):
        raise RequestError(400, "name every row's task in 'tasks', or none (the graph's default task).")
    return tuple(resolved)


def run_batch(requests: list[Request], session: VeraSession, max_tokens: int = RUN_TOKENS) -> list:
    """Outputs per request (or the exception its run raised), with one ``session.run`` per group of
    stackable requests, in slices of at most ``max_tokens`` tokens. A failing group is run again one
    request at a time, so that one request's failure is not its neighbours'."""
    results: list = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.key, []).append(index)
    for members in groups.values():
        try:
            outputs = _run_group([requests[i] for i in members], session, max_tokens)
        except Exception:  # noqa: BLE001 - retried alone below, where each request gets its own error
            outputs = [_run_alone(requests[i], session, max_tokens) for i in members]
        for i, output in zip(members, outputs, strict=True):
            results[i] = output
    return results


def _run_alone(request: Request, session: VeraSession, max_tokens: int):
    try:
        return _run_group([request], session, max_tokens)[0]
    except Exception as exc:  # noqa: BLE001 - handed to that request's caller
        return exc


def _run_group(requests: list[Request], session: VeraSession, max_tokens: int) -> list[dict[str, np.ndarray]]:
    names = requests[0].feeds
    stacked = {name: np.concatenate([r.feeds[name] for r in requests]) for name in names}
    rows = [task for r in requests for task in r.row_tasks]
    step = max(1, max_tokens // requests[0].tokens_per_row)  # rows per run: memory stays within one budget
    parts = []
    for start in range(0, len(rows), step):
        feeds = {name: value[start : start + step] for name, value in stacked.items()}
        tasks = rows[start : start + step]
        parts.append(session.run(feeds) if tasks[0] is None else session.run(feeds, tasks=tasks))
    outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    split, start = [], 0
    for request in requests:
        count = len(request.row_tasks)
        split.append({name: value[start : start + count] for name, value in outputs.items()})
        start += count
    return split

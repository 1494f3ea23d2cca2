"""Label names beside a classifier graph: ``<stem>.labels.json``, ``{"task": ["label 0", "label 1", ...]}``.

Each task of a classifier has a head of its own, so its own labels; the exporter writes them from the
adapter folder (or the base model's ``id2label``), and ``vera-run demo`` shows them. The file comes from
a folder that may be someone else's: it is read within bounds and checked whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._errors import VeraError
from ._json import JsonError, load_file_bounded
from ._taskfile import is_task_name

LABELS_SUFFIX = ".labels.json"
_MAX_LABELS = 65536  # a vocabulary-sized head is the most a classifier has
_MAX_NAME = 200


class LabelsError(VeraError, ValueError):
    """A labels file that is not a mapping from task names to lists of label names."""


def labels_path(graph: str | os.PathLike) -> Path:
    graph = Path(graph)
    return graph.with_name(graph.with_suffix("").name + LABELS_SUFFIX)


def check_labels(labels: object, source: str) -> dict[str, list[str]]:
    """``labels`` if it maps task names to non-empty lists of short label names; LabelsError otherwise."""
    if not isinstance(labels, dict):
        raise LabelsError(f"{source}: expected a JSON object of task name -> list of label names.")
    for task, names in labels.items():
        if not is_task_name(task):
            raise LabelsError(f"{source}: {task[:80]!r} is not a task name (1-64 letters, digits, '_' or '-').")
        if not isinstance(names, list) or not 0 < len(names) <= _MAX_LABELS or not all(
            isinstance(n, str) and 0 < len(n) <= _MAX_NAME for n in names
        ):
            raise LabelsError(
                f"{source}: the labels of task '{task}' must be a list of 1 to {_MAX_LABELS} names of 1 to"
                f" {_MAX_NAME} characters."
            )
    return labels


def read_labels(graph: str | os.PathLike) -> dict[str, list[str]]:
    """The label names beside ``graph`` by task; {} when it has none."""
    path = labels_path(graph)
    if not path.exists():
        return {}
    try:
        return check_labels(load_file_bounded(path), str(path))
    except (JsonError, OSError) as exc:
        raise LabelsError(f"{path} is not a readable labels file ({exc}): export the graph again.") from exc

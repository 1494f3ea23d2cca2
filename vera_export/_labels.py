"""The label names of a classifier's tasks, written beside its graph (``<stem>.labels.json``) so that a
page or a client can say "positive" rather than "1": per task, the adapter folder's ``labels.json`` (a
list, as ``python -m vera_models.minilm train`` writes it), else the base model's ``id2label`` when it names
as many labels as the head has outputs, else ``LABEL_0`` … by the head's size."""

from __future__ import annotations

import json
from pathlib import Path

from vera_runtime import Contract
from vera_runtime.files import check_labels, load_file_bounded
from vera_runtime.layout import labels_path

from ._errors import VeraExportError
from ._staging import Staging

ADAPTER_LABELS = "labels.json"


def _generic(size: int) -> list[str]:
    return [f"LABEL_{i}" for i in range(size)]


def _from_config(config, size: int) -> list[str] | None:
    """``id2label`` when it is the head's size and not transformers' own ``LABEL_i`` placeholders."""
    id2label = getattr(config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(size)]
    if len(id2label) != size or None in names or names == _generic(size):
        return None
    return [str(name) for name in names]


def _from_adapter(folder: Path, size: int) -> list[str] | None:
    path = folder / ADAPTER_LABELS
    if not path.is_file():
        return None
    try:
        names = check_labels({"task": load_file_bounded(path)}, str(path))["task"]
    except (OSError, ValueError) as exc:
        raise VeraExportError(f"{path} is not a list of label names ({exc}): fix or remove it.") from exc
    if len(names) != size:
        raise VeraExportError(f"{path} names {len(names)} labels, the adapter's head has {size} outputs: fix it.")
    return names


def task_labels(adapter_folder: Path, config, contract: Contract) -> list[str] | None:
    """One task's label names; None for a graph without a head (nothing to name)."""
    if not contract.heads:
        return None
    size = contract.heads[-1].out_features  # the last head layer gives the logits
    return _from_adapter(adapter_folder, size) or _from_config(config, size) or _generic(size)


def stage_labels(graph: Path, labels: dict[str, list[str]], stage: Staging) -> Path:
    path = labels_path(graph)
    stage.path(path).write_text(json.dumps(check_labels(labels, str(path)), indent=1) + "\n")
    return path

"""The fused export's steps that need torch. ``_fused`` imports this module only once the builder is
running: importing torch, transformers and PEFT takes ~1.5 s, which the builder's run then hides."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from vera_runtime import Task
from vera_runtime.files import load_file_bounded
from vera_runtime.layout import GENAI_CONFIG, hot_template_path, task_file_paths

from ._defaults import DEFAULT_TOLERANCE, FORM_TOLERANCES
from ._discover import find_vera_layers
from ._errors import VeraExportError
from ._export import ExportResult, _stage_task, current_task
from ._fused_graphs import FromTorch, cache_layout, from_torch, write_graphs
from ._genai import stage_tokenizer_files
from ._peft import PeftExportResult, PeftRoot, load_peft_models
from ._staging import Staging
from ._verify import Verification
from ._verify_fused import References, references, verify_graphs

__all__ = ["Taken", "result", "stage_set", "take_from_peft", "verify", "write_graphs"]


@dataclasses.dataclass(frozen=True)
class Taken:
    """What the export keeps from PyTorch once the PEFT model is released."""

    source: FromTorch
    tasks: dict[str, Task]  # every adapter's λ, the default task first
    references: References | None  # PEFT's logits, when verifying
    notes: tuple[str, ...]
    layers: int
    r: int


def take_from_peft(adapters: list, base: Path, model_class: str | None, merge_weights: bool, verify: bool) -> Taken:
    """Load the base and adapters with PEFT and take what the graphs and checks need; the model is released
    when this returns (``merge_weights``: the projections an int4 hot template's merge file holds)."""
    loaded = load_peft_models(adapters, base, model_class)
    root = PeftRoot(loaded.model)
    adapted = find_vera_layers(root, adapters[0].name)
    if adapted.heads:
        raise VeraExportError("--fused exports causal LMs; these adapters train head layers: export without --fused.")
    source = from_torch(adapted, root, merge_weights)
    tasks = {}
    for adapter in adapters:
        loaded.model.set_adapter(adapter.name)
        tasks[adapter.name] = current_task(find_vera_layers(root, adapter.name), source.contract)
    refs = references(loaded.model, list(tasks), loaded.model.set_adapter, source.config.vocab_size) if verify else None
    return Taken(source, tasks, refs, loaded.notes, len(adapted.layers), adapted.r)


def verify(out: Path, scratch: Path, taken: Taken, contract, hot_template: bool, tolerance: float | None,
           precision: str) -> Verification:
    """Every task, alone and one per row, against PEFT's references; the hot template's sessions."""
    template = scratch / hot_template_path(out).name if hot_template else None
    feeds = {name: {key: value[None] for key, value in task.tensors.items()} for name, task in taken.tasks.items()}
    default = DEFAULT_TOLERANCE if precision == "fp32" else FORM_TOLERANCES[precision]
    return verify_graphs(scratch / out.name, template, taken.references, feeds,
                         (cache_layout(taken.source.config), contract.kv_shared_buffer), contract, tolerance or default)


def stage_set(base: Path, out: Path, scratch: Path, built: Path, tasks: list, staging: Staging) -> list[Path]:
    """The graphs written in ``scratch``, genai_config.json, the tokenizer and every task's files."""
    for written in sorted(scratch.iterdir()):
        if written.is_file():
            os.replace(written, staging.path(out.with_name(written.name)))
    config = load_file_bounded(built / GENAI_CONFIG)  # the builder's: it describes its graph
    config["model"]["decoder"]["filename"] = out.name
    staging.path(out.with_name(GENAI_CONFIG)).write_text(json.dumps(config, indent=2) + "\n")
    stage_tokenizer_files(out, base, staging)
    return [_stage_task(task, out, staging)[0] for task in tasks]


def result(out: Path, taken: Taken, contract, verification, seconds: float, task_files: list) -> PeftExportResult:
    first = next(iter(taken.tasks))
    export = ExportResult(out, *task_file_paths(out, first), contract, verification, seconds)
    return PeftExportResult(export, tuple(task_files), taken.notes)

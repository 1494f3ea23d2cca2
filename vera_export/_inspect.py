"""``inspect``: what a vera-export graph promises, and which task files beside it fit."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from vera_runtime import ADAPTER_SUFFIX, Contract, TaskFileError, read_onnx_adapter
from vera_runtime.files import adapter_size_limit, pending_journal, printable, read_task_fingerprint
from vera_runtime.layout import adapter_model_version, task_files_beside

from ._graphfile import load_graph

_MISFIT = "  (does not fit this graph)"


@dataclasses.dataclass(frozen=True)
class TaskFound:
    path: Path
    name: str
    fits: bool


@dataclasses.dataclass(frozen=True)
class GraphReport:
    path: Path
    contract: Contract
    inputs: dict[str, list]
    outputs: dict[str, list]
    projection_bytes: int
    task_default_bytes: int
    base_bytes: int
    tasks: tuple[TaskFound, ...]
    journal: Path | None = None  # an interrupted publish beside the graph (inspect never finishes it)

    def _heads(self) -> list[str]:
        if not self.contract.heads:
            return []
        lines = [f"  {len(self.contract.heads)} per-task head layers (inputs <head>.weight [tasks, out, in],"
                 " <head>.bias [tasks, out]):"]
        for head in self.contract.heads:
            bias = "" if head.bias else "  no bias"
            lines.append(f"    {head.name}  in={head.in_features} out={head.out_features}{bias}")
        return lines

    def format(self) -> str:
        c = self.contract
        lines = [
            f"{self.path}  (graph contract v{c.version}, fingerprint {c.fingerprint[:12]})",
            f"  r={c.r}  projection seed={c.seed}  default task={c.default_task!r}",
            f"  recipe: {c.recipe}",
            f"  form: {c.weight_dtype} weights; task inputs"
            f" {'with defaults' if c.task_defaults else 'required (web form)'}"
            + (f"; fused decoder (onnxruntime-genai's builder graph), past and present one shared buffer of at"
               f" least {c.kv_shared_buffer} positions" if c.kv_shared_buffer else ""),
            f"  bytes: base weights {self.base_bytes:,}; vera_A + vera_B {self.projection_bytes:,};"
            f" default task {self.task_default_bytes:,}",
            "  model inputs:",
            *(f"    {name} {shape}" for name, shape in self.inputs.items()),
            "  outputs:",
            *(f"    {name} {shape}" for name, shape in self.outputs.items()),
            f"  {len(c.layers)} adapted layers (inputs <layer>.vera_lambda_d [tasks, {c.r}],"
            " <layer>.vera_lambda_b [tasks, out]):",
            *(f"    {layer.name}  in={layer.in_features} out={layer.out_features}" for layer in c.layers),
            *self._heads(),
            "  task files beside it:",
            *(f"    {t.path.name}  task={t.name!r}{'' if t.fits else _MISFIT}" for t in self.tasks),
        ]
        if not self.tasks:
            lines.append("    none")
        if self.journal:
            lines.append(f"  note: {self.journal.name} records an export interrupted while it put its files in place;"
                         " the next export into this folder, or a VeraSession on this graph, finishes it.")
        return "\n".join(printable(line, 1 << 16) for line in lines)  # names from the file never drive the terminal


def _shape(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _tensor_bytes(tensor) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(tensor.raw_data) or tensor.ByteSize()


def _tasks_beside(path: Path, contract: Contract) -> tuple[TaskFound, ...]:
    """This graph's task files (exactly <stem>.<task>.*), and whether each one fits it."""
    found = []
    for name, candidate in task_files_beside(path).items():
        try:
            fits = read_task_fingerprint(candidate) == contract.fingerprint  # the header only
        except TaskFileError:
            fits = False
        found.append(TaskFound(candidate, name, fits))
    for name, candidate in task_files_beside(path, ADAPTER_SUFFIX).items():
        try:
            version = read_onnx_adapter(candidate, adapter_size_limit(contract))[0]
            fits = version == adapter_model_version(contract.fingerprint)
        except TaskFileError:
            fits = False
        found.append(TaskFound(candidate, name, fits))
    return tuple(sorted(found, key=lambda t: t.path.name))


def inspect_graph(path: str | os.PathLike) -> GraphReport:
    path = Path(path)
    model, contract = load_graph(path)
    task_inputs = set(contract.task_shapes())
    sizes = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    projection = sizes.get("vera_A", 0) + sizes.get("vera_B", 0)
    defaults = sum(sizes.get(name, 0) for name in task_inputs)
    return GraphReport(
        path=path,
        contract=contract,
        inputs={i.name: _shape(i) for i in model.graph.input if i.name not in task_inputs},
        outputs={o.name: _shape(o) for o in model.graph.output},
        projection_bytes=projection,
        task_default_bytes=defaults,
        base_bytes=sum(sizes.values()) - projection - defaults,
        tasks=_tasks_beside(path, contract),
        journal=pending_journal(path),
    )

"""``export_fused``: PEFT VeRA adapters over a decoder, as onnxruntime-genai's builder graph of the base
model (GroupQueryAttention, fused norms, packed projections; int4 ``MatMulNBits`` if asked) with the
VeRA branches grafted on — generation at the builder's speed, every task still an input.

1. Check the inputs.
2. Run the builder on the base model (in its own Python), loading the base and adapters with PEFT meanwhile.
3. Meanwhile too, take from PyTorch what the graphs and checks need (the contract, every task's λ, PEFT's
   logits), then release the PEFT model: the export never holds two copies of the weights.
4. Graft the VeRA branches onto the builder's projections, with the contract (``_fused_graphs``).
5. Check ONNX Runtime against PEFT for each task and a task per row, prefill and decode steps
   (``_verify_fused``).
6. Publish the graph, genai_config.json, the tokenizer and every task's files as one set.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from vera_runtime.files import load_file_bounded
from vera_runtime.layout import GENAI_CONFIG, hot_template_path, task_file_paths

from ._builder import BUILDER_VERSION, PRECISIONS, Build, builder_python, check_base
from ._defaults import DEFAULT_TOLERANCE, FORM_TOLERANCES
from ._discover import find_vera_layers
from ._errors import VeraExportError
from ._export import ExportResult, _stage_task, current_task
from ._fused_graphs import cache_layout, from_torch, write_graphs
from ._genai import stage_tokenizer_files
from ._peft import PeftExportResult, PeftRoot, _read_all, load_peft_models, resolve_base
from ._staging import Staging, check_writable
from ._verify_fused import references, verify_graphs


@dataclasses.dataclass(frozen=True)
class _Inputs:
    adapters: list  # the read adapter folders, the graph's default task first
    base: Path
    builder: str  # the Python that runs the builder


def _check(adapters: dict, base, builder, out: Path, precision: str) -> _Inputs:
    if precision not in PRECISIONS:
        raise VeraExportError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} (--fused fp32|int4).")
    read = _read_all(adapters)
    base_path = resolve_base(base, read[0])
    check_writable(out, (*(a.path for a in read), base_path))
    check_base(base_path)
    return _Inputs(read, base_path, builder_python(builder))


def export_fused(
    adapters: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    model_class: str | None = None,
    precision: str = "fp32",
    builder: str | os.PathLike | None = None,
    verify: bool = True,
    tolerance: float | None = None,
    hot_template: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> PeftExportResult:
    """Export PEFT VeRA adapters over a causal LM as the builder's fused decoder with VeRA branches.

    ``precision``: ``fp32``, or ``int4`` (the builder's MatMulNBits base weights; VeRA stays float32).
    ``builder``: the Python holding onnxruntime-genai (default ``$VERA_GENAI_PYTHON``, else this one).
    ``tolerance``: the largest difference from PEFT accepted, relative to the logits' scale (default 1e-5
    for fp32, 0.5 for int4 as ``convert --to int4``); a task per row must equal each task alone to 1e-5.
    ``hot_template``: also write ``<stem>.hot.onnx`` (a second copy of the weights), from which the runtime
    serves one task with its VeRA weights folded per builder MatMul (``VeraSession.specialize``).
    Writes ``out`` (+ ``.data``), ``genai_config.json``, the tokenizer and one task file per adapter.
    """
    start, out = time.perf_counter(), Path(out)
    # 1. Up-front checks.
    given = _check(adapters, base, builder, out, precision)
    with Staging(out, replaces_set=True, inputs=(*(a.path for a in given.adapters), given.base)) as staging:
        scratch = staging.scratch()
        # 2. The builder's graph of the base model, made in its own process while PEFT loads here.
        progress(f"Building the base decoder with onnxruntime-genai {BUILDER_VERSION}'s builder ({precision}),"
                 f" loading the base model and {len(given.adapters)} adapter(s) ...")
        build = Build(given.builder, given.base, scratch / "built", precision, scratch / "cache")
        try:
            loaded = load_peft_models(given.adapters, given.base, model_class)
            root = PeftRoot(loaded.model)
            adapted = find_vera_layers(root, given.adapters[0].name)
            if adapted.heads:
                raise VeraExportError("--fused exports causal LMs; these adapters train head layers: export"
                                      " without --fused.")
            # 3. What the graphs and the checks need from PyTorch, then the PEFT model goes: never both copies.
            source = from_torch(adapted, root, merge_weights=hot_template and precision == "int4")
            tasks = _tasks(loaded.model, root, source.contract, [a.name for a in given.adapters])
            refs = references(loaded.model, list(tasks), loaded.model.set_adapter,
                              source.config.vocab_size) if verify else None
            notes, layers, r = loaded.notes, len(adapted.layers), adapted.r
            del loaded, root, adapted
            gc.collect()
            built = build.result()
        finally:
            build.stop()
        # 4. The VeRA branches on the builder's graph, and the contract.
        progress(f"Grafting {layers} VeRA layers (r={r}) onto the builder's graph ...")
        contract = write_graphs(built, out, scratch, source, next(iter(tasks.values())).tensors, precision,
                                hot_template)
        # 5. Every task, alone and one per row, against PEFT's references.
        verification = None
        if verify:
            progress("Verifying ONNX Runtime against PEFT (each task, a task per row; prefill and decode) ...")
            template = scratch / hot_template_path(out).name if hot_template else None
            feeds = {name: {key: value[None] for key, value in task.tensors.items()} for name, task in tasks.items()}
            default = DEFAULT_TOLERANCE if precision == "fp32" else FORM_TOLERANCES[precision]
            verification = verify_graphs(scratch / out.name, template, refs, feeds,
                                         (cache_layout(source.config), contract.kv_shared_buffer), contract,
                                         tolerance or default)
        # 6. The whole set, published at once.
        task_files = _stage_set(given.base, out, scratch, built.parent, list(tasks.values()), staging)
        staging.publish()
    first = given.adapters[0].name
    result = ExportResult(out, *task_file_paths(out, first), contract, verification, time.perf_counter() - start)
    return PeftExportResult(result, tuple(task_files), notes)


def _tasks(model, root: PeftRoot, contract, names: list[str]) -> dict:
    """Every adapter as a task of the graph (its λ), the default task first."""
    tasks = {}
    for name in names:
        model.set_adapter(name)
        tasks[name] = current_task(find_vera_layers(root, name), contract)
    model.set_adapter(names[0])
    return tasks


def _stage_set(base: Path, out: Path, scratch: Path, built: Path, tasks: list, staging: Staging) -> list[Path]:
    """The graphs written in ``scratch``, genai_config.json, the tokenizer and every task's files."""
    for written in sorted(scratch.iterdir()):
        if written.is_file():
            os.replace(written, staging.path(out.with_name(written.name)))
    config = load_file_bounded(built / GENAI_CONFIG)  # the builder's: it describes its graph
    config["model"]["decoder"]["filename"] = out.name
    staging.path(out.with_name(GENAI_CONFIG)).write_text(json.dumps(config, indent=2) + "\n")
    stage_tokenizer_files(out, base, staging)
    return [_stage_task(task, out, staging)[0] for task in tasks]

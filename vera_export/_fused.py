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
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ._builder import BUILDER_VERSION, PRECISIONS, Build, builder_python, check_base
from ._errors import VeraExportError
from ._peft_adapters import read_all, resolve_base
from ._staging import Staging, check_writable

if TYPE_CHECKING:
    from ._peft import PeftExportResult


@dataclasses.dataclass(frozen=True)
class _Inputs:
    adapters: list  # the read adapter folders, the graph's default task first
    base: Path
    builder: str  # the Python that runs the builder


def _check(adapters: dict, base, builder, out: Path, precision: str) -> _Inputs:
    if precision not in PRECISIONS:
        raise VeraExportError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} (--fused fp32|int4).")
    read = read_all(adapters)
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
            from . import _fused_steps as steps  # torch's import, once the builder runs: it hides ~1.5 s

            # 3. What the graphs and the checks need from PyTorch, then the PEFT model goes: never both copies.
            taken = steps.take_from_peft(given.adapters, given.base, model_class,
                                         merge_weights=hot_template and precision == "int4", verify=verify)
            gc.collect()
            built = build.result()
        finally:
            build.stop()
        # 4. The VeRA branches on the builder's graph, and the contract.
        progress(f"Grafting {taken.layers} VeRA layers (r={taken.r}) onto the builder's graph ...")
        default_task = next(iter(taken.tasks.values())).tensors
        contract = steps.write_graphs(built, out, scratch, taken.source, default_task, precision, hot_template)
        # 5. Every task, alone and one per row, against PEFT's references.
        verification = None
        if verify:
            progress("Verifying ONNX Runtime against PEFT (each task, a task per row; prefill and decode) ...")
            verification = steps.verify(out, scratch, taken, contract, hot_template, tolerance, precision)
        # 6. The whole set, published at once.
        task_files = steps.stage_set(given.base, out, scratch, built.parent, list(taken.tasks.values()), staging)
        staging.publish()
    return steps.result(out, taken, contract, verification, time.perf_counter() - start, task_files)

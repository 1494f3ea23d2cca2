"""``convert``: an exported graph in the form another ONNX Runtime target needs, with its task files.

The converted graph keeps the contract (same fingerprint, same task inputs), records its form in the
metadata, gets a copy of every task file of the source under its own stem, and is checked against
the float32 graph, task by task, before anything is put in place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from vera_runtime import ADAPTER_SUFFIX, TASK_SUFFIX, Contract
from vera_runtime.files import load_file_bounded
from vera_runtime.layout import COMPANION_FILES, GENAI_CONFIG, labels_path, task_files_beside

from . import _defaults
from ._agreement import Agreement, compare_forms
from ._errors import VeraExportError
from ._graphfile import load_graph
from ._staging import check_writable, writing
from ._targets.int4 import BLOCK_SIZES

TARGETS = ("int8", "int4", "fp16", "web", "ort")
WEIGHT_FORMS = ("int8", "int4", "fp16")  # ways to store the base weights: one at a time
# Largest |converted - float32| accepted, relative to the outputs' scale: web and ort run the same
# arithmetic; fp16 rounds every weight to 11 bits; int8 to 8 bits per weight, with activations too.


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    path: Path
    targets: tuple[str, ...]
    contract: Contract
    task_files: tuple[Path, ...]
    agreements: tuple[Agreement, ...]
    tolerance: float


def parse_targets(to: str | Sequence[str]) -> tuple[str, ...]:
    """``"int8,web"`` or ``["int8", "web"]`` -> the targets, in the order they are applied."""
    names = [n.strip() for item in ([to] if isinstance(to, str) else to) for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise VeraExportError(f"unknown target {unknown or names!r}: choose from {', '.join(TARGETS)} (e.g. int8,web).")
    forms = [n for n in WEIGHT_FORMS if n in names]
    if len(forms) > 1:
        raise VeraExportError(f"{' and '.join(forms)} are ways to store the same weights: choose one.")
    return tuple(t for t in TARGETS if t in names)


def _check_out(graph: Path, out: Path, targets: tuple[str, ...], sources: tuple[Path, ...]) -> None:
    want = ".ort" if "ort" in targets else ".onnx"
    if out.suffix != want:
        raise VeraExportError(f"--out {out}: name the {'/'.join(targets)} graph *{want}, e.g. {out.with_suffix(want)}.")
    if out.resolve().parent == graph.resolve().parent and out.with_suffix("").name == graph.with_suffix("").name:
        raise VeraExportError(
            f"--out {out} has the stem of {graph} (their task files would share names): choose another, e.g."
            f" {graph.with_suffix('').name}.{targets[0]}{want}."
        )
    check_writable(out, sources)


def _sources(graph: Path) -> tuple[Path, ...]:
    """What a conversion reads: the graph, its external data and its task files."""
    tasks = [*task_files_beside(graph).values(), *task_files_beside(graph, ADAPTER_SUFFIX).values()]
    return graph, Path(f"{graph}.data"), *tasks


def _transform(graph: Path, targets: tuple[str, ...], block_size: int):
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from ._targets.fp16 import to_fp16
    from ._targets.int4 import to_int4
    from ._targets.int8 import to_int8
    from ._targets.web import to_web

    proto, contract = load_graph(graph)
    if contract.kv_shared_buffer:
        raise VeraExportError(
            f"{graph} is a fused graph (onnxruntime-genai's builder): convert makes forms of traced graphs. For"
            " int4, export with `--fused int4`; other forms of fused graphs are not made."
        )
    if contract.weight_dtype != "float32" or not contract.task_defaults:
        raise VeraExportError(
            f"{graph} is a converted graph ({contract.weight_dtype} weights, task defaults"
            f" {'kept' if contract.task_defaults else 'removed'}): convert the graph vera-export wrote instead."
        )
    load_external_data_for_model(proto, str(graph.parent))  # the one parse serves the contract and the weights
    steps = {"int8": to_int8, "int4": functools.partial(to_int4, block_size=block_size), "fp16": to_fp16,
             "web": to_web}
    for target in targets:
        if target in steps:
            proto = steps[target](proto, contract)
    proto = _topologically_sorted(proto)  # the fp16 and int8 tools leave nodes out of order
    weights = {"int8": "int8", "int4": "int4", "fp16": "float16"}
    contract = dataclasses.replace(
        contract, task_defaults="web" not in targets, hot_template_sha256=None,  # no template for a converted form
        weight_dtype=next((weights[t] for t in targets if t in weights), "float32"),
    )
    metadata = {p.key: p.value for p in proto.metadata_props if not p.key.startswith("vera.")} | contract.to_metadata()
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    return proto, contract


def _topologically_sorted(proto):
    import onnx_ir as ir

    model = ir.from_proto(proto)
    model.graph.sort()
    return ir.to_proto(model)


def _write(proto, path: Path, ort_out: Path | None) -> None:
    """Save ``proto`` at ``path`` (external data beside it when large), check it, then convert to .ort."""
    import onnx

    big = proto.ByteSize() > _defaults.EXTERNAL_DATA_BYTES
    onnx.save(proto, str(path), save_as_external_data=big, location=f"{path.name}.data" if big else None)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).splitlines()[0]
        raise VeraExportError(f"the converted graph fails onnx.checker: {first}; please report it.") from exc
    if ort_out is not None:
        from ._targets.ort import save_as_ort

        save_as_ort(path, ort_out)
        for written in (path, Path(f"{path}.data")):
            written.unlink(missing_ok=True)


def _copy_companions(graph: Path, out: Path, folder: Path) -> None:
    """Into ``folder``: the label names under ``out``'s stem, and, when ``out`` goes to another folder, the
    tokenizer files and a KV-cache graph's genai_config.json (its ``filename`` naming ``out``: onnxruntime-genai
    runs one model per folder). In the source's own folder the converted form shares them."""
    if labels_path(graph).is_file():
        shutil.copyfile(labels_path(graph), folder / labels_path(out).name)
    if out.resolve().parent == graph.resolve().parent:
        return
    config = graph.with_name(GENAI_CONFIG)
    if config.is_file():
        try:
            settings = load_file_bounded(config)
            settings["model"]["decoder"]["filename"] = out.name
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VeraExportError(f"{config} is not a genai_config.json this graph's export wrote ({exc!r:.120}):"
                                  " export the graph again.") from exc
        (folder / GENAI_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    for name in COMPANION_FILES:
        if name != GENAI_CONFIG and graph.with_name(name).is_file():
            shutil.copyfile(graph.with_name(name), folder / name)


def _copy_task_files(graph: Path, out: Path, folder: Path) -> list[Path]:
    """The source graph's task files, renamed for ``out``'s stem, into ``folder``; their final paths."""
    stem = out.with_suffix("").name
    finals = []
    for suffix in (TASK_SUFFIX, ADAPTER_SUFFIX):
        for task, path in task_files_beside(graph, suffix).items():
            final = out.with_name(f"{stem}.{task}{suffix}")
            shutil.copyfile(path, folder / final.name)
            finals.append(final)
    return finals


def convert(
    graph: str | os.PathLike,
    out: str | os.PathLike,
    to: str | Sequence[str],
    *,
    tolerance: float | None = None,
    block_size: int = 32,
    progress: Callable[[str], None] = lambda message: None,
) -> ConvertResult:
    """Write ``graph`` (as vera-export wrote it) in the form of targets ``to`` (int8, int4 or fp16, web,
    ort) at ``out``, with a copy of its task files, after checking every task against ``graph``.

    ``tolerance``: the largest |converted - float32| accepted, relative to the outputs' scale (default:
    the loosest of the targets' ``_defaults.FORM_TOLERANCES``). Nothing is written when a task exceeds it.
    ``block_size`` (int4): weights per scale, a power of two from 16 to 256.
    """
    graph, out, targets = Path(graph), Path(out), parse_targets(to)
    if block_size not in BLOCK_SIZES:
        raise VeraExportError(f"block size {block_size} is not one of {BLOCK_SIZES} (MatMulNBits takes powers of two).")
    sources = _sources(graph)
    _check_out(graph, out, targets, sources)
    if "web" in targets and not task_files_beside(graph):
        raise VeraExportError(
            f"no task files beside {graph}: a web graph holds no task values, so it needs them; write them with"
            " `vera-export task` or export again."
        )
    tolerance = tolerance or max(_defaults.FORM_TOLERANCES[t] for t in targets)
    progress(f"Converting {graph.name} to {'+'.join(targets)} ...")
    proto, contract = _transform(graph, targets, block_size)
    with writing(out, None, replaces_set=True, inputs=sources) as stage:
        scratch = stage.scratch()
        onnx_path = scratch / (out.with_suffix(".onnx").name if "ort" in targets else out.name)
        _write(proto, onnx_path, scratch / out.name if "ort" in targets else None)
        del proto
        finals = _copy_task_files(graph, out, scratch)
        _copy_companions(graph, out, scratch)
        progress("Comparing every task with the float32 graph ...")
        agreements = compare_forms(graph, scratch / out.name)
        _require_agreement(agreements, tolerance, targets)
        for written in sorted(scratch.iterdir()):
            os.replace(written, stage.path(out.parent / written.name))
    return ConvertResult(out, targets, contract, tuple(finals), agreements, tolerance)


def _require_agreement(agreements: tuple[Agreement, ...], tolerance: float, targets: tuple[str, ...]) -> None:
    worst = max(agreements, key=lambda a: a.relative)
    if worst.relative > tolerance:
        raise VeraExportError(
            f"the {'+'.join(targets)} graph differs from the float32 graph on task '{worst.name}': max |diff|"
            f" {worst.max_abs_diff:.3g} for outputs of scale {worst.scale:.3g} (relative {worst.relative:.3g} >"
            f" tolerance {tolerance:g}); nothing was written. Raise --tolerance if that is acceptable."
        )

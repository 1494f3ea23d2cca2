"""The ``vera-export`` command: a thin click layer over the library API.

The library is imported inside each command: help, usage errors and ``inspect`` never load torch.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from pathlib import Path

import click

from vera_runtime import VeraError
from vera_runtime.files import printable

from ._defaults import DEFAULT_OPSET, DEFAULT_TOLERANCE, TRUST_FLAG
from ._errors import VeraExportError
from ._graphfile import refuse_graph_as_model

_EXPECTED = (VeraError,)  # the exporter's errors derive from it too
_TASK_NAME_HELP = "Name of the task (default: the checkpoint's task, or the PEFT adapter folder's name)."
_MODEL_CLASS_HELP = (
    "PEFT adapters: the transformers class to load the base as, e.g. LlamaForCausalLM (default: from the"
    " adapter's task_type, its auto_mapping, or the base's config.json architectures)."
)


class _ExportByDefault(click.Group):
    """``vera-export MODEL --out FILE`` means ``vera-export export MODEL --out FILE``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)


def _errors_as_messages(command):
    """One line on stderr and exit 1 for any failure; the traceback only with --verbose."""

    @functools.wraps(command)
    def wrapper(*args, verbose: bool, **kwargs):
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            if verbose:
                raise
            raise click.ClickException(printable(_message(exc), 4000)) from None

    return click.option("--verbose", is_flag=True, help="Show tracebacks and library warnings.")(wrapper)


def _message(exc: Exception) -> str:
    """What failed, in words: ours as they are, OS errors by file, anything else marked unexpected."""
    if isinstance(exc, OSError) and exc.filename:
        return f"cannot use {exc.filename}: {exc.strerror or exc}."
    if isinstance(exc, _EXPECTED):
        return str(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"unexpected {type(exc).__name__}: {first} (rerun with --verbose for the traceback)"


def _progress(start: float):
    return lambda message: click.echo(f"[{time.perf_counter() - start:6.1f}s] {message}", err=True)


@click.group(cls=_ExportByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vera-export")
def main() -> None:
    """Export VeRA-adapted PyTorch models to one ONNX graph whose task vectors are inputs.

    \b
      vera-export MODEL.pt --out m.onnx     export (same as `vera-export export ...`)
      vera-export ADAPTER_DIR --base BASE_DIR --out m.onnx   export a PEFT VeRA adapter folder
      vera-export task OTHER.pt -g m.onnx  add OTHER's λ as another task of m.onnx
      vera-export convert m.onnx --to int4 --out m.int4.onnx   int8, int4, fp16, web or ort form
      vera-export inspect m.onnx            show a graph's contract and its task files
    """


@main.command("export")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="The ONNX file to write.")
@click.option("--input", "inputs", multiple=True, metavar="SPEC",
              help="A forward argument as NAME:DTYPE[<HIGH]:DIMS, e.g. input_ids:int64<1000:batch=2,sequence=8;"
                   " repeat per argument. Needed when the model has no vera_input_specs().")
@click.option("--task-name", help=_TASK_NAME_HELP)
@click.option("--opset", type=click.IntRange(18, 23), default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TOLERANCE, show_default=True,
              help="Largest ORT-vs-PyTorch difference accepted, relative to the outputs' largest magnitude.")
@click.option("--no-verify", is_flag=True, help="Skip running the graph in ONNX Runtime against PyTorch.")
@click.option("--hot-template", is_flag=True,
              help="Also write <stem>.hot.onnx, with which the runtime serves a task at merged-graph speed"
                   " (a second copy of the weights on disk).")
@click.option(TRUST_FLAG, "trust_pickle", is_flag=True,
              help="Allow a pickle that needs classes outside the allowlist."
                   " Runs code from the file: only for files you trust.")
@click.option("--base", type=click.Path(file_okay=False),
              help="PEFT adapters: the transformers base model folder"
                   " (default: the adapter's base_model_name_or_path).")
@click.option("--task", "legacy_adapters", multiple=True, hidden=True)  # the name before --adapter
@click.option("--adapter", "more_adapters", multiple=True, metavar="NAME=ADAPTER_DIR",
              help="PEFT adapters: another adapter over the same base, written as task NAME. Repeatable.")
@click.option("--model-class", help=_MODEL_CLASS_HELP)
@click.option("--kv-cache", is_flag=True,
              help="Causal LMs: a graph with a KV cache for generation (inputs past_key_values.N.key/value,"
                   " outputs present.N.key/value); PEFT folders also get genai_config.json and the base's"
                   " tokenizer files.")
@click.option("--fused", type=click.Choice(["fp32", "int4"]),
              help="Causal LMs from PEFT folders: onnxruntime-genai's model-builder graph of the base model"
                   " (GroupQueryAttention, fused norms, packed projections; int4: MatMulNBits weights) with the"
                   " VeRA branches grafted on: generation at the builder's speed, tasks still inputs. Implies"
                   " --kv-cache.")
@click.option("--builder-python", type=click.Path(dir_okay=False),
              help="--fused: the Python with onnxruntime-genai==0.18.0 (default: $VERA_GENAI_PYTHON, else this one).")
@_errors_as_messages
def export_command(model_path, out, inputs, task_name, opset, tolerance, no_verify, hot_template, trust_pickle,
                   base, legacy_adapters, more_adapters, model_class, kv_cache, fused, builder_python) -> None:
    """Export MODEL to one ONNX graph plus task files.

    MODEL is torch.save(model), a vera-export checkpoint, or a PEFT VeRA adapter folder
    (save_pretrained output) over a transformers base model (--base).
    """
    from ._staging import check_writable

    more_adapters = (*more_adapters, *legacy_adapters)
    reads = [p for p in (model_path, base, *(entry.partition("=")[2] for entry in more_adapters)) if p]
    check_writable(Path(out), reads)  # before a model that may take minutes to load
    progress = _progress(time.perf_counter())
    options = {"inputs": inputs or None, "opset": opset, "verify": not no_verify, "tolerance": tolerance,
               "hot_template": hot_template, "kv_cache": kv_cache}
    if fused or builder_python:
        _refuse_unfused(model_path, fused, input=inputs)
        from ._fused import export_fused

        adapters = _adapters(task_name or _task_name_of(model_path), model_path, more_adapters)
        peft_result = export_fused(adapters, out, base=base, model_class=model_class, precision=fused,
                                   builder=builder_python, verify=not no_verify, hot_template=hot_template,
                                   progress=progress,
                                   **({"tolerance": tolerance} if tolerance != DEFAULT_TOLERANCE else {}))
        result = peft_result.export
    elif _is_adapter_folder(model_path):
        from ._peft import export_peft

        adapters = _adapters(task_name or _task_name_of(model_path), model_path, more_adapters)
        peft_result = export_peft(adapters, out, base=base, model_class=model_class, progress=progress,
                                  **{k: v for k, v in options.items() if v is not None})
        result = peft_result.export
        for note in peft_result.notes:
            click.echo(f"Note: {note}", err=True)
    else:
        _refuse_peft_options(base=base, adapter=more_adapters, model_class=model_class)
        refuse_graph_as_model(model_path)
        from ._checkpoint import load_model
        from ._export import export

        progress(f"Loading {model_path} ...")
        loaded = load_model(model_path, trust_pickle=trust_pickle)
        _as_float32(loaded.model, model_path)
        result = export(loaded.model, out, task_name=task_name or loaded.task_name, progress=progress,
                        reads=[model_path], **options)
        peft_result = None
    if result.verification is not None:
        for check in result.verification.checks:
            line = f"  {check.name}: max |diff| {check.max_abs_diff:.2e} (outputs up to {check.scale:.3g})"
            click.echo(line, err=True)
    click.echo(f"Wrote {result.onnx_path} ({len(result.contract.layers)} VeRA layers, r={result.contract.r})")
    click.echo(f"Wrote task '{result.contract.default_task}': {result.task_path} and {result.adapter_path}")
    for path in peft_result.task_files[1:] if peft_result else ():
        click.echo(f"Wrote task file {path} (and its .onnx_adapter)")


def _as_float32(model, model_path: str) -> None:
    """A model the CLI loaded itself is converted to float32, with a note (the library refuses instead)."""
    from ._export import not_float32

    if found := not_float32(model):
        model.float()
        click.echo(f"Note: {model_path} holds {found} weights; exported in float32 (the graph's precision;"
                   " `vera-export convert --to fp16` makes a float16 form).", err=True)


def _refuse_unfused(model_path: str, fused: str | None, **given) -> None:
    """--fused starts from PEFT folders and sets the graph's inputs itself."""
    if not fused:
        raise click.UsageError("--builder-python applies to --fused exports.")
    if not _is_adapter_folder(model_path):
        raise click.UsageError("--fused exports PEFT adapter folders (the builder starts from the base model's"
                               " folder); MODEL is a file.")
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value]
    if named:
        raise click.UsageError(f"{' and '.join(named)} do not apply to --fused exports.")


def _is_adapter_folder(model_path: str) -> bool:
    """A folder is a PEFT adapter, a file a model; anything else (missing, a loop, a FIFO) is neither."""
    from vera_runtime.files import file_problem

    problem = file_problem(model_path)
    if problem and not Path(model_path).is_dir():
        raise VeraExportError(f"{model_path} {problem}: give a model file or a PEFT adapter folder.")
    return Path(model_path).is_dir()


def _refuse_peft_options(**given) -> None:
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value]
    if named:
        verb = "apply" if len(named) > 1 else "applies"
        raise click.UsageError(f"{' and '.join(named)} {verb} to PEFT adapter folders; MODEL is a file.")


def _task_name_of(folder: str) -> str:
    """A task name from a folder's: characters outside [A-Za-z0-9_-] become '-', at most 64."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", Path(folder).resolve().name)[:64].strip("-") or "default"


def _adapters(first_name: str, first: str, entries: tuple[str, ...]) -> dict[str, str]:
    """The first adapter and every --adapter NAME=DIR, refusing a name given twice (one would be lost)."""
    adapters = {first_name: first}
    for entry in entries:
        name, _, folder = entry.partition("=")
        if not name or not folder:
            raise click.BadParameter(f"{entry!r}: expected NAME=ADAPTER_DIR", param_hint="--adapter")
        if name in adapters:
            raise click.BadParameter(
                f"task name '{name}' is given twice ({adapters[name]} and {folder}): give each adapter its own name"
                + (" (the first adapter's name comes from its folder, or --task-name)" if name == first_name else ""),
                param_hint="--adapter",
            )
        adapters[name] = folder
    return adapters


@main.command("task")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--graph", "-g", required=True, type=click.Path(dir_okay=False),
              help="The exported graph this task is for.")
@click.option("--task-name", help=_TASK_NAME_HELP)
@click.option(TRUST_FLAG, "trust_pickle", is_flag=True, help="As for export: only for files you trust.")
@click.option("--base", type=click.Path(file_okay=False),
              help="PEFT adapters: the transformers base model folder"
                   " (default: the adapter's base_model_name_or_path).")
@click.option("--model-class", help=_MODEL_CLASS_HELP)
@click.option("--overwrite", is_flag=True, help="Replace a task the graph already has (its default task included).")
@_errors_as_messages
def task_command(model_path, graph, task_name, trust_pickle, base, model_class, overwrite) -> None:
    """Write MODEL's λ vectors as another task of GRAPH (same base model, A/B and layers).

    MODEL is a file as for export, or a PEFT VeRA adapter folder (with --base, as for export).
    """
    if _is_adapter_folder(model_path):
        from ._peft import add_peft_task

        paths = add_peft_task(model_path, graph, task_name or _task_name_of(model_path), base=base,
                              model_class=model_class, overwrite=overwrite)
    else:
        _refuse_peft_options(base=base, model_class=model_class)
        refuse_graph_as_model(model_path)
        from ._checkpoint import load_model
        from ._export import add_task

        loaded = load_model(model_path, trust_pickle=trust_pickle)
        _as_float32(loaded.model, model_path)
        paths = add_task(loaded.model, graph, task_name or loaded.task_name, overwrite=overwrite, reads=[model_path])
    for path in paths:
        click.echo(f"Wrote {path}")


@main.command("convert")
@click.argument("graph_path", metavar="GRAPH.onnx", type=click.Path(dir_okay=False))
@click.option("--to", "targets", required=True, multiple=True, metavar="TARGET",
              help="int8 or int4 (quantized base weights), fp16, web (for onnxruntime-node/-web) or ort (mobile"
                   " format); combine with commas or repeat, e.g. --to int8,web.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="The graph to write (.ort for --to ort); the task files are copied beside it.")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True),
              help="Largest difference from the float32 graph accepted, relative to the outputs' largest"
                   " magnitude (default: web 1e-5, ort 1e-4, fp16 2e-2, int8 0.25, int4 0.5).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True,
              help="int4: weights per scale (MatMulNBits block size).")
@_errors_as_messages
def convert_command(graph_path, targets, out, tolerance, block_size) -> None:
    """Write GRAPH in the form another ONNX Runtime target needs, checked task by task against it."""
    from ._convert import convert

    result = convert(graph_path, out, targets, tolerance=tolerance, block_size=int(block_size),
                     progress=_progress(time.perf_counter()))
    for agreement in result.agreements:
        click.echo(f"  {agreement.name}: max |diff| {agreement.max_abs_diff:.2e} (outputs up to"
                   f" {agreement.scale:.3g}), argmax agrees on {agreement.argmax_agreement:.1%}", err=True)
    click.echo(f"Wrote {result.path} ({'+'.join(result.targets)}) and {len(result.task_files)} task files")


@main.command("lora")
@click.argument("source", metavar="SOURCE", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(),
              help="The LoRA adapter folder to write (new, or one an earlier `vera-export lora` wrote).")
@click.option("--graph", "-g", type=click.Path(dir_okay=False),
              help="SOURCE is a task file (.task.safetensors or .onnx_adapter): the graph it belongs to.")
@click.option("--base", type=click.Path(file_okay=False),
              help="The transformers base model folder (PEFT folders: default their base_model_name_or_path;"
                   " task files: required).")
@click.option("--model-class", help=_MODEL_CLASS_HELP)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Precision of the LoRA weights on disk (checked in float32 either way).")
@click.option(TRUST_FLAG, "trust_pickle", is_flag=True, help="As for export: only for files you trust.")
@_errors_as_messages
def lora_command(source, out, graph, base, model_class, dtype, trust_pickle) -> None:
    """Write a VeRA task as the LoRA adapter that computes the same function (PEFT's format), for engines
    that run LoRA only (vLLM, SGLang, TensorRT-LLM, llama.cpp, onnxruntime-genai's builder).

    SOURCE is a PEFT VeRA adapter folder, a task file of a graph exported from one (with --graph and
    --base), or a vera-export checkpoint. Checked with PEFT before anything is written: the LoRA over the
    base must equal the VeRA model to 1e-5.
    """
    from ._lora import export_lora

    result = export_lora(source, out, graph=graph, base=base, model_class=model_class, dtype=dtype,
                         trust_pickle=trust_pickle, progress=_progress(time.perf_counter()))
    for check in (result.exact, result.written) if dtype != "float32" else (result.exact,):
        click.echo(f"  PEFT LoRA ({check.name}) vs VeRA: max |diff| {check.max_abs_diff:.2e} (outputs up to"
                   f" {check.scale:.3g})", err=True)
    click.echo(f"Wrote {result.out}: a rank-{result.r} LoRA of {result.layers} layers, {_size(result.lora_bytes)}"
               f" ({dtype}; the VeRA task itself is {_size(result.vera_bytes)})")


def _size(nbytes: int) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


@main.command("inspect")
@click.argument("graph_path", metavar="GRAPH.onnx", type=click.Path(dir_okay=False))
@_errors_as_messages
def inspect_command(graph_path) -> None:
    """Print a graph's contract: layers, heads, r, seed, inputs, bytes, and the task files beside it."""
    from ._inspect import inspect_graph

    click.echo(inspect_graph(graph_path).format())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

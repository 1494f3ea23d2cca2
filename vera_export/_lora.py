"""``export_lora``: a VeRA task as the LoRA that computes the same function, for engines that run LoRA only.

A VeRA layer adds ``Λb ⊙ B(Λd ⊙ A x)``, that is ``ΔW = (diag(Λb) B)(diag(Λd) A)``: a LoRA of rank r with
``lora_B = Λb ⊙ B[:out, :]``, ``lora_A = Λd ⊙ A[:, :in]`` and ``lora_alpha = r`` (scaling 1). The folder
written is PEFT's ``save_pretrained`` format, and it is checked the way its users load it:
``PeftModel.from_pretrained`` over the base must reproduce the VeRA model before anything is in place.

Steps (numbered in ``export_lora``): 1. the VeRA model (a PEFT folder, a task file of one of our graphs, or
a checkpoint: ``_lora_sources``), its LoRA tensors and its outputs on generated inputs; 2. the LoRA written
to a scratch folder beside the output and loaded with PEFT over the bare base; 3. the same outputs, then
the folder moved into place, or a refusal that leaves nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from vera_runtime.files import refuse_overwriting
from vera_runtime.layout import staging_path

from ._agreement import Check
from ._discover import AdaptedModel, find_vera_layers
from ._errors import VeraExportError
from ._lora_sources import Source, load
from ._peft_adapters import CONFIG, WEIGHTS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EXACT = 1e-5  # the float32 LoRA is the same function: anything above this is a wrong translation
_WRITES = (CONFIG, WEIGHTS)  # what the folder holds; a folder holding anything else is not replaced


@dataclasses.dataclass(frozen=True)
class LoraResult:
    """The folder written, with ``exact``: the float32 LoRA against the VeRA model on generated inputs, and
    ``written``: the file as written (in ``dtype``) loaded by PEFT, against the same outputs."""

    out: Path
    layers: int
    r: int
    dtype: str
    exact: Check
    written: Check
    lora_bytes: int
    vera_bytes: int  # the task's own float32 tensors (λ and heads): what a VeRA task file holds


def lora_tensors(adapted: AdaptedModel, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{<layer>.lora_A.weight: Λd ⊙ A[:, :in], <layer>.lora_B.weight: Λb ⊙ B[:out, :]}`` in float32, keyed as
    PEFT saves a LoRA."""
    tensors = {}
    with torch.no_grad():
        for layer in adapted.layers:
            vera_a = layer.vera_a[:, : layer.in_features].float()
            vera_b = layer.vera_b[: layer.out_features, :].float()
            key = f"{prefix}{layer.name}"
            tensors[f"{key}.lora_A.weight"] = (layer.lambda_d.float()[:, None] * vera_a).contiguous()
            tensors[f"{key}.lora_B.weight"] = (layer.lambda_b.float()[:, None] * vera_b).contiguous()
    return tensors


def _lora_config(source: Source, r: int):  # the fields VeRA does not have are LoRA's defaults
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=r, use_rslora=False, init_lora_weights=True, inference_mode=True,
                      **source.fields)


def _check_out(out: Path, reads: tuple[Path, ...]) -> None:
    """``out`` is a new folder, or one holding only what an earlier LoRA export wrote."""
    refuse_overwriting([out, *(out / name for name in _WRITES)], reads, VeraExportError)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise VeraExportError(f"{out} exists and is not a folder: give a new folder for the LoRA adapter.")
        others = sorted(path.name for path in out.iterdir() if path.name not in _WRITES)
        if others:
            raise VeraExportError(
                f"{out} already holds {others[0]!r}: give a new or empty folder (a LoRA export replaces only"
                f" {' and '.join(_WRITES)})."
            )
    if not out.parent.is_dir():
        raise VeraExportError(f"folder {out.parent} does not exist: create it first.")


@contextlib.contextmanager
def _scratch_beside(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` (same file system: the final moves are renames), always removed."""
    scratch = staging_path(out)
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _move_into_place(scratch: Path, out: Path) -> None:
    """Each file by one rename; a new folder as a whole."""
    if not out.exists():
        os.replace(scratch, out)
        scratch.mkdir()  # for the context manager to remove
        return
    for name in _WRITES:
        os.replace(scratch / name, out / name)


def _write(folder: Path, config, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    config.save_pretrained(str(folder))
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})
    os.chmod(folder / WEIGHTS, (folder / CONFIG).stat().st_mode & 0o777)  # safetensors writes 0600; PEFT does not


def _outputs(forward, examples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from ._trace import flatten_outputs

    with torch.no_grad():
        return flatten_outputs(forward(**examples))


def _compare(name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> Check:
    worst = max(float((got[key].float() - want[key].float()).abs().max()) for key in want)
    scale = max(float(want[key].float().abs().max()) for key in want)
    return Check(name, worst, scale)


def _load_lora(base: nn.Module, folder: Path) -> nn.Module:
    from peft import PeftModel

    with warnings.catch_warnings():  # PEFT's notes on task types and missing keys are checked below instead
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(folder)).eval()


def _check_layers(lora: nn.Module, wanted: set[str]) -> None:
    """The LoRA adapts exactly the VeRA model's layers: target_modules could match others in a LoRA."""
    from peft.tuners.lora import LoraLayer

    found = {name for name, module in lora.named_modules() if isinstance(module, LoraLayer)}
    if found != wanted:
        extra = sorted(found - wanted) or sorted(wanted - found)
        raise VeraExportError(
            f"PEFT's LoRA with the same target_modules adapts other layers than the VeRA model ('{extra[0]}'):"
            " this adapter cannot be carried over as it is; nothing was written."
        )


def export_lora(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    graph: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    model_class: str | None = None,
    dtype: str = "float32",
    trust_pickle: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> LoraResult:
    """Write the VeRA task ``source`` as a PEFT LoRA folder ``out`` computing the same function.

    ``source`` is a PEFT VeRA adapter folder (over ``base``, default its ``base_model_name_or_path``), a
    task file of ``graph`` (a native task file or ``.onnx_adapter`` of a graph exported from a PEFT folder,
    with ``base`` the base model folder it was exported from), or a vera-export checkpoint (``torch.save``
    of a VeRA model with ``trust_pickle``). ``dtype`` is the LoRA weights' precision on disk.
    Refused, with nothing written, unless the float32 LoRA loaded by PEFT equals the VeRA model to 1e-5.
    """
    out = Path(out)
    if dtype not in DTYPES:
        raise VeraExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    _check_out(out, tuple(Path(p) for p in (source, graph, base) if p is not None))
    # 1. The VeRA model, its LoRA tensors in float32 (the exact translation), its outputs on generated inputs.
    progress(f"Loading {source} ...")
    loaded = load(Path(source), graph, base, model_class, trust_pickle)
    translation = _translate(loaded)
    generator = torch.Generator().manual_seed(0)
    examples = {spec.name: spec.example(generator) for spec in loaded.specs}
    reference = _outputs(loaded.forward, examples)
    loaded.model = loaded.forward = None  # the VeRA model may go before the base is loaded bare
    with _scratch_beside(out) as scratch:
        # 2. Written as PEFT writes a LoRA, loaded as PEFT loads one, over the bare base.
        progress(f"Writing a rank-{translation.r} LoRA of {len(translation.layers)} layers; checking it with PEFT ...")
        _write(scratch, _lora_config(loaded, translation.r), translation.tensors, DTYPES[dtype])
        lora = _load_lora(loaded.unload(), scratch)
        _check_layers(lora, translation.layers)
        # 3. The same function, or nothing is written.
        exact, written = _checks(lora, translation.tensors, examples, reference, dtype)
        _require_exact(exact)
        lora_bytes = (scratch / WEIGHTS).stat().st_size
        _move_into_place(scratch, out)
    return LoraResult(out, len(translation.layers), translation.r, dtype, exact, written, lora_bytes,
                      translation.vera_bytes)


@dataclasses.dataclass(frozen=True)
class _Translation:
    tensors: dict[str, torch.Tensor]  # float32 lora_A/lora_B, and the tensors carried over as they are
    layers: frozenset[str]  # the LoRA layers, by name in the PeftModel
    r: int
    vera_bytes: int  # the task's own float32 tensors (λ and heads): what a VeRA task file holds


def _translate(loaded: Source) -> _Translation:
    adapted = find_vera_layers(loaded.model)
    return _Translation(
        {**lora_tensors(adapted, loaded.prefix), **loaded.carried},
        frozenset(f"{loaded.prefix}{layer.name}" for layer in adapted.layers),
        adapted.r,
        sum(param.numel() * 4 for param in adapted.task_params().values()),
    )


def _checks(lora: nn.Module, exact: dict[str, torch.Tensor], examples, reference, dtype: str) -> tuple[Check, Check]:
    """(the float32 LoRA, the LoRA as written) against the VeRA model's ``reference`` outputs."""
    forward = lora.base_model.model
    written = _compare("as written", _outputs(forward, examples), reference)
    if dtype == "float32":
        return dataclasses.replace(written, name="float32"), written
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(lora, exact)
    return _compare("float32", _outputs(forward, examples), reference), written


def _require_exact(check: Check) -> None:
    if check.relative > EXACT:
        raise VeraExportError(
            f"PEFT's LoRA differs from the VeRA model by {check.max_abs_diff:.3g} on outputs of scale"
            f" {check.scale:.3g} (relative {check.relative:.3g} > {EXACT:g}); nothing was written."
            " Please report the model class to vera-export."
        )

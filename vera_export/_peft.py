"""PEFT ``save_pretrained`` folders in: a transformers base model with one or more VeRA adapters.

Every check that can fail runs before anything is exported: adapters that cannot share one graph
(seed, r, targets, stored A/B) and a base model whose layers do not match the adapters are refused
with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vera_runtime._taskfile import check_task_name

from ._errors import VeraExportError
from ._export import ExportResult, add_task, export
from ._projection import make_projections

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_SHARED = ("projection_prng_key", "r", "target_modules", "task_type", "modules_to_save")
_PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")


@dataclasses.dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    config: dict
    tensors: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PeftModels:
    """A PeftModel holding every adapter (the first one active), and what the user should know."""

    model: nn.Module
    adapters: tuple[Adapter, ...]
    notes: tuple[str, ...]


def read_adapter(name: str, path: str | os.PathLike) -> Adapter:
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / CONFIG).is_file():
        raise VeraExportError(f"{path} has no {CONFIG}: give a folder written by PEFT's save_pretrained.")
    config = json.loads((path / CONFIG).read_text())
    if config.get("peft_type") != "VERA":
        raise VeraExportError(
            f"{path} holds a {config.get('peft_type', 'unknown')} adapter, not VeRA: vera-export exports"
            " VeRA adapters (peft.VeraConfig) only."
        )
    if not (path / WEIGHTS).is_file():
        raise VeraExportError(
            f"{path} has no {WEIGHTS}: re-save the adapter with save_pretrained(safe_serialization=True)."
        )
    try:
        tensors = load_file(path / WEIGHTS)
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise VeraExportError(f"{path / WEIGHTS} is not readable (truncated or corrupt?): {exc}") from None
    return Adapter(name, path, config, tensors)


def _normalised(config: dict, key: str):
    value = config.get(key)
    return sorted(value) if isinstance(value, list) else value


def check_compatible(adapters: list[Adapter]) -> list[str]:
    """Refuse adapters that cannot share one graph; return notes about the projections."""
    first = adapters[0]
    for other in adapters[1:]:
        for key in _SHARED:
            mine, theirs = _normalised(first.config, key), _normalised(other.config, key)
            if mine != theirs:
                raise VeraExportError(
                    f"adapters '{first.name}' and '{other.name}' cannot share one graph: {key} differs"
                    f" ({mine!r} vs {theirs!r}). Export them as separate graphs."
                )
        for key in _PROJECTIONS:
            both = key in first.tensors and key in other.tensors
            if both and not np.array_equal(first.tensors[key], other.tensors[key]):
                raise VeraExportError(
                    f"adapters '{first.name}' and '{other.name}' store different {key.split('.')[-1]}"
                    " (same seed, other layers targeted?): they cannot share one graph."
                )
    _check_trained_biases(adapters)
    notes = []
    for adapter in adapters:
        if not any(key in adapter.tensors for key in _PROJECTIONS):
            seed = adapter.config.get("projection_prng_key")
            notes.append(f"adapter '{adapter.name}' stores no A/B: regenerated from projection_prng_key={seed}.")
        elif all(key in adapter.tensors for key in _PROJECTIONS):
            vera_a, vera_b = (adapter.tensors[key] for key in _PROJECTIONS)
            seed = adapter.config["projection_prng_key"]
            recipe_a, recipe_b = make_projections(vera_a.shape[0], vera_a.shape[1], vera_b.shape[0], seed)
            if not (np.array_equal(recipe_a.numpy(), vera_a) and np.array_equal(recipe_b.numpy(), vera_b)):
                notes.append(
                    f"adapter '{adapter.name}' stores A/B that differ from projection_prng_key={seed}'s"
                    " recipe: the graph uses the stored ones."
                )
    return notes


def _trained_biases(adapter: Adapter) -> dict[str, np.ndarray]:
    """Biases trained with bias='all' or 'vera_only': in the file, but neither λ nor a saved head."""
    heads = tuple(f".{m}." for m in adapter.config.get("modules_to_save") or ())
    return {
        key: value for key, value in adapter.tensors.items()
        if key.endswith(".bias") and "vera_lambda" not in key and not any(h in f".{key}" for h in heads)
    }


def _check_trained_biases(adapters: list[Adapter]) -> None:
    """Trained biases become base weights of the graph: every adapter must agree on them."""
    first = _trained_biases(adapters[0])
    for other in adapters[1:]:
        theirs = _trained_biases(other)
        for key in sorted(set(first) | set(theirs)):
            if key not in first or key not in theirs or not np.array_equal(first[key], theirs[key]):
                raise VeraExportError(
                    f"adapters '{adapters[0].name}' and '{other.name}' train different biases ('{key}',"
                    f" bias={other.config.get('bias')!r}): biases are base weights of the graph, not task"
                    " inputs. Export these adapters as separate graphs, or train with bias='none'."
                )


def resolve_base(base: str | os.PathLike | None, adapters: list[Adapter]) -> Path:
    if base is not None:
        path = Path(base)
    else:
        named = adapters[0].config.get("base_model_name_or_path")
        if not named or not Path(named).is_dir():
            raise VeraExportError(
                f"{adapters[0].path}/{CONFIG} names base model {named!r}, which is not a local folder:"
                " pass the base model's folder with --base."
            )
        path = Path(named)
    if not (path / "config.json").is_file():
        raise VeraExportError(f"base model folder {path} has no config.json: give a transformers model folder.")
    return path


def _auto_class(task_type: str | None):
    import transformers

    return {
        "SEQ_CLS": transformers.AutoModelForSequenceClassification,
        "CAUSAL_LM": transformers.AutoModelForCausalLM,
        "TOKEN_CLS": transformers.AutoModelForTokenClassification,
    }.get(task_type or "", transformers.AutoModel)


def _head_size(adapter: Adapter) -> dict:
    """A classification adapter's head fixes num_labels, which a bare base folder may not know."""
    if adapter.config.get("task_type") not in ("SEQ_CLS", "TOKEN_CLS"):
        return {}
    heads = [v for k, v in adapter.tensors.items() if k.endswith((".classifier.weight", ".score.weight"))]
    return {"num_labels": heads[0].shape[0]} if heads else {}


def load_base(path: Path, adapter: Adapter) -> nn.Module:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "newly initialized" heads are expected: the adapter brings them
    try:
        model = _auto_class(adapter.config.get("task_type")).from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, attn_implementation="eager",
            **_head_size(adapter),
        )
    except Exception as exc:  # transformers raises many types for a bad folder
        raise VeraExportError(f"cannot load the base model from {path}: {str(exc).splitlines()[0]}") from None
    model.config.use_cache = False  # graphs have no KV cache yet: logits only
    return model.eval()


def _same(param: torch.Tensor, array: np.ndarray) -> bool:
    return tuple(param.shape) == array.shape and np.array_equal(param.detach().numpy().astype(array.dtype), array)


def _check_loaded(model: nn.Module, adapter: Adapter, base: Path) -> None:
    """Every λ in the adapter file must have landed in a layer of the same shape."""
    params = dict(model.named_parameters())
    for key, array in adapter.tensors.items():
        if "vera_lambda" not in key:
            continue
        param = params.get(f"{key}.{adapter.name}")
        if param is None or not _same(param, array):
            raise VeraExportError(
                f"base model {base} does not match adapter {adapter.path}: its layer for '{key}' is"
                f" {'missing' if param is None else list(param.shape)}, the adapter has {list(array.shape)}."
                " Give the base model the adapter was trained on."
            )


def load_peft_models(adapters: list[Adapter], base: str | os.PathLike | None) -> PeftModels:
    """Load the base model and every adapter into one PeftModel; the first adapter is active."""
    from peft import PeftModel

    notes = check_compatible(adapters)
    base_path = resolve_base(base, adapters)
    model = load_base(base_path, adapters[0])
    first = adapters[0]
    try:
        with warnings.catch_warnings():  # PEFT's warnings repeat what our notes and checks say
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, str(first.path), adapter_name=first.name)
            for adapter in adapters[1:]:
                model.load_adapter(str(adapter.path), adapter_name=adapter.name)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise VeraExportError(
            f"base model {base_path} does not match the adapters: {str(exc).splitlines()[0]}"
        ) from None
    for adapter in adapters:
        _check_loaded(model, adapter, base_path)
    model.set_adapter(first.name)
    return PeftModels(model.eval(), tuple(adapters), tuple(notes))


def transformers_input_specs(model: nn.Module) -> list[str]:
    """input_ids and attention_mask with symbolic batch and sequence, sized to the vocabulary."""
    vocab = model.config.vocab_size
    return [f"input_ids:int64<{vocab}:batch=2,sequence=8", "attention_mask:int64<2:batch=2,sequence=8"]


@dataclasses.dataclass(frozen=True)
class PeftExportResult:
    export: ExportResult
    task_files: tuple[Path, ...]  # every task's native file, the exported one first
    notes: tuple[str, ...]


def export_peft(
    adapters: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    progress: Callable[[str], None] = lambda message: None,
    **options,
) -> PeftExportResult:
    """Export PEFT VeRA adapter folders over one base model: one graph, one task file per adapter.

    ``adapters`` maps task names to ``save_pretrained`` folders; the first is the graph's
    default task. ``options`` go to :func:`export` (opset, verify, tolerance, inputs).
    """
    read = [read_adapter(name, path) for name, path in adapters.items()]
    for adapter in read:
        check_task_name(adapter.name)
    progress(f"Loading the base model and {len(read)} adapter(s) ...")
    loaded = load_peft_models(read, base)
    options.setdefault("inputs", transformers_input_specs(loaded.model))
    result = export(loaded.model, out, task_name=read[0].name, progress=progress, **options)
    task_files = [result.task_path]
    for adapter in read[1:]:
        loaded.model.set_adapter(adapter.name)
        task_files.append(add_task(loaded.model, out, adapter.name)[0])
    loaded.model.set_adapter(read[0].name)
    return PeftExportResult(result, tuple(task_files), loaded.notes)

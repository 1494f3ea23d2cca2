"""PEFT ``save_pretrained`` folders in: a transformers base model with one or more VeRA adapters.

Every check that can fail runs before anything is exported: adapters that cannot share one graph
(seed, r, layers, heads, stored A/B) and a base model whose class cannot reproduce the adapters'
saved keys are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vera_runtime.files import read_labels

from ._errors import VeraExportError
from ._export import ExportResult, add_task, export, read_contract, stage_task
from ._genai import stage_genai_files, stage_tokenizer_files
from ._hf_inputs import default_input_specs
from ._kv_cache import CachedCausalLM
from ._labels import stage_labels, task_labels
from ._peft_adapters import Adapter, check_compatible, projection_notes, read_all, resolve_base
from ._peft_class import BaseClass, choose_class
from ._staging import Staging


@dataclasses.dataclass(frozen=True)
class PeftModels:
    """A PeftModel holding every adapter (the first one active), and what the user should know."""

    model: nn.Module
    adapters: tuple[Adapter, ...]
    notes: tuple[str, ...]


def load_base(path: Path, chosen: BaseClass) -> nn.Module:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "newly initialized" heads are expected: the adapter brings them
    try:
        model = chosen.model_class.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, attn_implementation="eager", **chosen.overrides,
        )
    except Exception as exc:  # transformers raises many types for a bad folder
        raise VeraExportError(f"cannot load the base model from {path}: {str(exc).splitlines()[0]}") from exc
    model.config.use_cache = False  # graphs have no KV cache yet: logits only
    return model.eval()


def _same(param: torch.Tensor, array: np.ndarray) -> bool:
    return tuple(param.shape) == array.shape and np.array_equal(param.detach().numpy().astype(array.dtype), array)


def _check_loaded(model: nn.Module, adapter: Adapter, base: Path) -> None:
    """Every λ in the adapter file must have landed in a layer of the same shape."""
    params = dict(model.named_parameters())
    for key in sorted(adapter.lambda_keys):
        array = adapter.tensors[key]
        param = params.get(f"{key}.{adapter.name}")
        if param is None or not _same(param, array):
            raise VeraExportError(
                f"base model {base} does not match adapter {adapter.path}: its layer for '{key}' is"
                f" {'missing' if param is None else list(param.shape)}, the adapter has {list(array.shape)}."
                " Give the base model the adapter was trained on."
            )


def load_peft_models(
    adapters: list[Adapter], base: str | os.PathLike | None, model_class: str | None = None
) -> PeftModels:
    """Load the base model and every adapter into one PeftModel; the first adapter is active."""
    from peft import PeftModel

    check_compatible(adapters)
    base_path = resolve_base(base, adapters[0])
    model = load_base(base_path, choose_class(adapters[0], base_path, model_class))
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
        ) from exc
    for adapter in adapters:
        _check_loaded(model, adapter, base_path)
    model.set_adapter(first.name)
    return PeftModels(model.eval(), tuple(adapters), tuple(projection_notes(adapters)))


class PeftRoot(nn.Module):
    """What the exporter traces: module names as PEFT saves them (``base_model.model.…``), and the
    forward of the transformers model itself, VeRA layers included. PEFT's task wrappers add nothing
    at inference for VeRA, and some break a family (Whisper under SEQ_2_SEQ_LM passes ``input_ids``)."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.base_model = peft_model.base_model
        self.peft_config = peft_model.peft_config
        self.config = peft_model.base_model.model.config

    def forward(self, **inputs):
        return self.base_model.model(**inputs)


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
    model_class: str | None = None,
    kv_cache: bool = False,
    progress: Callable[[str], None] = lambda message: None,
    **options,
) -> PeftExportResult:
    """Export PEFT VeRA adapter folders over one base model: one graph, one task file per adapter.

    ``adapters`` maps task names to ``save_pretrained`` folders; the first is the graph's
    default task. The base model's class comes from the adapter (see ``choose_class``) unless
    ``model_class`` names one. ``options`` go to :func:`export` (inputs, opset, verify, tolerance);
    without ``inputs``, the model's main input decides (token ids, pixels, audio; decoder ids).
    ``kv_cache`` (causal LMs): the graph takes and returns the KV cache, for generation, and
    ``genai_config.json`` plus the base folder's tokenizer files are written beside it.
    """
    read = read_all(adapters)
    progress(f"Loading the base model and {len(read)} adapter(s) ...")
    loaded = load_peft_models(read, base, model_class)
    root: nn.Module = PeftRoot(loaded.model)
    if kv_cache:
        root = CachedCausalLM(root)  # here, not in export(): the genai files below need its layout
    elif not options.get("inputs"):
        options["inputs"] = default_input_specs(loaded.model.get_base_model())
    reads = (*(adapter.path for adapter in read), resolve_base(base, read[0]))  # never replaced by an output
    with Staging(out, replaces_set=True, inputs=reads) as staging:  # the graph and every task, as one set
        result = export(root, out, task_name=read[0].name, kv_cache=kv_cache, progress=progress, staging=staging,
                        **options)
        if kv_cache:
            stage_genai_files(root, Path(out), resolve_base(base, read[0]), result.contract, staging)
        else:  # a page or client needs them to turn text into ids and logits into names
            stage_tokenizer_files(Path(out), resolve_base(base, read[0]), staging)
        _stage_labels(Path(out), read, loaded.model, result.contract, staging)
        task_files = [result.task_path]
        for adapter in read[1:]:
            loaded.model.set_adapter(adapter.name)
            # the same base weights for every adapter: the digest computed by export() stands
            contract = result.contract
            task_files.append(stage_task(root, Path(out), contract, staging, adapter.name, contract.base_digest)[0])
        loaded.model.set_adapter(read[0].name)
        staging.publish()
    return PeftExportResult(result, tuple(task_files), loaded.notes)


def _stage_labels(graph: Path, adapters: list[Adapter], model: nn.Module, contract, staging: Staging) -> None:
    """Every task's label names, for a graph with per-task heads (a classifier)."""
    config = model.get_base_model().config
    labels = {adapter.name: task_labels(adapter.path, config, contract) for adapter in adapters}
    if contract.heads:
        stage_labels(graph, labels, staging)


def add_peft_task(
    adapter_dir: str | os.PathLike,
    graph: str | os.PathLike,
    task_name: str,
    *,
    base: str | os.PathLike | None = None,
    model_class: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write a PEFT adapter folder as another task of an exported graph (same base, A/B and layers).

    Returns the task file and the ``.onnx_adapter`` paths.
    """
    read_contract(graph)  # a missing or foreign graph fails before the model loads
    read = read_all({task_name: adapter_dir})
    loaded = load_peft_models(read, base, model_class)
    reads = (Path(adapter_dir), resolve_base(base, read[0]))

    def add_labels(stage: Staging, contract, name: str) -> None:  # beside the labels of the graph's other tasks
        if contract.heads:
            labels = {**read_labels(graph), name: task_labels(read[0].path, loaded.model.get_base_model().config,
                                                              contract)}
            stage_labels(Path(graph), labels, stage)

    return add_task(PeftRoot(loaded.model), graph, task_name, overwrite=overwrite, reads=reads, also=add_labels)

"""Where a LoRA export's VeRA model comes from: a PEFT VeRA folder, a task file of one of our graphs (made
back into a PEFT VeRA folder over the base it was exported from), or a vera-export checkpoint."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vera_runtime import ADAPTER_SUFFIX, TASK_SUFFIX
from vera_runtime.files import load_any_task

from ._errors import VeraExportError
from ._inputs import InputSpec, parse_specs
from ._layer import VeraLinear
from ._peft_adapters import CONFIG, PREFIX, PROJECTIONS, WEIGHTS, read_adapter

_BIAS = {"none": "none", "all": "all", "vera_only": "lora_only"}  # PEFT's bias modes, VeRA's -> LoRA's


@dataclasses.dataclass
class Source:
    """A VeRA model ready to compare: its forward, its inputs, the config fields its LoRA carries over,
    and ``unload()``, which gives the bare base model (without the VeRA layers) for the LoRA; the VeRA model
    may be gone after it."""

    model: nn.Module  # what find_vera_layers reads: names from the root PEFT saves under
    forward: Callable[..., object]
    specs: list[InputSpec]
    fields: dict  # LoraConfig fields
    carried: dict[str, torch.Tensor]  # tensors PEFT saved beside λ (heads, trained biases): same keys in LoRA
    unload: Callable[[], nn.Module]
    prefix: str  # what the LoRA keys add in front of a layer's name ("" when it already is PEFT's)


def load(source: Path, graph, base, model_class: str | None, trust_pickle: bool):
    """The VeRA model that ``source`` holds, as a :class:`Source`."""
    if source.is_dir():
        if graph is not None:
            raise VeraExportError(f"{source} is a PEFT adapter folder: --graph applies to task files; drop it.")
        return from_peft_folder(source, base, model_class)
    if graph is not None or source.name.endswith((TASK_SUFFIX, ADAPTER_SUFFIX)):
        if graph is None:
            raise VeraExportError(f"{source} is a task file: give the graph it belongs to with --graph m.onnx.")
        return from_task_file(source, Path(graph), base, model_class)
    if base is not None or model_class is not None:
        raise VeraExportError(f"{source} is a checkpoint: --base and --model-class apply to PEFT folders; drop them.")
    return from_checkpoint(source, trust_pickle)


def from_peft_folder(folder: Path, base, model_class: str | None, name: str = "default"):
    """A PEFT VeRA folder over its base: the LoRA keeps its config (targets, heads, bias, fan_in_fan_out)."""
    from ._hf_inputs import default_input_specs
    from ._peft import load_base, load_peft_models
    from ._peft_adapters import resolve_base
    from ._peft_class import choose_class

    adapter = read_adapter(name, folder)
    peft_model = load_peft_models([adapter], base, model_class).model
    base_path = resolve_base(base, adapter)
    vera = peft_model.peft_config[name]  # as PEFT applied it (e.g. fan_in_fan_out set for Conv1D)
    if vera.bias not in _BIAS:
        raise VeraExportError(f"{folder}/{CONFIG} has bias={vera.bias!r}: expected one of {', '.join(_BIAS)}.")
    fields = {
        "target_modules": vera.target_modules, "modules_to_save": _once(vera.modules_to_save),
        "layers_to_transform": vera.layers_to_transform, "layers_pattern": vera.layers_pattern,
        "fan_in_fan_out": vera.fan_in_fan_out, "bias": _BIAS[vera.bias], "lora_dropout": vera.vera_dropout,
        "task_type": vera.task_type, "revision": vera.revision,
        "base_model_name_or_path": vera.base_model_name_or_path or str(base_path),
    }
    chosen = choose_class(adapter, base_path, model_class)  # now: a task file's folder is gone by unload()

    def fresh_base() -> nn.Module:  # PEFT's own unload() fails on some heads (RoBERTa's): load the base again
        return load_base(base_path, chosen)

    carried = {key: torch.from_numpy(np.array(adapter.tensors[key])) for key in adapter.head_keys | adapter.bias_keys}
    specs = parse_specs(default_input_specs(peft_model.get_base_model()))
    return Source(model=peft_model, forward=peft_model.base_model.model, specs=specs, fields=fields,
                   carried=carried, unload=fresh_base, prefix="")


def _once(names):
    """PEFT's task types add their heads to modules_to_save each time a config is applied: list each once."""
    return list(dict.fromkeys(names)) if names else names


def from_task_file(path: Path, graph: Path, base, model_class: str | None):
    """A task of a graph exported from a PEFT folder, as the PEFT VeRA folder it came from (A and B stored,
    from the graph), over ``base``; the result must have the graph's fingerprint: the same base weights,
    A, B, layers and heads."""
    from ._graphfile import read_contract

    contract = read_contract(graph)
    if base is None:
        raise VeraExportError("a task file needs the base model it was trained over: give its folder with --base.")
    foreign = [layer.name for layer in contract.layers if not layer.name.startswith(PREFIX)]
    if foreign:
        raise VeraExportError(
            f"{graph} was not exported from a PEFT folder (layer '{foreign[0]}'): export the LoRA from the"
            " checkpoint the graph came from instead."
        )
    task = load_any_task(path, contract)
    with tempfile.TemporaryDirectory(prefix="vera-lora-") as folder:
        _write_vera_folder(Path(folder), task, contract, graph, base)
        try:
            source = from_peft_folder(Path(folder), base, model_class)
        except VeraExportError as exc:  # it names the scratch folder: name the user's files instead
            raise VeraExportError(
                f"the base model {base} does not fit {graph}, which {path.name} is a task of ({exc}). Give the base"
                " model folder the graph was exported from."
            ) from exc
        _check_fingerprint(source.model, contract, graph, path)
    source.fields["base_model_name_or_path"] = str(base)
    return source


def _write_vera_folder(folder: Path, task, contract, graph: Path, base) -> None:
    from safetensors.numpy import save_file

    config = {
        "peft_type": "VERA", "r": contract.r, "projection_prng_key": contract.seed or 0, "save_projection": True,
        "target_modules": [layer.name.removeprefix(PREFIX) for layer in contract.layers],
        "modules_to_save": [head.name.removeprefix(PREFIX) for head in contract.heads] or None,
        "base_model_name_or_path": str(base), "bias": "none", "vera_dropout": 0.0, "d_initial": 0.1,
    }
    (folder / CONFIG).write_text(json.dumps(config))
    tensors = {name: np.ascontiguousarray(array) for name, array in task.tensors.items()}
    tensors.update(zip(PROJECTIONS, _projections(graph), strict=True))
    save_file(tensors, str(folder / WEIGHTS))


def _projections(graph: Path) -> tuple[np.ndarray, np.ndarray]:
    """vera_A and vera_B from the graph's initializers (external data read for those two only)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(graph), load_external_data=False)
    found = {t.name: t for t in proto.graph.initializer if t.name in ("vera_A", "vera_B")}
    if len(found) != 2:
        raise VeraExportError(f"{graph} has no vera_A/vera_B initializers: give a graph written by vera-export.")
    return tuple(numpy_helper.to_array(found[name], base_dir=str(graph.parent)) for name in ("vera_A", "vera_B"))


def _check_fingerprint(peft_model: nn.Module, contract, graph: Path, path: Path) -> None:
    from ._digest import base_digest
    from ._discover import find_vera_layers
    from ._export import _contract
    from ._peft import PeftRoot

    root = PeftRoot(peft_model)
    mine = _contract(find_vera_layers(root), root, base_digest(root) if contract.base_digest else None)
    if mine.fingerprint != contract.fingerprint:
        raise VeraExportError(
            f"the base model given with --base is not the one {graph} was exported from (fingerprint"
            f" {mine.fingerprint[:12]}, the graph's {contract.fingerprint[:12]}): a task of {path.name} only"
            " fits that base. Give the base model folder the graph was exported from."
        )


def from_checkpoint(path: Path, trust_pickle: bool):
    """A model with this project's VeRA layers: its LoRA targets exactly those layers, by full path."""
    from ._checkpoint import load_model
    from ._export import model_input_specs

    model = load_model(path, trust_pickle=trust_pickle).model.float()
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, VeraLinear)]
    if not layers:
        raise VeraExportError(
            f"{path} holds no vera-export VeRA layer (VeraLinear): for a PEFT model, save it with"
            " save_pretrained and give that folder."
        )
    fields = {"target_modules": [name for name, _ in layers], "bias": "none", "lora_dropout": 0.0}

    def unload() -> nn.Module:
        for name, module in layers:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.base_layer)
        return model

    return Source(model=model, forward=model, specs=model_input_specs(model, None), fields=fields, carried={},
                   unload=unload, prefix=PREFIX)


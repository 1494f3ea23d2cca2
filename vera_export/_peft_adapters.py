"""PEFT ``save_pretrained`` folders: read them, sort their keys, and refuse adapters that cannot share a graph.

Adapters are compared by what they saved, not by how their configs spell it: two adapters that
adapt the same layers and train the same heads share a graph whatever their ``task_type``,
``target_modules`` or (duplicated) ``modules_to_save`` lists say.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from vera_runtime.files import read_adapter_config
from vera_runtime.layout import check_task_name

from ._errors import VeraExportError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # every PEFT model type saves its base model's paths under it
PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")
_SHARED = ("projection_prng_key", "r")


@dataclasses.dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    config: dict
    tensors: dict[str, np.ndarray]

    @functools.cached_property
    def lambda_keys(self) -> set[str]:
        return {key for key in self.tensors if ".vera_lambda_" in key}

    @functools.cached_property
    def head_keys(self) -> set[str]:
        """Keys of modules PEFT saved whole (modules_to_save): classifier heads and the like."""
        modules = set(self.config.get("modules_to_save") or ())
        return {key for key in self.tensors if key not in self.lambda_keys and _in_modules(key, modules)}

    @functools.cached_property
    def bias_keys(self) -> set[str]:
        """Biases trained with bias='all' or 'vera_only': neither λ, nor A/B, nor a saved head."""
        return set(self.tensors) - self.lambda_keys - self.head_keys - set(PROJECTIONS)


def _in_modules(key: str, modules: set[str]) -> bool:
    """PEFT's rule: a module is saved whole when its path *ends with* an entry of modules_to_save, as a
    string, so 'classifier' also takes DistilBERT's 'pre_classifier'."""
    parts = key.split(".")[:-1]
    return any(".".join(parts[:i]).endswith(module) for i in range(1, len(parts) + 1) for module in modules)


def _read_config(path: Path) -> dict:
    try:
        return read_adapter_config(path / CONFIG)
    except ValueError as exc:
        raise VeraExportError(str(exc)) from exc


def read_adapter(name: str, path: str | os.PathLike) -> Adapter:
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / CONFIG).is_file():
        raise VeraExportError(f"{path} has no {CONFIG}: give a folder written by PEFT's save_pretrained.")
    config = _read_config(path)
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
        raise VeraExportError(f"{path / WEIGHTS} is not readable (truncated or corrupt?): {exc}") from exc
    adapter = Adapter(name, path, config, tensors)
    if not adapter.lambda_keys:
        raise VeraExportError(f"{path / WEIGHTS} holds no VeRA vectors (vera_lambda_*): re-save the adapter.")
    return adapter


def _module(key: str) -> str:
    return key.rpartition(".")[0].removeprefix(PREFIX)


def _refuse(first: Adapter, other: Adapter, what: str) -> None:
    raise VeraExportError(
        f"adapters '{first.name}' and '{other.name}' cannot share one graph: {what}. Export them as separate graphs."
    )


def _check_same_keys(first: Adapter, other: Adapter, mine: set[str], theirs: set[str], what: str) -> None:
    if mine != theirs:
        key, owner = min((k, first.name) for k in mine - theirs) if mine - theirs else (min(theirs - mine), other.name)
        _refuse(first, other, f"they {what} ('{_module(key)}' only in '{owner}')")


def check_compatible(adapters: list[Adapter]) -> None:
    """Refuse adapters that cannot share one graph: other seed, r, layers, heads, A/B or trained biases."""
    first = adapters[0]
    for other in adapters[1:]:
        for key in _SHARED:
            mine, theirs = first.config.get(key), other.config.get(key)
            if mine != theirs:
                _refuse(first, other, f"{key} differs ({mine!r} vs {theirs!r})")
        _check_same_keys(first, other, first.lambda_keys, other.lambda_keys, "adapt different layers")
        _check_same_keys(first, other, first.head_keys, other.head_keys, "train different heads (modules_to_save)")
        for key in sorted(first.head_keys):
            if first.tensors[key].shape != other.tensors[key].shape:
                _refuse(first, other, f"head '{key}' is {list(first.tensors[key].shape)} vs"
                                      f" {list(other.tensors[key].shape)}")
        for key in PROJECTIONS:
            both = key in first.tensors and key in other.tensors
            if both and not np.array_equal(first.tensors[key], other.tensors[key]):
                _refuse(first, other, f"they store different {key.split('.')[-1]} (same seed, other layers targeted?)")
        _check_trained_biases(first, other)


def _check_trained_biases(first: Adapter, other: Adapter) -> None:
    """Trained biases become base weights of the graph: every adapter must agree on them."""
    for key in sorted(first.bias_keys | other.bias_keys):
        if key not in first.tensors or key not in other.tensors or not np.array_equal(first.tensors[key],
                                                                                      other.tensors[key]):
            raise VeraExportError(
                f"adapters '{first.name}' and '{other.name}' train different biases ('{key}',"
                f" bias={other.config.get('bias')!r}): biases are base weights of the graph, not task"
                " inputs. Export these adapters as separate graphs, or train with bias='none'."
            )


def projection_notes(adapters: list[Adapter]) -> list[str]:
    """What the user should know about where the graph's A and B come from."""
    from ._projection import make_projections

    notes = []
    for adapter in adapters:
        seed = adapter.config.get("projection_prng_key")
        if not any(key in adapter.tensors for key in PROJECTIONS):
            notes.append(f"adapter '{adapter.name}' stores no A/B: regenerated from projection_prng_key={seed}.")
        elif all(key in adapter.tensors for key in PROJECTIONS):
            vera_a, vera_b = (adapter.tensors[key] for key in PROJECTIONS)
            recipe_a, recipe_b = make_projections(vera_a.shape[0], vera_a.shape[1], vera_b.shape[0], seed)
            if not (np.array_equal(recipe_a.numpy(), vera_a) and np.array_equal(recipe_b.numpy(), vera_b)):
                notes.append(
                    f"adapter '{adapter.name}' stores A/B that differ from projection_prng_key={seed}'s"
                    " recipe: the graph uses the stored ones."
                )
    return notes


def read_all(adapters: dict[str, str | os.PathLike]) -> list[Adapter]:
    read = [read_adapter(check_task_name(name), path) for name, path in adapters.items()]
    if not read:
        raise VeraExportError("no adapter folder given.")
    return read


def resolve_base(base: str | os.PathLike | None, adapter: Adapter) -> Path:
    if base is not None:
        path = Path(base)
    else:
        named = adapter.config.get("base_model_name_or_path")
        if not named or not Path(named).is_dir():
            raise VeraExportError(
                f"{adapter.path}/{CONFIG} names base model {named!r}, which is not a local folder:"
                " pass the base model's folder with --base."
            )
        path = Path(named)
    if not path.is_dir():
        raise VeraExportError(f"base model folder {path} does not exist: give the folder with --base.")
    if not (path / "config.json").is_file():
        raise VeraExportError(f"base model folder {path} has no config.json: give a transformers model folder.")
    return path

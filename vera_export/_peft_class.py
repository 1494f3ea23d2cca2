"""Which transformers class to load a PEFT adapter's base model as.

Users often save adapters without ``task_type``; PEFT then records the model class in the adapter's
``auto_mapping``, and the base folder's ``config.json`` lists its ``architectures``. Each candidate is
built on the meta device (no weights, no memory) and wrapped by PEFT with the adapter's own config:
the first whose PEFT state dict has exactly the adapter's saved keys and shapes is the one to load.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import torch
from torch import nn

from ._errors import VeraExportError
from ._peft_adapters import PROJECTIONS, Adapter

TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    class_name: str
    source: str  # why it was tried: "task_type SEQ_CLS", "auto_mapping", ...


@dataclasses.dataclass(frozen=True)
class BaseClass:
    """The class that reproduces the adapter's keys, and the config changes it needs (num_labels)."""

    model_class: type
    overrides: dict


def candidates(adapter: Adapter, config, model_class: str | None = None) -> list[Candidate]:
    """--model-class alone when given; else task_type, auto_mapping, config.json architectures, AutoModel."""
    if model_class:
        return [Candidate(model_class, "--model-class")]
    found = []
    task_type = adapter.config.get("task_type")
    if task_type in TASK_CLASSES:
        found.append(Candidate(TASK_CLASSES[task_type], f"task_type {task_type}"))
    mapping = adapter.config.get("auto_mapping")
    if isinstance(mapping, dict) and str(mapping.get("parent_library") or "transformers").startswith("transformers"):
        if isinstance(mapping.get("base_model_class"), str):
            found.append(Candidate(mapping["base_model_class"], "auto_mapping"))
    found += [Candidate(name, "config.json architectures") for name in getattr(config, "architectures", None) or ()]
    found.append(Candidate("AutoModel", "fallback"))
    return found


def _meta_model(model_class: type, config) -> nn.Module:
    with torch.device("meta"):
        if model_class.__name__.startswith("AutoModel"):
            return model_class.from_config(config)
        return model_class._from_config(config)


def _peft_keys(model: nn.Module, adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """The keys and shapes PEFT would save for this adapter's config over ``model``."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict

    peft_config = PeftConfig.from_pretrained(str(adapter.path))
    with torch.device("meta"):
        state = get_peft_model_state_dict(get_peft_model(model, peft_config))
    return {key: tuple(value.shape) for key, value in state.items() if key not in PROJECTIONS}


def _mismatch(expected: dict[str, tuple], adapter: Adapter) -> tuple[str, str] | None:
    """The first saved key the model does not reproduce, with the reason; None when all match."""
    saved = {key: value.shape for key, value in adapter.tensors.items() if key not in PROJECTIONS}
    for key in sorted(saved.keys() | expected.keys()):
        if key not in expected:
            return key, f"'{key}' has no such layer"
        if key not in saved:
            return key, f"'{key}' would be adapted but is not in the adapter"
        if expected[key] != saved[key]:
            return key, f"'{key}' is {list(expected[key])}, the adapter has {list(saved[key])}"
    return None


def _head_size(adapter: Adapter, expected: dict[str, tuple], config) -> dict:
    """A classification head saved with other num_labels than the base config says: take the head's."""
    for key in sorted(adapter.head_keys):
        saved, built = adapter.tensors[key].shape, expected.get(key)
        if key.endswith(".weight") and len(saved) == 2 and built and built[1:] == saved[1:] and built != saved:
            return {"num_labels": saved[0]} if hasattr(config, "num_labels") else {}
    return {}


def _expected_keys(model_class: type, config, adapter: Adapter) -> dict[str, tuple[int, ...]] | str:
    """The keys PEFT would save over ``model_class``, or why it cannot be built from this config."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _peft_keys(_meta_model(model_class, config), adapter)
    except Exception as exc:  # transformers and PEFT raise many types for a class that does not fit
        return f"cannot be built from this config ({(str(exc).splitlines() or [type(exc).__name__])[0]})"


def _try(model_class: type, config, adapter: Adapter) -> tuple[dict | None, str]:
    """(config overrides, "") when ``model_class`` reproduces the adapter's keys, else (None, why not)."""
    overrides: dict = {}
    while True:
        changed = copy.deepcopy(config)
        for name, value in overrides.items():
            setattr(changed, name, value)
        expected = _expected_keys(model_class, changed, adapter)
        if isinstance(expected, str):
            return None, expected
        mismatch = _mismatch(expected, adapter)
        if mismatch is None:
            return overrides, ""
        more = _head_size(adapter, expected, changed)
        if not more or overrides:  # one more try, with the head's num_labels
            return None, mismatch[1]
        overrides = more


def choose_class(adapter: Adapter, base: Path, model_class: str | None = None) -> BaseClass:
    """The first candidate class whose PEFT keys are exactly the adapter's; else an error naming each one tried."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(base), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad folder
        raise VeraExportError(f"cannot read {base / 'config.json'}: {str(exc).splitlines()[0]}") from exc
    tried = {}
    for candidate in candidates(adapter, config, model_class):
        resolved = getattr(transformers, candidate.class_name, None)
        if not isinstance(resolved, type):
            why = "not a transformers class"
            tried.setdefault(candidate.class_name, f"{candidate.class_name} ({candidate.source}): {why}")
            continue
        overrides, why = _try(resolved, config, adapter)
        if overrides is not None:
            return BaseClass(resolved, overrides)
        tried.setdefault(candidate.class_name, f"{candidate.class_name} ({candidate.source}): {why}")
    raise VeraExportError(
        f"base model {base} does not match adapter {adapter.path}: no class reproduces its saved keys. Tried "
        + "; ".join(tried.values())
        + ". Give the base model the adapter was trained on, or its class with --model-class NAME."
    )

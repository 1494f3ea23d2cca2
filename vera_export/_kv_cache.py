"""Causal LMs with a KV cache: one graph for prefill and decode steps, in the layout that
onnxruntime-genai and Optimum use (``past_key_values.{i}.key`` in, ``present.{i}.key`` out).

The cache tensors are plain graph inputs and outputs. In PyTorch they become a transformers
``DynamicCache`` around the model's own forward (or go to this project's decoder's
``forward_cached``), so the traced graph is the model's own attention code: rotary positions,
grouped KV heads and masks included.
"""

from __future__ import annotations

import inspect

import onnx_ir as ir
import torch
from torch import nn

from vera_runtime.layout import CacheLayout

from ._errors import VeraExportError
from ._inputs import Dim, InputSpec

TOTAL = "total_sequence"  # past_sequence + sequence: the attention mask's length and the present's
_EXAMPLE = {"batch": 2, "sequence": 3, "past_sequence": 5}  # distinct sizes, all >= 2 (see Dim)
_SMALLEST_PAST = 4  # the least past length distinct from batch and sequence


def _language_model(model: nn.Module) -> nn.Module:
    """The transformers causal LM under PEFT's wrappers (``PeftRoot``) or the model itself."""
    inner = getattr(getattr(model, "base_model", None), "model", model)
    config = getattr(inner, "config", None)
    name = type(inner).__name__
    if config is None or getattr(config, "is_encoder_decoder", False) or not name.endswith("ForCausalLM") and not (
        name.endswith("LMHeadModel")
    ):
        raise VeraExportError(
            f"--kv-cache needs a causal LM (a transformers …ForCausalLM or …LMHeadModel, or this project's"
            f" tiny-decoder); this model is a {name}. Export it without --kv-cache, or load a PEFT base with"
            " --model-class …ForCausalLM."
        )
    return inner


def _run_cached(inner: nn.Module, cache, **inputs):
    """``inner``'s forward with ``cache``; returns (output, the cache's layers). transformers 5.x
    renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)."""
    if not hasattr(cache, "layers"):
        raise VeraExportError(
            f"--kv-cache needs transformers 5 (its DynamicCache keeps .layers); this is {_transformers_version()}:"
            " pip install 'transformers>=5'."
        )
    name = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    out = inner(**inputs, **{name: cache}, use_cache=True)
    returned = out.cache if name == "cache" else out.past_key_values
    return out, returned.layers


def _transformers_version() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def _step_function(model: nn.Module):
    """``(input_ids, attention_mask, position_ids, past pairs or None) -> (logits, [(keys, values)])``:
    the model's own ``forward_cached`` (this project's decoder), else transformers' forward with a
    ``DynamicCache`` built from the pairs."""
    if hasattr(model, "forward_cached"):
        return model.forward_cached
    from transformers.cache_utils import DynamicCache

    inner = _language_model(model)

    def step(input_ids, attention_mask, position_ids, pairs):
        cache = DynamicCache(ddp_cache_data=pairs, config=inner.config) if pairs else DynamicCache(config=inner.config)
        out, layers = _run_cached(inner, cache, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids)
        return out.logits, [(layer.keys, layer.values) for layer in layers]

    return step


def probe_layout(model: nn.Module) -> CacheLayout:
    """The cache layout the model really builds: one token through it, with an empty cache."""
    one = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        _, present = _step_function(model)(one, torch.ones_like(one), one, None)
    shapes = {tuple(tensor.shape) for pair in present for tensor in pair}
    if len(shapes) != 1:
        raise VeraExportError(
            f"{type(model).__name__} keeps caches of different shapes per layer ({sorted(shapes)}): --kv-cache"
            " supports models with one key/value shape for every layer."
        )
    _, kv_heads, _, head_dim = shapes.pop()
    return CacheLayout.of_layers(len(present), kv_heads, head_dim)


def _sliding_window(model: nn.Module) -> int | None:
    """The smallest sliding window among transformers' cache layers (Mistral: 4096), else None.

    Up to the window, sliding attention sees every key, so the graph equals full attention; past it,
    transformers crops its cache, which this layout does not, so the graph is bounded there."""
    if hasattr(model, "forward_cached"):
        return None
    from transformers.cache_utils import DynamicCache

    inner = _language_model(model)
    windows = [layer.sliding_window for layer in DynamicCache(config=inner.config).layers
               if getattr(layer, "is_sliding", False)]
    return min(windows) if windows else None


def _example_past(window: int | None) -> int:
    """The past length to trace at: within a sliding window's bound (total <= window - 1), or refused."""
    room = _EXAMPLE["past_sequence"] if window is None else min(_EXAMPLE["past_sequence"],
                                                                 window - 1 - _EXAMPLE["sequence"])
    if room < _SMALLEST_PAST:
        raise VeraExportError(
            f"the model's sliding window is {window} tokens: too small to trace a KV-cache graph, which needs"
            f" {_EXAMPLE['sequence']} new + {_SMALLEST_PAST} past tokens within it (a window of at least"
            f" {_EXAMPLE['sequence'] + _SMALLEST_PAST + 1}). Export without --kv-cache."
        )
    return room


class CachedCausalLM(nn.Module):
    """A causal LM whose forward takes and returns the cache as named tensors.

    Module names stay those of ``model`` (its children are adopted, not nested), so λ inputs and task
    files are named exactly as without a cache.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layout = probe_layout(model)
        self.window = _sliding_window(model)  # a sliding-window cache: the graph is exact below it
        self.wrapped = [model]  # a list: not registered as a child, whose name would prefix every module
        for name, child in model.named_children():
            self.add_module(name, child)
        self.config = model.config if hasattr(model, "forward_cached") else _language_model(model).config
        self.peft_config = getattr(model, "peft_config", None)

    def vera_input_specs(self) -> list[InputSpec]:
        batch, sequence = Dim("batch", _EXAMPLE["batch"]), Dim("sequence", _EXAMPLE["sequence"])
        window = self.window
        traced = _example_past(window)
        past = Dim("past_sequence", traced, high=window - 2 if window else None)
        total = Dim(TOTAL, _EXAMPLE["sequence"] + traced, derived=True,
                    high=window - 1 if window else None)  # transformers' sliding cache keeps window - 1
        vocab = self.config.vocab_size
        cache = (batch, self.layout.kv_heads, past, self.layout.head_dim)
        return [
            InputSpec("input_ids", "int64", (batch, sequence), vocab),
            InputSpec("attention_mask", "int64", (batch, total), 2),
            InputSpec("position_ids", "int64", (batch, sequence), traced),
            *(InputSpec(name, "float32", cache) for name in self.layout.past),
        ]

    def forward(self, input_ids, attention_mask, position_ids, **past) -> dict[str, torch.Tensor]:
        names = self.layout.past
        pairs = [(past[key], past[value]) for key, value in zip(names[::2], names[1::2], strict=True)]
        logits, present = _step_function(self.wrapped[0])(input_ids, attention_mask, position_ids, pairs)
        tensors = [tensor for pair in present for tensor in pair]
        return {"logits": logits, **dict(zip(self.layout.present, tensors, strict=True))}


def name_cache_dims(graph: ir.Model) -> None:
    """Name the total length ``total_sequence`` where torch.export left an expression or a symbol
    (``past_sequence + sequence``, ``s53``): the mask's second axis and each present's third."""
    for value in graph.graph.inputs:
        if value.name == "attention_mask" and value.shape is not None:
            value.shape = ir.Shape([value.shape[0], TOTAL])
    for value in graph.graph.outputs:
        if value.name.startswith("present.") and value.shape is not None:
            dims = list(value.shape)
            value.shape = ir.Shape([*dims[:2], TOTAL, *dims[3:]])

"""The fused export's graphs: the builder's graph of the base model with the VeRA branches grafted on,
and its hot template, each written with the contract in its metadata."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir
from torch import nn

from vera_runtime import Contract
from vera_runtime.files import template_digest
from vera_runtime.layout import CacheLayout, hot_template_path

from . import _passes
from ._builder import BUILDER_VERSION
from ._digest import base_digest
from ._export import _contract, _save
from ._graft import find_targets, graft, name_dims, set_contract
from ._merge_template import ProjectionWeights, projection_weights, write_merge_template


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def cache_layout(config) -> CacheLayout:
    """The builder's cache: the KV-cache names, and no position ids."""
    layout = CacheLayout.of_layers(config.num_hidden_layers, kv_heads(config), head_dim(config))
    return dataclasses.replace(layout, position_ids=False)


def _widths(config) -> dict[str, int]:
    """Output columns of each projection the builder may pack: q, k, v, gate, up."""
    q, kv, inner = (config.num_attention_heads * head_dim(config), kv_heads(config) * head_dim(config),
                    config.intermediate_size)
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": inner, "up_proj": inner}


@dataclasses.dataclass(frozen=True)
class FromTorch:
    """What the fused graphs take from PyTorch, taken while the builder runs, so that the PEFT model is
    released before the builder's graph is loaded: the export never holds both copies of the weights."""

    contract: Contract  # the traced export's: the fused graph's adds the builder's bounds
    config: object  # the model's transformers config
    projections: tuple[np.ndarray, np.ndarray]  # vera_A, vera_B
    weights: ProjectionWeights | None  # for an int4 hot template's merge file


def from_torch(adapted, model: nn.Module, merge_weights: bool) -> FromTorch:
    return FromTorch(_contract(adapted, model, base_digest(model)), model.config,
                     (adapted.vera_a.detach().float().numpy().copy(), adapted.vera_b.detach().float().numpy().copy()),
                     projection_weights(model, adapted) if merge_weights else None)


def fused_contract(source: FromTorch, built: ir.Model, precision: str) -> Contract:
    """The traced export's contract (the same fingerprint: task files fit both graphs), with the builder's
    bounds: token ids below the vocabulary, at most as many positions as its rotary tables hold, and a
    shared cache buffer that holds at least the sliding window of layers with a window-sized cache."""
    config = source.config
    positions = built.graph.initializers.get("cos_cache")
    limit = positions.shape[0] if positions is not None else config.max_position_embeddings
    windows = [node.attributes["local_window_size"].as_int() for node in built.graph
               if node.op_type == "GroupQueryAttention" and "local_window_size" in node.attributes]
    return dataclasses.replace(
        source.contract, input_highs={"input_ids": config.vocab_size},
        dim_limits={"total_sequence": int(limit)}, kv_shared_buffer=max([1, *windows]),
        weight_dtype="int4" if precision == "int4" else "float32",
    )


def write_graphs(built: Path, out: Path, scratch: Path, source: FromTorch, task: dict[str, np.ndarray],
                 precision: str, hot_template: bool) -> Contract:
    """Graft the branches onto the builder's graph at ``built`` and write it to ``scratch`` as ``out.name``
    (the hot template first when asked: the graph records its digest), ``task``'s λ as the defaults.
    Returns the graph's contract."""
    ir_model = ir.load(built)
    contract = fused_contract(source, ir_model, precision)
    label = f"onnxruntime-genai {BUILDER_VERSION} model builder, {precision}, cpu"
    if hot_template:
        template = scratch / hot_template_path(out).name
        _write_template(built, template, source, contract, task, label)
        contract = dataclasses.replace(contract, hot_template_sha256=template_digest(template))
    graft(ir_model, find_targets(ir_model, contract.layers, _widths(source.config)), *source.projections)
    _passes.add_task_defaults(ir_model, task)
    _finish(ir_model, source.config, contract, label)
    ir.save(ir_model, scratch / out.name, external_data=f"{out.name}.data")
    return contract


def _write_template(built: Path, template: Path, source: FromTorch, contract: Contract, task: dict,
                    label: str) -> None:
    """The hot template: float graphs fold ``W + ΔW`` from λ initializers (``graft(hot=True)``); int4 graphs
    keep the builder's graph as it is, with a merge file from which the runtime requantizes a task's merged
    weights (``write_merge_template``). Its weights and replaced tensors live in its ``.data``."""
    hot_model = ir.load(built)
    widths = _widths(source.config)
    targets = find_targets(hot_model, contract.layers, widths)
    if contract.weight_dtype == "int4":
        write_merge_template(hot_model, targets, source.weights, source.projections, contract, task, widths, template)
    else:
        graft(hot_model, targets, *source.projections, hot=True)
        _passes.inline_task(hot_model, task)
    _finish(hot_model, source.config, contract, label)
    _save(hot_model, template.parent, template.name)


def _finish(ir_model: ir.Model, config, contract: Contract, label: str) -> None:
    name_dims(ir_model, head_dim(config))
    set_contract(ir_model, contract, label)

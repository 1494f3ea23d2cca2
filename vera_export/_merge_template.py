"""The int4 fused export's hot template: the builder's own int4 graph, and its merge file — the float32
weights of the adapted MatMulNBits nodes in the builder's layout, ``vera_A``/``vera_B`` and the plan — from
which the runtime makes one task's merged int4 model (``vera_runtime.files.MergePlan``).

Two checks make it exact before anything is written: ONNX Runtime's int4 kernel applied to the weights
taken from PyTorch reproduces the builder's int4 weights bit for bit (the layout and the quantizer are the
builder's), and the plan's merged float32 weights for the exported task equal PEFT's merged weights (each
delta in its place).
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import onnx_ir as ir
import torch
from safetensors.numpy import save_file
from torch import nn

from vera_runtime import Contract
from vera_runtime.files import MergePlan, quantize_int4
from vera_runtime.layout import KEY_MERGE, merge_path

from . import _passes
from ._discover import AdaptedModel
from ._errors import VeraExportError
from ._graft import _PACKED, _PEFT_NAME, Target

_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul(?:_Q4)?$")
_BLOCK = {"attn": "self_attn", "mlp": "mlp"}
_MERGE_TOLERANCE = 1e-5  # float32 rounding of W + ΔW computed in another order than PEFT's


@dataclasses.dataclass(frozen=True)
class ProjectionWeights:
    """The weights ``[out, in]`` of every projection in a block (attention or MLP) with a VeRA layer, by
    (layer, block, projection): the base model's, and with PEFT's delta of the exported task merged in.
    Taken from PyTorch before the PEFT model is released (a packed q|k|v needs k too, adapted or not)."""

    base: dict[tuple[str, str, str], np.ndarray]
    merged: dict[tuple[str, str, str], np.ndarray]


def projection_weights(root: nn.Module, adapted: AdaptedModel) -> ProjectionWeights:
    adapted_modules = {layer.module for layer in adapted.layers}
    blocks = {match.groups()[:2] for layer in adapted.layers if (match := _PEFT_NAME.search(layer.name))}
    base, merged = {}, {}
    with torch.no_grad():
        for name, module in root.named_modules():
            linear, match = getattr(module, "base_layer", module), _PEFT_NAME.search(name)
            if isinstance(linear, nn.Linear) and match and match.groups()[:2] in blocks:
                key = match.groups()
                base[key] = linear.weight.detach().float().numpy().copy()
                merged[key] = (base[key] + module.get_delta_weight(adapted.task_name).float().numpy()
                               if module in adapted_modules else base[key])  # one delta at a time
    return ProjectionWeights(base, merged)


def builder_weight(weights: dict, node_name: str, widths: dict[str, int]) -> np.ndarray:
    """The float32 weight ``[K, N]`` the builder gave a MatMul node: its projection's, its packed parts'
    concatenated (q|k|v, gate|up), or its rows of a projection packed in the model (Phi-3's gate_up)."""
    match = _NODE.match(node_name)
    if match is None:
        raise VeraExportError(f"{node_name} is not a decoder projection of the builder's graph.")
    index, block, projection = match.group(1), _BLOCK[match.group(2)], match.group(3)
    if (index, block, projection) in weights:
        rows = weights[index, block, projection]
    elif projection in _PACKED:
        rows = np.concatenate([weights[index, block, part] for part in _PACKED[projection]])
    else:
        packed, parts = next((p, parts) for p, parts in _PACKED.items() if projection in parts)
        start = sum(widths[part] for part in parts[:parts.index(projection)])
        rows = weights[index, block, packed][start:start + widths[projection]]
    return np.ascontiguousarray(rows.T, dtype=np.float32)


def _plan_entry(node: ir.Node, fp32: str, group: list[Target]) -> dict:
    bits, block = node.attributes["bits"].as_int(), node.attributes["block_size"].as_int()
    if bits != 4 or len([i for i in node.inputs if i is not None]) != 3:
        raise VeraExportError(f"{node.name} is not symmetric int4 (bits {bits}, {len(node.inputs)} inputs): the"
                              " hot template merges only the builder's default int4 quantization.")
    weight, scales = node.inputs[1], node.inputs[2]
    return {"weight": weight.name, "scales": scales.name, "fp32": fp32, "block_size": block,
            "weight_shape": list(weight.shape), "scales_shape": list(scales.shape),
            "parts": [{"lambda_d": t.layer.lambda_d, "lambda_b": t.layer.lambda_b, "in_features": t.layer.in_features,
                       "offset": t.offset, "start": t.start, "stop": t.stop} for t in group]}


def _check_base(node: ir.Node, weight: np.ndarray, block: int) -> None:
    packed, scales = quantize_int4(weight, block)
    built = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy()
    if not (np.array_equal(packed.reshape(built[0].shape), built[0])
            and np.array_equal(scales.reshape(built[1].shape), built[1])):
        raise VeraExportError(
            f"ONNX Runtime's int4 quantization of the model's weights for {node.name} is not the builder's: the"
            " hot template could not rebuild its merged weights. Export without --hot-template, and report the"
            " model family to vera-export.")


def write_merge_template(template: ir.Model, targets: list[Target], weights: ProjectionWeights,
                         projections: tuple[np.ndarray, np.ndarray], contract: Contract, task: dict[str, np.ndarray],
                         widths: dict[str, int], path) -> None:
    """Make ``template`` (the builder's int4 graph) the hot template of ``targets``' nodes and write its merge
    file beside ``path`` (where the template will be saved); ``projections``: ``vera_A``, ``vera_B``. Raises
    VeraExportError if a check fails."""
    by_node: dict[str, list[Target]] = {}
    for target in targets:
        by_node.setdefault(target.node.name, []).append(target)
    plan, tensors, expected = [], {"vera_A": projections[0], "vera_B": projections[1]}, {}
    for node_name, group in by_node.items():
        node, fp32 = group[0].node, f"fp32/{node_name}"
        entry = _plan_entry(node, fp32, group)
        tensors[fp32] = builder_weight(weights.base, node_name, widths)
        _check_base(node, tensors[fp32], entry["block_size"])
        expected[entry["weight"]] = builder_weight(weights.merged, node_name, widths)
        plan.append(entry)
    save_file(tensors, merge_path(path), metadata={KEY_MERGE: json.dumps(plan)})
    _check_merged(MergePlan(merge_path(path), contract), task, expected)
    # the initializers a session replaces, saved in the template's .data with the other weights
    template.metadata_props[_passes.HOT_TEMPLATE_KEY] = json.dumps(
        [name for entry in plan for name in (entry["weight"], entry["scales"])])


def _check_merged(plan: MergePlan, task: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """The plan's float32 ``W + ΔW`` of the exported task against PEFT's merged weights, per node."""
    for name, weight in plan.merged_weights({key: value[None] for key, value in task.items()}).items():
        scale = float(np.abs(expected[name]).max()) or 1.0
        if np.abs(weight - expected[name]).max() > _MERGE_TOLERANCE * scale:
            raise VeraExportError(f"the hot template's merged weight of {name} differs from PEFT's merged weight:"
                                  " nothing was written. Export without --hot-template, and report the model family.")

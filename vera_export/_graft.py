"""Graft VeRA branches onto onnxruntime-genai's model-builder graph of the base model.

The builder's decoder (GroupQueryAttention, fused RMSNorms, one packed q|k|v MatMul per layer, int4
``MatMulNBits`` when asked) is the anchor; each adapted projection gets, beside the builder's node,

    delta = ((x @ A[:, :in]ᵀ) ⊙ Λd) @ B[:out, :]ᵀ ⊙ Λb

added to that node's output — at the projection's offset when the builder packed several projections
into one MatMul. ``x @ Aᵀ`` is computed once per input and width (q, k and v read the same norm output).
λ inputs keep the contract's shape ``[tasks, n]``: unsqueezed to ``[tasks, 1, n]`` they broadcast over
``[batch, sequence, n]``, one task for the batch or one per row.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

from vera_runtime import Contract, LayerSpec

from ._errors import VeraExportError

# PEFT's module path of a decoder projection: (layer index, block, projection)
_PEFT_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_BLOCK = {"self_attn": "attn", "mlp": "mlp"}
# projections the builder packs into one MatMul, in the order of their outputs
_PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one VeRA layer lands: the builder's MatMul and the columns of its output it owns."""

    layer: LayerSpec
    node: ir.Node
    offset: int
    width: int  # the node's output columns


def _matmul(nodes: dict[str, ir.Node], prefix: str) -> ir.Node | None:
    """The builder's node for a projection: ``…/MatMul`` in float, ``…/MatMul_Q4`` (MatMulNBits) in int4."""
    for name in (f"{prefix}/MatMul", f"{prefix}/MatMul_Q4"):
        if name in nodes and nodes[name].op_type in ("MatMul", "MatMulNBits"):
            return nodes[name]
    return None


def _width(node: ir.Node) -> int:
    if node.op_type == "MatMulNBits":
        return node.attributes["N"].as_int()
    return node.inputs[1].shape[-1]


def find_targets(model: ir.Model, layers: tuple[LayerSpec, ...], widths: dict[str, int]) -> list[Target]:
    """The builder node of every layer; ``widths`` gives each projection's output columns
    (``q_proj``: heads × head size, …) for the offsets inside packed MatMuls."""
    nodes = {node.name: node for node in model.graph if node.name}
    targets = []
    for layer in layers:
        match = _PEFT_NAME.search(layer.name)
        if match is None:
            raise _unplaced(layer, "it is not a projection of a decoder layer (layers.N.self_attn/mlp.NAME)")
        index, block, projection = match.groups()
        prefix = f"/model/layers.{index}/{_BLOCK[block]}"
        node, offset = _matmul(nodes, f"{prefix}/{projection}"), 0
        if node is None and projection in _PACKED:
            packed, position = _PACKED[projection]
            group = [name for name, (p, _) in _PACKED.items() if p == packed]
            node = _matmul(nodes, f"{prefix}/{packed}")
            offset = sum(widths[name] for name in group[:position])
        if node is None:
            raise _unplaced(layer, f"the builder's graph has no MatMul for it under {prefix}/")
        width = _width(node)
        if offset + layer.out_features > width or node.inputs[0] is None:
            raise _unplaced(layer, f"its {layer.out_features} outputs do not fit {node.name} ({width} columns)")
        targets.append(Target(layer, node, offset, width))
    return targets


def _unplaced(layer: LayerSpec, why: str) -> VeraExportError:
    return VeraExportError(
        f"VeRA layer '{layer.name}' cannot be grafted onto onnxruntime-genai's builder graph: {why}. The fused"
        " export adapts q/k/v/o and gate/up/down projections; export other layers without --fused."
    )


class _Builder:
    """Appends nodes to ``graph`` right after ``anchor``, in call order (so after the builder's MatMul,
    whose input they read, and before its output's readers), named under a prefix."""

    def __init__(self, graph: ir.Graph, prefix: str, anchor: ir.Node) -> None:
        self.graph, self.prefix, self.anchor, self.count = graph, prefix, anchor, 0

    def __call__(self, op: str, *inputs: ir.Value, **attributes) -> ir.Value:
        self.count += 1
        node = ir.node(op, list(inputs), attributes=attributes, name=f"{self.prefix}/{op}_{self.count}")
        node.outputs[0].name = f"{self.prefix}/{op}_{self.count}/output_0"
        self.graph.insert_after(self.anchor, node)
        self.anchor = node
        return node.outputs[0]


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(array, name=name),
                                            shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype))))
    return graph.initializers[name]


def _task_input(graph: ir.Graph, name: str, size: int, default: np.ndarray) -> ir.Value:
    """A λ graph input ``[tasks, size]`` whose default initializer holds the exported task."""
    value = ir.Value(name=name, shape=ir.Shape(["tasks", size]), type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = ir.tensor(np.ascontiguousarray(default, dtype=np.float32)[None], name=name)
    graph.inputs.append(value)
    graph.register_initializer(value)
    return value


def graft(model: ir.Model, targets: list[Target], vera_a: np.ndarray, vera_b: np.ndarray,
          task: dict[str, np.ndarray]) -> None:
    """Add every target's VeRA branch to the builder's graph, in place (see the module docstring)."""
    graph = model.graph
    a = _constant(graph, "vera_A", np.ascontiguousarray(vera_a, dtype=np.float32))
    b = _constant(graph, "vera_B", np.ascontiguousarray(vera_b, dtype=np.float32))
    axis1 = _constant(graph, "vera/axes_1", np.array([1], np.int64))
    zero = _constant(graph, "vera/zero", np.array([0], np.int64))
    shared: dict[tuple[str, int], ir.Value] = {}  # (input, width) -> x @ A[:, :in]ᵀ
    by_node: dict[str, list[Target]] = {}
    for target in targets:
        by_node.setdefault(target.node.name, []).append(target)
    for node_name, group in by_node.items():
        node = group[0].node
        output = node.outputs[0]
        readers = list(output.uses())
        op = _Builder(graph, f"/vera{node_name.rsplit('/', 1)[0]}", node)
        total = output
        for target in group:
            layer = target.layer
            x = node.inputs[0]
            key = (x.name, layer.in_features)
            if key not in shared:
                a_slice = op("Slice", a, zero, _constant(graph, f"vera/end_{layer.in_features}",
                                                         np.array([layer.in_features], np.int64)), axis1)
                shared[key] = op("MatMul", x, op("Transpose", a_slice, perm=[1, 0]))
            lambda_d = _task_input(graph, f"{layer.name}.vera_lambda_d", vera_a.shape[0], task[f"{layer.name}.vera_lambda_d"])
            lambda_b = _task_input(graph, f"{layer.name}.vera_lambda_b", layer.out_features, task[f"{layer.name}.vera_lambda_b"])
            b_slice = op("Slice", b, zero, _constant(graph, f"vera/end_{layer.out_features}",
                                                     np.array([layer.out_features], np.int64)), zero)
            scaled = op("Mul", shared[key], op("Unsqueeze", lambda_d, axis1))
            delta = op("Mul", op("MatMul", scaled, op("Transpose", b_slice, perm=[1, 0])), op("Unsqueeze", lambda_b, axis1))
            if layer.out_features != target.width:  # a slot of a packed output: zeros around it
                pads = np.array([0, 0, target.offset, 0, 0, target.width - target.offset - layer.out_features], np.int64)
                delta = op("Pad", delta, _constant(graph, f"vera/pads_{'_'.join(map(str, pads))}", pads))
            total = op("Add", total, delta)
        for use in readers:
            use.node.replace_input_with(use.idx, total)
        if output.is_graph_output():
            raise VeraExportError(f"{node_name} writes a graph output: a VeRA branch cannot be added after it.")


def set_contract(model: ir.Model, contract: Contract, builder: str) -> None:
    """The contract's metadata, plus which builder made the graph it was grafted onto."""
    model.metadata_props.update(contract.to_metadata())
    model.metadata_props["vera.graph_builder"] = builder


_DIMS = {"batch_size": "batch", "sequence_length": "sequence", "past_sequence_length": "past_sequence",
         "total_sequence_length": "total_sequence"}


def name_dims(model: ir.Model, head_dim: int) -> None:
    """The builder's symbolic dimensions under the contract's names (``batch``, ``sequence``,
    ``past_sequence``, ``total_sequence``), and its symbolic cache width as the head size it is."""
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.shape is not None:
            dims = [head_dim if str(d) == "kv_cache_dim" else _DIMS.get(str(d), d) for d in value.shape]
            value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(str(d)) for d in dims])

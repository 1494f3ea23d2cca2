"""Graft VeRA branches onto onnxruntime-genai's model-builder graph of the base model.

The builder's decoder (GroupQueryAttention, fused RMSNorms, one packed q|k|v MatMul per layer, int4
``MatMulNBits`` when asked) is the anchor; each adapted projection gets, beside the builder's node,

    delta = ((x @ A[:, :in]ᵀ) ⊙ Λd) @ B[:out, :]ᵀ ⊙ Λb

added to that node's output — at the projection's offset when the builder packed several projections
into one MatMul. ``x @ Aᵀ`` is computed once per input and width (q, k and v read the same norm output).
λ inputs keep the contract's shape ``[tasks, n]``: unsqueezed to ``[tasks, 1, n]`` they broadcast over
``[batch, sequence, n]``, one task for the batch or one per row. The float hot template
(``graft(hot=True)``) gives each builder MatMul the weight ``W + Aᵀ · M`` with ``M`` built from λ
initializers, for ONNX Runtime to fold into the merged weight once per task (int4 templates merge in the
runtime: ``_merge_template``).
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
# projections the builder may pack into one MatMul, in the order of their outputs; and the packed ones
# of some families (Phi-3's gate_up_proj) that it may split into their parts
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where columns ``[start, stop)`` of one VeRA layer's output land: the builder's MatMul, at ``offset``
    among its ``width`` output columns."""

    layer: LayerSpec
    node: ir.Node
    offset: int
    start: int
    stop: int
    width: int


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


def _places(nodes: dict[str, ir.Node], prefix: str, projection: str, widths: dict[str, int]):
    """(node, offset in its output, start, stop in the layer's output) for one projection."""
    if node := _matmul(nodes, f"{prefix}/{projection}"):
        return [(node, 0, 0, None)]
    for packed, parts in _PACKED.items():
        if projection in parts and (node := _matmul(nodes, f"{prefix}/{packed}")):  # packed by the builder
            offset = sum(widths[p] for p in parts[:parts.index(projection)])
            return [(node, offset, 0, None)]
    places, start = [], 0
    for part in _PACKED.get(projection, ()):  # packed in the model, split by the builder
        if (node := _matmul(nodes, f"{prefix}/{part}")) is None:
            return []
        places.append((node, 0, start, start + widths[part]))
        start += widths[part]
    return places


def find_targets(model: ir.Model, layers: tuple[LayerSpec, ...], widths: dict[str, int]) -> list[Target]:
    """The builder nodes of every layer; ``widths`` gives each projection's output columns
    (``q_proj``: heads × head size, …) for the offsets inside packed MatMuls."""
    nodes = {node.name: node for node in model.graph if node.name}
    targets = []
    for layer in layers:
        match = _PEFT_NAME.search(layer.name)
        if match is None:
            raise _unplaced(layer, "it is not a projection of a decoder layer (layers.N.self_attn/mlp.NAME)")
        index, block, projection = match.groups()
        prefix = f"/model/layers.{index}/{_BLOCK[block]}"
        places = _places(nodes, prefix, projection, widths)
        if not places:
            raise _unplaced(layer, f"the builder's graph has no MatMul for it under {prefix}/")
        for node, offset, start, stop in places:
            stop = layer.out_features if stop is None else stop
            width = _width(node)
            if offset + stop - start > width or stop > layer.out_features:
                raise _unplaced(layer, f"its {layer.out_features} outputs do not fit {node.name} ({width} columns)")
            targets.append(Target(layer, node, offset, start, stop, width))
    return targets


def _unplaced(layer: LayerSpec, why: str) -> VeraExportError:
    return VeraExportError(
        f"VeRA layer '{layer.name}' cannot be grafted onto onnxruntime-genai's builder graph: {why}. The fused"
        " export adapts q/k/v/o and gate/up/down projections; export other layers without --fused."
    )


class _Nodes:
    """Adds nodes to ``graph`` under a name prefix (``graft`` sorts the graph once at the end)."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix, self.count, self.memo = graph, prefix, 0, {}

    def __call__(self, op: str, *inputs: ir.Value, **attributes) -> ir.Value:
        self.count += 1
        node = ir.node(op, list(inputs), attributes=attributes, name=f"{self.prefix}/{op}_{self.count}")
        node.outputs[0].name = f"{self.prefix}/{op}_{self.count}/output_0"
        self.graph.append(node)
        return node.outputs[0]

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        """An initializer shared by every branch that needs the same value."""
        if name not in self.graph.initializers:
            self.graph.register_initializer(ir.Value(
                name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                type=ir.TensorType(ir.DataType.from_numpy(array.dtype))))
        return self.graph.initializers[name]

    def once(self, key, make) -> ir.Value:
        """``make()``'s value, built the first time ``key`` is asked for."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def ints(self, *values: int) -> ir.Value:
        return self.constant(f"vera/ints_{'_'.join(map(str, values))}", np.array(values, np.int64))


def _task_input(graph: ir.Graph, name: str, size: int) -> ir.Value:
    """A λ graph input ``[tasks, size]``, as in a traced graph (``_passes`` gives it its default, or
    makes it the hot template's initializer)."""
    value = ir.Value(name=name, shape=ir.Shape(["tasks", size]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(value)
    return value


def _a_t(op: _Nodes, width: int) -> ir.Value:
    """``A[:, :width]ᵀ``, one node per width: ONNX Runtime folds it into one constant shared by every
    layer of that width, which stays in cache from layer to layer (one copy per layer did not)."""
    a = op.graph.initializers["vera_A"]
    return op.once(("A", width), lambda: op("Transpose", op("Slice", a, op.ints(0), op.ints(width), op.ints(1)),
                                            perm=[1, 0]))


def _b_t(op: _Nodes, width: int) -> ir.Value:
    """``B[:width, :]ᵀ``, one node per width, as ``_a_t``."""
    b = op.graph.initializers["vera_B"]
    return op.once(("B", width), lambda: op("Transpose", op("Slice", b, op.ints(0), op.ints(width), op.ints(0)),
                                            perm=[1, 0]))


def _lambdas(op: _Nodes, layer: LayerSpec) -> tuple[ir.Value, ir.Value]:
    return (_task_input(op.graph, layer.lambda_d, op.graph.initializers["vera_A"].shape[0]),
            _task_input(op.graph, layer.lambda_b, layer.out_features))


def _delta(op: _Nodes, layer: LayerSpec, x: ir.Value) -> ir.Value:
    """``((x @ A[:, :in]ᵀ) ⊙ Λd) @ B[:out, :]ᵀ ⊙ Λb`` for one layer, λ as task inputs; ``x @ Aᵀ`` is shared by
    the layers that read ``x``."""
    xa = op.once((x.name, layer.in_features), lambda: op("MatMul", x, _a_t(op, layer.in_features)))
    lambda_d, lambda_b = _lambdas(op, layer)
    scaled = op("Mul", xa, op("Unsqueeze", lambda_d, op.ints(1)))
    return op("Mul", op("MatMul", scaled, _b_t(op, layer.out_features)), op("Unsqueeze", lambda_b, op.ints(1)))


def _place(op: _Nodes, piece: ir.Value, t: Target, axis: int) -> ir.Value:
    """``piece`` (the layer's outputs along ``axis``, the last) cut to the target's part and padded with
    zeros to the node's width at the target's offset."""
    if (t.start, t.stop) != (0, t.layer.out_features):  # one part of a projection the builder split
        piece = op("Slice", piece, op.ints(t.start), op.ints(t.stop), op.ints(-1))
    if t.stop - t.start != t.width:  # one slot of a packed output: zeros around it
        before, after = [0] * axis + [t.offset], [0] * axis + [t.width - t.offset - (t.stop - t.start)]
        piece = op("Pad", piece, op.ints(*before, *after))
    return piece


def _hot_weight(op: _Nodes, group: list[Target]) -> ir.Value:
    """The hot template's ``M = Σ pad(diag(Λd) B[:out, :]ᵀ diag(Λb))`` of one builder MatMul: once λ are
    the template's initializers, all constant, so ONNX Runtime folds ``M`` when it builds a task's session."""
    total = None
    for t in group:
        layer = t.layer

        def weight(layer=layer) -> ir.Value:
            lambda_d, lambda_b = _lambdas(op, layer)
            scaled = op("Mul", op("Transpose", lambda_d, perm=[1, 0]), _b_t(op, layer.out_features))
            return op("Mul", scaled, lambda_b)

        piece = _place(op, op.once(("M", layer.name), weight), t, axis=1)
        total = piece if total is None else op("Add", total, piece)
    return total


def graft(model: ir.Model, targets: list[Target], vera_a: np.ndarray, vera_b: np.ndarray, hot: bool = False) -> None:
    """Add every target's VeRA branch to the builder's graph, in place (see the module docstring), with λ
    as graph inputs ``[tasks, n]`` (their defaults are added by ``_passes.add_task_defaults``).

    ``hot`` (float graphs): the hot template's arrangement, for λ that ``_passes.inline_task`` makes
    initializers (a session replaces them with its task's): each builder MatMul's weight becomes
    ``W + A[:, :in]ᵀ · M``, all constant, which ONNX Runtime folds into one merged weight per task."""
    graph = model.graph
    op = _Nodes(graph, "/vera")
    op.constant("vera_A", np.ascontiguousarray(vera_a, dtype=np.float32))
    op.constant("vera_B", np.ascontiguousarray(vera_b, dtype=np.float32))
    deltas: dict[str, ir.Value] = {}
    by_node: dict[str, list[Target]] = {}
    for target in targets:
        by_node.setdefault(target.node.name, []).append(target)
    for node_name, group in by_node.items():
        output, x, width = group[0].node.outputs[0], group[0].node.inputs[0], group[0].layer.in_features
        if output.is_graph_output():
            raise VeraExportError(f"{node_name} writes a graph output: a VeRA branch cannot be added after it.")
        readers = list(output.uses())
        op.prefix = f"/vera{node_name.rsplit('/', 1)[0]}"
        if hot:
            if group[0].node.op_type != "MatMul":
                raise VeraExportError(f"{node_name} is not a float MatMul: int4 hot templates merge in the runtime.")
            merged = op("Add", group[0].node.inputs[1], op("MatMul", _a_t(op, width), _hot_weight(op, group)))
            group[0].node.replace_input_with(1, merged)
            continue
        total = output
        for t in group:
            if t.layer.name not in deltas:
                deltas[t.layer.name] = _delta(op, t.layer, x)
            total = op("Add", total, _place(op, deltas[t.layer.name], t, axis=2))
        for use in readers:
            use.node.replace_input_with(use.idx, total)
    graph.sort()


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

"""Merged int4 hot sessions: one task's VeRA delta added to the base weights and quantized again, exactly as
onnxruntime-genai's builder quantizes the weights of a merged model.

A fused int4 graph's hot template is the builder's own int4 graph; its merge file
(``<stem>.hot.merge.safetensors``) holds the float32 weights of the adapted MatMulNBits nodes in the
builder's layout ``[K, N]``, the shared ``vera_A``/``vera_B``, and the plan (metadata ``vera.merge``): for
each node, its quantized weight and scales initializers, its block size, and where each VeRA layer's
output columns land in it. A task's session then takes, per node,

    W' = W + A[:, :K]ᵀ · M,   M = Σ pad(diag(Λd) · B[:out, :]ᵀ · diag(Λb))

quantized blockwise (symmetric int4) by ONNX Runtime's own kernel (the one its ``MatMulNBitsQuantizer``
calls): the builder's int4 graph of the merged model, at its speed. The factored graph keeps ΔW in float32
beside int4 ``W``; a merged session rounds ``W + ΔW`` instead, so its logits differ from the graph's by int4
rounding: hot sessions of merge templates are made only when asked (``VeraSession.specialize``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ._contract import Contract
from ._errors import GraphError, printable
from ._header import Header, read_header, read_tensors
from ._json import JsonError, loads_bounded

MERGE_KEY = "vera.merge"
MERGE_SUFFIX = ".merge.safetensors"
_PLAN_FIELDS = {"weight", "scales", "fp32", "block_size", "weight_shape", "scales_shape", "parts"}
_PART_FIELDS = {"lambda_d", "lambda_b", "in_features", "offset", "start", "stop"}


def merge_path(template: Path) -> Path:
    """The merge file of a hot template: ``<stem>.hot.merge.safetensors`` beside ``<stem>.hot.onnx``."""
    return template.with_name(template.name.removesuffix(".onnx") + MERGE_SUFFIX)


@dataclasses.dataclass(frozen=True)
class Part:
    """Columns ``[start, stop)`` of one VeRA layer's output, at ``offset`` among a node's columns."""

    lambda_d: str
    lambda_b: str
    in_features: int
    offset: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class MergedNode:
    """One MatMulNBits node: its initializers ``weight`` ``[N, blocks, bytes]`` and ``scales``, and the
    merge file's float32 ``fp32`` ``[K, N]``."""

    weight: str
    scales: str
    fp32: str
    block_size: int
    weight_shape: tuple[int, ...]
    scales_shape: tuple[int, ...]
    parts: tuple[Part, ...]


def quantize_int4(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` ``[K, N]`` as MatMulNBits' symmetric int4 blocks ``[N, blocks, block_size / 2]`` and
    scales ``[N, blocks]``: ONNX Runtime's kernel, called as its ``MatMulNBitsQuantizer`` calls it."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = weight.shape
    blocks = -(-rows // block_size)
    padded = np.zeros((blocks * block_size, cols), np.float32)
    padded[:rows] = weight
    packed = np.zeros((cols, blocks, block_size // 2), np.uint8)
    scales = np.zeros((cols, blocks), np.float32)
    zero_points = np.zeros((cols, -(-blocks // 2)), np.uint8)  # unused: symmetric
    quantize_matmul_4bits(packed, padded, scales, zero_points, block_size, cols, rows, True)
    return packed, scales


class MergePlan:
    """A merge file, read and checked against the graph's contract: ``initializers(task)`` gives the
    quantized weights of one task's merged model, by initializer name."""

    def __init__(self, path: Path, contract: Contract) -> None:
        self.path = path
        try:
            header = read_header(path)
            self.nodes = _plan(header)
            self._tensors = read_tensors(path, header)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GraphError(f"{path} is not a usable merge file of this graph ({printable(exc)}); export again"
                             " with --hot-template.") from exc
        self._check_shapes(contract)

    def merged_weights(self, task: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each node's float32 ``W + A[:, :K]ᵀ · M`` for ``task`` (λ ``[1, n]``), by its weight initializer's name."""
        a, b = self._tensors["vera_A"], self._tensors["vera_B"]
        merged = {}
        for node in self.nodes:
            base = self._tensors[node.fp32]
            delta = np.zeros((a.shape[0], base.shape[1]), np.float32)
            for p in node.parts:
                width = p.stop - p.start
                delta[:, p.offset:p.offset + width] += (task[p.lambda_d][0][:, None] * b[p.start:p.stop].T
                                                        * task[p.lambda_b][0][None, p.start:p.stop])
            merged[node.weight] = base + a[:, :base.shape[0]].T @ delta
        return merged

    def initializers(self, task: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each node's merged weight, quantized: ``{weight: blocks, scales: scales}``; ``task``: λ ``[1, n]``."""
        out = {}
        for node, weight in zip(self.nodes, self.merged_weights(task).values(), strict=True):
            packed, scales = quantize_int4(weight, node.block_size)
            out[node.weight] = packed.reshape(node.weight_shape)
            out[node.scales] = scales.reshape(node.scales_shape)
        return out

    def _check_shapes(self, contract: Contract) -> None:
        """Every slice the plan takes lies inside its tensors, and λ have the contract's sizes."""
        a, b = self._tensors.get("vera_A"), self._tensors.get("vera_B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise GraphError(f"{self.path} lacks vera_A [r, in] and vera_B [out, r]; export again with --hot-template.")
        shapes = contract.task_shapes()
        for node in self.nodes:
            base = self._tensors.get(node.fp32)
            if base is None or base.ndim != 2 or base.dtype != np.float32 or base.shape[0] > a.shape[1]:
                raise GraphError(f"{self.path}: {printable(node.fp32)} is not a float32 [K, N] weight within vera_A's"
                                 " columns; export again with --hot-template.")
            blocks = -(-base.shape[0] // node.block_size)
            if (math.prod(node.weight_shape) != base.shape[1] * blocks * node.block_size // 2
                    or math.prod(node.scales_shape) != base.shape[1] * blocks):
                raise GraphError(f"{self.path}: {printable(node.weight)}'s shapes do not hold {base.shape} in int4"
                                 f" blocks of {node.block_size}; export again with --hot-template.")
            for p in node.parts:
                if (shapes.get(p.lambda_d) != (a.shape[0],) or shapes.get(p.lambda_b, (0,))[0] < p.stop
                        or not 0 <= p.start < p.stop <= b.shape[0]
                        or p.offset + p.stop - p.start > base.shape[1] or p.in_features != base.shape[0]):
                    raise GraphError(f"{self.path}: the plan of {printable(node.weight)} does not fit the graph's"
                                     " task inputs or its tensors; export again with --hot-template.")


def _plan(header: Header) -> tuple[MergedNode, ...]:
    try:
        raw = loads_bounded(header.metadata[MERGE_KEY], max_depth=4)
    except JsonError as exc:
        raise ValueError(f"its plan {exc}") from exc
    if not isinstance(raw, list):
        raise ValueError("its plan is not a list")
    return tuple(_node(entry) for entry in raw)


def _node(entry) -> MergedNode:
    if not isinstance(entry, dict) or set(entry) != _PLAN_FIELDS:
        raise ValueError(f"a plan entry has not the fields {sorted(_PLAN_FIELDS)}")
    parts = entry["parts"]
    if not isinstance(parts, list) or not all(isinstance(p, dict) and set(p) == _PART_FIELDS for p in parts):
        raise ValueError(f"a plan entry's parts have not the fields {sorted(_PART_FIELDS)}")
    names = [entry[k] for k in ("weight", "scales", "fp32")] + [p[k] for p in parts for k in ("lambda_d", "lambda_b")]
    numbers = [entry["block_size"], *entry["weight_shape"], *entry["scales_shape"],
               *(p[k] for p in parts for k in ("in_features", "offset", "start", "stop"))]
    if not all(isinstance(n, str) for n in names) or not all(type(n) is int and n >= 0 for n in numbers):
        raise ValueError("a plan entry has a name that is not a string or a size that is not a natural number")
    if entry["block_size"] not in (16, 32, 64, 128, 256):
        raise ValueError(f"block size {entry['block_size']} is not one MatMulNBits takes")
    return MergedNode(entry["weight"], entry["scales"], entry["fp32"], entry["block_size"],
                      tuple(entry["weight_shape"]), tuple(entry["scales_shape"]),
                      tuple(Part(**p) for p in parts))

"""The graph contract: what a vera-export ONNX graph promises, read from its metadata_props.

See docs/contract.md. Both the exporter (which writes it) and the runtime (which reads it)
go through this module, so the two can never disagree on a key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping

import numpy as np

from . import _metadata as checked
from ._errors import VeraError, printable

CONTRACT_VERSION = "1"

_PREFIX = "vera."
KEY_VERSION = _PREFIX + "contract_version"
KEY_R = _PREFIX + "r"
KEY_SEED = _PREFIX + "projection_prng_key"
KEY_RECIPE = _PREFIX + "projection_recipe"
KEY_LAYERS = _PREFIX + "layers"
KEY_DEFAULT_TASK = _PREFIX + "default_task"
KEY_FINGERPRINT = _PREFIX + "fingerprint"
KEY_HEADS = _PREFIX + "heads"
KEY_BASE_DIGEST = _PREFIX + "base_digest"
KEY_INPUT_HIGHS = _PREFIX + "input_highs"
KEY_DIM_LIMITS = _PREFIX + "dim_limits"
KEY_TASK_DEFAULTS = _PREFIX + "task_defaults"
KEY_WEIGHTS = _PREFIX + "weights"
KEY_HOT_TEMPLATE = _PREFIX + "hot_template_sha256"
KEY_KV_SHARED = _PREFIX + "kv_shared_buffer"
WEIGHT_TYPES = ("float32", "int8", "int4", "float16")

LAMBDA_D = "vera_lambda_d"
LAMBDA_B = "vera_lambda_b"


class ContractError(VeraError, ValueError):
    """A graph's metadata does not follow the vera-export contract."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One adapted layer: its module path and the shapes of its slices of A and B."""

    name: str
    in_features: int
    out_features: int

    @property
    def lambda_d(self) -> str:
        return f"{self.name}.{LAMBDA_D}"

    @property
    def lambda_b(self) -> str:
        return f"{self.name}.{LAMBDA_B}"


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A linear layer trained per task (PEFT's ``modules_to_save``, e.g. a classifier): its
    weight ``[tasks, out, in]`` and bias ``[tasks, out]`` are task inputs too."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {f"{self.name}.weight": (self.out_features, self.in_features)}
        if self.bias:
            shapes[f"{self.name}.bias"] = (self.out_features,)
        return shapes


@dataclasses.dataclass(frozen=True)
class Contract:
    """What the graph's metadata says about its VeRA layers (contract version 1)."""

    r: int
    seed: int | None
    recipe: str
    layers: tuple[LayerSpec, ...]
    default_task: str
    fingerprint: str
    heads: tuple[HeadSpec, ...] = ()
    base_digest: str | None = None  # SHA-256 of the base weights; absent in graphs older than it
    input_highs: dict[str, int] = dataclasses.field(default_factory=dict)  # token ids lie in [0, high)
    dim_limits: dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. sequence <= learned positions
    task_defaults: bool = True  # task inputs have default initializers (False: the web form, all required)
    weight_dtype: str = "float32"  # how the base weights are stored: float32, int8 (quantized) or float16
    hot_template_sha256: str | None = None  # of <stem>.hot.onnx and its data: the only template a session builds
    # fused graphs (GroupQueryAttention): past and present share one buffer of at least this many positions
    kv_shared_buffer: int | None = None
    version: str = CONTRACT_VERSION

    def task_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-task tensor shapes, by graph input name, without the leading task dimension T."""
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self.layers:
            shapes[layer.lambda_d] = (self.r,)
            shapes[layer.lambda_b] = (layer.out_features,)
        for head in self.heads:
            shapes.update(head.shapes())
        return shapes

    def to_metadata(self) -> dict[str, str]:
        layers = [dataclasses.asdict(layer) for layer in self.layers]
        heads = {KEY_HEADS: json.dumps([dataclasses.asdict(h) for h in self.heads], separators=(",", ":"))}
        digest = {KEY_BASE_DIGEST: self.base_digest} if self.base_digest else {}
        limits = {key: json.dumps(value, separators=(",", ":")) for key, value in
                  ((KEY_INPUT_HIGHS, self.input_highs), (KEY_DIM_LIMITS, self.dim_limits)) if value}
        form = ({} if self.task_defaults else {KEY_TASK_DEFAULTS: "none"}) | (
            {} if self.weight_dtype == "float32" else {KEY_WEIGHTS: self.weight_dtype}) | (
            {KEY_HOT_TEMPLATE: self.hot_template_sha256} if self.hot_template_sha256 else {}) | (
            {KEY_KV_SHARED: str(self.kv_shared_buffer)} if self.kv_shared_buffer else {})
        return (heads if self.heads else {}) | digest | limits | form | {
            KEY_VERSION: self.version,
            KEY_R: str(self.r),
            KEY_SEED: "" if self.seed is None else str(self.seed),
            KEY_RECIPE: self.recipe,
            KEY_LAYERS: json.dumps(layers, separators=(",", ":")),
            KEY_DEFAULT_TASK: self.default_task,
            KEY_FINGERPRINT: self.fingerprint,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str = "the graph") -> Contract:
        """The contract in a graph's metadata, every ``vera.*`` key checked (type, range, size, nesting):
        ContractError naming the key otherwise."""
        if KEY_VERSION not in metadata:
            raise ContractError(
                f"{source} carries no '{KEY_VERSION}' metadata: it was not written by vera-export."
                " Export the model with `vera-export MODEL --out FILE.onnx`."
            )
        version = metadata[KEY_VERSION]
        if version != CONTRACT_VERSION:
            raise ContractError(
                f"{source} follows graph contract version {printable(version, 20)}; this vera-runtime reads"
                f" version {CONTRACT_VERSION}. Upgrade vera-runtime or re-export the model."
            )
        try:
            return cls._checked(metadata)
        except checked.MetadataError as exc:
            raise ContractError(f"{source} has malformed vera metadata: {exc}. Re-export the model.") from exc

    @classmethod
    def _checked(cls, metadata: Mapping[str, str]) -> Contract:
        default_task = checked.text(metadata, KEY_DEFAULT_TASK, limit=64)
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", default_task):
            raise checked.MetadataError(KEY_DEFAULT_TASK, f"is {printable(default_task, 70)!r}, not a task name")
        return cls(
            r=checked.integer(metadata, KEY_R, 1, checked.MAX_RANK),
            seed=checked.integer(metadata, KEY_SEED, -(2**63), 2**64 - 1, required=False),
            recipe=checked.text(metadata, KEY_RECIPE, limit=4096),
            layers=tuple(LayerSpec(**entry) for entry in checked.layers(metadata, KEY_LAYERS)),
            default_task=default_task,
            fingerprint=checked.digest(metadata, KEY_FINGERPRINT),
            heads=tuple(HeadSpec(**entry) for entry in checked.heads(metadata, KEY_HEADS)),
            base_digest=checked.digest(metadata, KEY_BASE_DIGEST, required=False),
            input_highs=checked.int_map(metadata, KEY_INPUT_HIGHS, 2**62),
            dim_limits=checked.int_map(metadata, KEY_DIM_LIMITS, 2**31),
            task_defaults=checked.choice(metadata, KEY_TASK_DEFAULTS, ("graph", "none")) == "graph",
            weight_dtype=checked.choice(metadata, KEY_WEIGHTS, WEIGHT_TYPES),
            hot_template_sha256=checked.digest(metadata, KEY_HOT_TEMPLATE, required=False),
            kv_shared_buffer=checked.integer(metadata, KEY_KV_SHARED, 1, 2**31, required=False),
        )


def fingerprint(
    vera_a: np.ndarray,
    vera_b: np.ndarray,
    layers: tuple[LayerSpec, ...],
    heads: tuple[HeadSpec, ...] = (),
    base_digest: str | None = None,
) -> str:
    """SHA-256 of the shared projections, the layer table, the per-task heads and the base weights'
    digest: what a task's tensors depend on. Vectors trained against other A/B values, for other
    layers or over other base weights (cased vs uncased BERT) are meaningless for this graph."""
    digest = hashlib.sha256(b"vera-export fingerprint v1\0")
    for array in (vera_a, vera_b):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}\0".encode())
        digest.update(array.tobytes())
    table = [dataclasses.astuple(layer) for layer in layers]
    digest.update(json.dumps(table, separators=(",", ":")).encode())
    if heads:  # graphs without heads keep the fingerprint they had before heads existed
        digest.update(json.dumps([dataclasses.astuple(h) for h in heads], separators=(",", ":")).encode())
    if base_digest:  # likewise graphs exported before base digests
        digest.update(f"base:{base_digest}".encode())
    return digest.hexdigest()

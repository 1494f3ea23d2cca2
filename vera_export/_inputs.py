"""Model input specs: names, dtypes and shapes with symbolic dimensions, e.g.
``input_ids:int64<1000:batch=2,sequence=8`` (integer values drawn from [0, 1000), a symbolic
``batch`` dimension traced at size 2 and a symbolic ``sequence`` dimension traced at size 8).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ._errors import VeraExportError

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}
_SPEC = re.compile(r"^(?P<name>[A-Za-z_]\w*):(?P<dtype>\w+)(?:<(?P<high>\d+))?:(?P<dims>[\w=,]*)$")
_DIM = re.compile(r"^(?:(?P<name>[A-Za-z_]\w*)=)?(?P<size>\d+)$")
_USAGE = "expected NAME:DTYPE[<HIGH]:DIMS, e.g. input_ids:int64<1000:batch=2,sequence=8"


@dataclasses.dataclass(frozen=True)
class Dim:
    """A symbolic dimension and the size it is traced at (at least 2: torch.export fixes 0 and 1).

    ``derived``: a size that follows from other dimensions (a KV cache's ``past + sequence``), which
    torch.export must infer rather than be told it is free; the caller names it in the graph.
    ``high``: the largest size the graph is exact for (a sliding-window cache), recorded in the contract."""

    name: str
    example: int
    derived: bool = False
    high: int | None = None


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    dims: tuple[int | Dim, ...]
    high: int | None = None  # integer inputs: example values are drawn from [0, high)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise VeraExportError(f"input '{self.name}': dtype {self.dtype!r} is not one of {sorted(DTYPES)}.")
        for dim in self.dims:
            if isinstance(dim, Dim) and dim.example < 2:
                raise VeraExportError(
                    f"input '{self.name}': symbolic dimension '{dim.name}' must be traced at size >= 2"
                    f" (got {dim.example}); torch.export would fix it to a constant."
                )

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        match = _SPEC.match(text.strip())
        if not match:
            raise VeraExportError(f"bad input spec {text!r}: {_USAGE}.")
        dims = []
        for part in filter(None, match["dims"].split(",")):
            dim = _DIM.match(part)
            if not dim:
                raise VeraExportError(f"bad dimension {part!r} in input spec {text!r}: {_USAGE}.")
            size = int(dim["size"])
            dims.append(Dim(dim["name"], size) if dim["name"] else size)
        high = int(match["high"]) if match["high"] else None
        return cls(match["name"], match["dtype"], tuple(dims), high)

    def __str__(self) -> str:
        dims = ",".join(f"{d.name}={d.example}" if isinstance(d, Dim) else str(d) for d in self.dims)
        high = f"<{self.high}" if self.high is not None else ""
        return f"{self.name}:{self.dtype}{high}:{dims}"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.example if isinstance(d, Dim) else d for d in self.dims)

    def example(self, generator: torch.Generator) -> torch.Tensor:
        dtype = DTYPES[self.dtype]
        if dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator).to(dtype)
        if self.name in MASKS and len(self.shape) == 2:
            return _padded_mask(self.shape, generator).to(dtype)
        high = self.high or 2
        return torch.randint(0, high, self.shape, generator=generator).to(dtype)


def _padded_mask(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A mask as a tokenizer pads a batch: the first row full, the others shorter, padded on the right;
    never an empty row (random 0/1 masks leave causal positions with nothing to attend to, where PyTorch
    and ONNX Runtime legitimately differ)."""
    rows, length = shape
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    lengths[0] = length
    return (torch.arange(length)[None, :] < lengths[:, None]).long()


MASKS = ("attention_mask", "decoder_attention_mask")


def parse_specs(texts) -> list[InputSpec]:
    specs = [spec if isinstance(spec, InputSpec) else InputSpec.parse(spec) for spec in texts]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise VeraExportError(f"input specs name an input twice: {names}.")
    return specs


def dynamic_shapes(specs: list[InputSpec]) -> list[dict]:
    """One ``{axis: Dim}`` per input; dimensions with the same name share one torch.export.Dim."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for spec in specs:
        axes = {}
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, Dim) and dim.derived:
                axes[axis] = torch.export.Dim.AUTO
            elif isinstance(dim, Dim):
                axes[axis] = dims.setdefault(dim.name, torch.export.Dim(dim.name, min=1, max=dim.high))
        shapes.append(axes)
    return shapes

"""``export_plain``: a model without VeRA (a base model, or one with ΔW merged into W) through the same
torch.export pipeline and passes as vera-export's graphs: what a factored graph is compared with."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vera_runtime.files import atomic_path

from ._inputs import InputSpec, dynamic_shapes, parse_specs
from ._trace import flatten_outputs, quiet_export


def _positional(model: nn.Module, names: list[str]) -> nn.Module:
    """``model`` called with its inputs as named positional arguments (torch.export names graph inputs
    after the forward's parameters), returning its tensors as a flat tuple."""

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            return tuple(flatten_outputs(self.model(**dict(zip(names, args, strict=True)))).values())

    namespace: dict = {}
    arguments = ", ".join(names)
    exec(f"def forward(self, {arguments}):\n    return Plain.forward(self, {arguments})\n",  # noqa: S102
         {"Plain": Plain}, namespace)
    return type("PlainExport", (Plain,), {"forward": namespace["forward"]})().eval()


def export_plain(model: nn.Module, out: str | os.PathLike, inputs: Sequence[str | InputSpec]) -> Path:
    """Export ``model`` (no VeRA layers needed) to ``out`` as vera-export exports: torch.export, no
    onnxscript rewrites, constants folded, trace metadata stripped. For merged or base reference graphs."""
    import onnx_ir as ir

    from . import _passes

    specs = parse_specs(inputs)
    generator = torch.Generator().manual_seed(0)
    examples = tuple(spec.example(generator) for spec in specs)
    names = [spec.name for spec in specs]
    with torch.no_grad():  # outputs named as vera-export names them: by key, "output", or "output_<i>"
        outputs = list(flatten_outputs(model(**dict(zip(names, examples, strict=True)))))
    with quiet_export():
        program = torch.onnx.export(_positional(model, names), examples, input_names=names, output_names=outputs,
                                    dynamic_shapes=dynamic_shapes(specs), dynamo=True, verbose=False, optimize=False)
    _passes.fold_constants(program.model)
    _passes.strip_trace_metadata(program.model)
    with atomic_path(out) as tmp:
        ir.save(program.model, tmp)
    return Path(out)

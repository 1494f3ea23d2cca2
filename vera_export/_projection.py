"""The shared random projections A and B, drawn exactly as Hugging Face PEFT draws them."""

from __future__ import annotations

import math

import torch

RECIPE = (
    "peft-vera-v1: g = torch.Generator('cpu').manual_seed(seed); "
    "A = empty(r, max_in).uniform_(-sqrt(6/max_in), sqrt(6/max_in), generator=g); "
    "B = empty(max_out, r).uniform_(-sqrt(6/r), sqrt(6/r), generator=g); float32"
)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def make_projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A, B)`` of shapes ``(r, max_in)`` and ``(max_out, r)``, bit-identical to PEFT's.

    A is drawn first, then B, from one CPU generator: reordering would change both.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_a = _kaiming_uniform((r, max_in), generator)
    vera_b = _kaiming_uniform((max_out, r), generator)
    return vera_a, vera_b

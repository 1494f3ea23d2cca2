"""A minimal VeRA linear layer, and ``apply_vera`` to put it on chosen submodules of any model.

Mirrors PEFT's ``tuners/vera``: the same projections for the same seed, r and layer shapes, and
the same initialisation (``lambda_b = 0``, ``lambda_d = d_initial``), so an untrained adapter is
the identity and a model adapted here exports exactly like one adapted by PEFT.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import VeraExportError
from ._projection import make_projections

PROJECTION_ATTR = "vera_projection"


@dataclasses.dataclass(frozen=True)
class VeraConfig:
    """How to adapt a model. Field names and defaults follow ``peft.VeraConfig``.

    ``target_modules``: a list of names (a module matches when its path equals a name or ends
    with ``.name``) or one regular expression that must match the whole path.
    """

    target_modules: tuple[str, ...] | str
    r: int = 256
    projection_prng_key: int = 0
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1:
            raise VeraExportError(f"VeraConfig.r must be a positive integer, got {self.r}.")

    def matches(self, path: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        return any(path == t or path.endswith("." + t) for t in self.target_modules)


class VeraProjection(nn.Module):
    """Holds the shared A ``(r, max_in)`` and B ``(max_out, r)``; one per model."""

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor, config: VeraConfig) -> None:
        super().__init__()
        self.register_buffer("vera_A", vera_a)
        self.register_buffer("vera_B", vera_b)
        self.config = config

    @property
    def seed(self) -> int:
        return self.config.projection_prng_key

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]


class VeraLinear(nn.Module):
    """``y = base(x) + lambda_b * (B_s @ (lambda_d * (A_s @ x)))`` with A_s, B_s slices of the shared A, B."""

    def __init__(self, base_layer: nn.Linear, projection: VeraProjection, d_initial: float = 0.1) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        # A plain reference, not a submodule: the projection is registered once, on the model root.
        self.__dict__["projection"] = projection
        self.vera_lambda_d = nn.Parameter(torch.full((projection.r,), float(d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features))
        base_layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vera_a = self.projection.vera_A[:, : self.in_features]
        vera_b = self.projection.vera_B[: self.out_features, :]
        hidden = self.vera_lambda_d * F.linear(x.to(self.vera_lambda_d.dtype), vera_a)
        return self.base_layer(x) + self.vera_lambda_b * F.linear(hidden, vera_b)


def apply_vera(model: nn.Module, config: VeraConfig) -> list[str]:
    """Replace every ``nn.Linear`` that ``config`` targets with a :class:`VeraLinear`, in place.

    Returns the adapted module paths. A and B are sized by the largest targeted layer, as in PEFT.
    """
    if hasattr(model, PROJECTION_ATTR):
        raise VeraExportError(f"{type(model).__name__} already has VeRA layers; apply_vera once per model.")
    targets = [(path, m) for path, m in model.named_modules() if path and config.matches(path)]
    if not targets:
        raise VeraExportError(
            f"no module of {type(model).__name__} matches target_modules={config.target_modules!r}."
        )
    for path, module in targets:
        if type(module) is not nn.Linear:
            raise VeraExportError(
                f"layer '{path}' is {type(module).__name__}; VeRA adapts only nn.Linear layers here"
                " (PEFT also adapts transformers' Conv1D): narrow target_modules."
            )
    max_in = max(m.in_features for _, m in targets)
    max_out = max(m.out_features for _, m in targets)
    vera_a, vera_b = make_projections(config.r, max_in, max_out, config.projection_prng_key)
    projection = VeraProjection(vera_a, vera_b, config)
    model.add_module(PROJECTION_ATTR, projection)
    for path, module in targets:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, child, VeraLinear(module, projection, config.d_initial))
    return [path for path, _ in targets]

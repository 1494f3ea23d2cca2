"""Reference VeRA models: small, deterministic, and shaped like the real families they stand for.

``build(name, seed)`` gives the same weights and the same A/B on every machine;
``make_task(model, seed)`` fills the λ vectors with a reproducible stand-in for a trained task.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

from vera_export import VeraConfig, apply_vera

from .decoder import DecoderConfig, TinyDecoderLM
from .encoder import EncoderConfig, TinyEncoderClassifier

# name -> (model class, config class, default VeRA targets: the encoder's as in MiniLM's VeRA
# fine-tunes, the decoder's with layers of three different shapes)
ARCHITECTURES = {
    TinyEncoderClassifier.architecture: (TinyEncoderClassifier, EncoderConfig, ("query", "value")),
    TinyDecoderLM.architecture: (TinyDecoderLM, DecoderConfig, ("query", "value", "up", "down")),
}

__all__ = [
    "ARCHITECTURES", "DecoderConfig", "EncoderConfig", "TinyDecoderLM", "TinyEncoderClassifier",
    "build", "build_base", "example_input", "make_task",
]


def build_base(name: str, config: dict | None = None, seed: int = 0) -> nn.Module:
    """The base model ``name`` without VeRA, with weights drawn from ``seed``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}: choose one of {sorted(ARCHITECTURES)}.")
    model_class, config_class, _ = ARCHITECTURES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config_class(**(config or {})))
    return model.eval()


def build(name: str, *, config: dict | None = None, vera: VeraConfig | None = None, seed: int = 0) -> nn.Module:
    """The model ``name`` with VeRA applied (by default r=64 on the architecture's targets)."""
    model = build_base(name, config, seed)
    apply_vera(model, vera or VeraConfig(target_modules=ARCHITECTURES[name][2], r=64))
    return model


def make_task(model: nn.Module, seed: int) -> nn.Module:
    """Fill every λ with values drawn from ``seed``: a reproducible stand-in for a trained task."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("vera_lambda_d"):
                param.copy_(0.1 + 0.5 * torch.randn(param.shape, generator=generator))
            elif name.endswith("vera_lambda_b"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def example_input(model: nn.Module, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """A reproducible batch for ``model``: token ids, and a mask hiding the last third of row 1."""
    rng = np.random.default_rng(seed)
    inputs = {"input_ids": rng.integers(0, model.config.vocab_size, (batch, seq), dtype=np.int64)}
    if "attention_mask" in inspect.signature(model.forward).parameters:
        mask = np.ones((batch, seq), np.int64)
        mask[1:, 2 * seq // 3 :] = 0
        inputs["attention_mask"] = mask
    return inputs

"""The digest of a model's base weights: what tells two checkpoints of one architecture apart."""

from __future__ import annotations

import hashlib
import sys

import torch
from torch import nn

_NOT_BASE = ("vera_lambda", "vera_A", "vera_B")  # per-task vectors and the shared projections


def _head_paths(model: nn.Module) -> tuple[str, ...]:
    """PEFT's modules_to_save wrappers: their weights are task inputs, not base weights."""
    if "peft" not in sys.modules:
        return ()
    from peft.utils.other import ModulesToSaveWrapper

    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper))


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer the graph stores as a base weight, by name (tied weights once)."""
    heads = _head_paths(model)
    named = [*model.named_parameters(), *model.named_buffers()]
    return {
        name: tensor for name, tensor in named
        if not any(part in name for part in _NOT_BASE) and not name.startswith(heads)
    }


def base_digest(model: nn.Module) -> str:
    """SHA-256 over the base weights' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256(b"vera-export base digest v1\0")
    for name, tensor in sorted(base_tensors(model).items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()

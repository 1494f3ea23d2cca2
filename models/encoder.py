"""A small transformer encoder with a classification head (BERT-like, pre-norm)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ._blocks import Block


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 8192
    max_positions: int = 128
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    n_layers: int = 2
    n_classes: int = 3


class TinyEncoderClassifier(nn.Module):
    architecture = "tiny-encoder"

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.max_positions, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_heads, config.d_ff, causal=False) for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.classifier = nn.Linear(config.d_model, config.n_classes)

    def vera_input_specs(self) -> list[str]:
        return [
            f"input_ids:int64<{self.config.vocab_size}:batch=2,sequence=8",
            "attention_mask:int64<2:batch=2,sequence=8",
        ]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x, attention_mask)
        mask = attention_mask[..., None].to(x.dtype)
        pooled = (self.norm(x) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return {"logits": self.classifier(pooled), "embedding": pooled}

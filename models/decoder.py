"""A small causal decoder language model (GPT-like, pre-norm, tied embeddings)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ._blocks import Block


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 8192
    max_positions: int = 128
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    n_layers: int = 2


class TinyDecoderLM(nn.Module):
    architecture = "tiny-decoder"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.max_positions, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_heads, config.d_ff, causal=True) for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tokens.weight  # tied, as in GPT-2: the graph must store it once

    def vera_input_specs(self) -> list[str]:
        return [f"input_ids:int64<{self.config.vocab_size}:batch=2,sequence=8"]

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return {"logits": self.lm_head(self.norm(x))}

"""Transformer blocks shared by the reference models: plain PyTorch, export-friendly."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with separate query/key/value/output projections (VeRA targets)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.output = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        return x.view(batch, seq, self.n_heads, d_model // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self.forward_cached(x, key_mask, None)[0]

    def forward_cached(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend over ``past`` keys/values ([batch, heads, past, head_dim]) and x's own; ``key_mask``
        covers both. Returns the output and the keys/values to keep (past + x's)."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if key_mask is not None:  # [batch, keys] of 0/1: masked keys get a large negative score
            scores = scores + (1.0 - key_mask[:, None, None, :].to(scores.dtype)) * -1e9
        if self.causal:  # query i sits at position (keys - queries + i): later keys are the future
            queries, keys = x.shape[1], k.shape[2]
            at = torch.arange(queries, device=x.device) + (keys - queries)
            scores = scores.masked_fill(torch.arange(keys, device=x.device)[None, :] > at[:, None], -1e9)
        context = scores.softmax(-1) @ v
        return self.output(context.transpose(1, 2).reshape(x.shape)), (k, v)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, causal: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = Attention(d_model, n_heads, causal)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_cached(x, key_mask, None)[0]

    def forward_cached(self, x, key_mask, past):
        attended, present = self.attention.forward_cached(self.norm1(x), key_mask, past)
        x = x + attended
        return x + self.ffn(self.norm2(x)), present


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 8192
    max_positions: int = 128
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    n_layers: int = 2


class Transformer(nn.Module):
    """Token and position embeddings, pre-norm blocks, a final norm: the trunk of both models.

    Subclasses are vera-export architectures (registered under the entry-point group
    ``vera_export.architectures``): ``architecture`` names them in checkpoints, ``config_class`` rebuilds
    their config, and ``pickle_classes`` lists what a ``torch.save(model)`` of one refers to."""

    architecture: str
    config_class: type[TransformerConfig] = TransformerConfig

    @classmethod
    def pickle_classes(cls) -> tuple[type, ...]:
        return cls, cls.config_class, Attention, FeedForward, Block

    def __init__(self, config: TransformerConfig, causal: bool) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.max_positions, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_heads, config.d_ff, causal) for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)

    def hidden(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.hidden_cached(input_ids, key_mask, positions, None)[0]

    def hidden_cached(self, input_ids, key_mask, positions, past):
        """``hidden`` with explicit positions and a KV cache: ``past`` holds one (keys, values) per block
        or is None; returns the hidden states and each block's (keys, values) after these tokens."""
        x = self.tokens(input_ids) + self.positions(positions)
        present = []
        for i, block in enumerate(self.blocks):
            x, kept = block.forward_cached(x, key_mask, None if past is None else past[i])
            present.append(kept)
        return self.norm(x), present

"""A small causal decoder language model (GPT-like, pre-norm, tied embeddings)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ._blocks import Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class DecoderConfig(TransformerConfig):
    pass


class TinyDecoderLM(Transformer):
    architecture = "tiny-decoder"
    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config, causal=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tokens.weight  # tied, as in GPT-2: the graph must store it once

    def vera_input_specs(self) -> list[str]:
        return [f"input_ids:int64<{self.config.vocab_size}:batch=2,sequence=8"]

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.lm_head(self.hidden(input_ids))}

    def forward_cached(self, input_ids, attention_mask, position_ids, past):
        """One generation step (``vera-export --kv-cache``): logits for the new tokens, and each block's
        keys and values ``[batch, heads, past + new, head_dim]`` to feed back as ``past``."""
        hidden, present = self.hidden_cached(input_ids, attention_mask, position_ids, past)
        return self.lm_head(hidden), present

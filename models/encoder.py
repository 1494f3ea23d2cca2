"""A small transformer encoder with a classification head (BERT-like, pre-norm)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ._blocks import Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class EncoderConfig(TransformerConfig):
    n_classes: int = 3


class TinyEncoderClassifier(Transformer):
    architecture = "tiny-encoder"
    config_class = EncoderConfig

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config, causal=False)
        self.classifier = nn.Linear(config.d_model, config.n_classes)

    def vera_input_specs(self) -> list[str]:
        return [
            f"input_ids:int64<{self.config.vocab_size}:batch=2,sequence=8",
            "attention_mask:int64<2:batch=2,sequence=8",
        ]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = attention_mask[..., None].float()
        pooled = (self.hidden(input_ids, attention_mask) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return {"logits": self.classifier(pooled), "embedding": pooled}

"""Small transformers base folders with PEFT VeRA adapter folders, as users keep them on disk."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = {
    # name: (model class, config class, config, targets, task_type, extra VeraConfig fields)
    "bert-features": ("BertModel", "BertConfig",
                      dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128), ["query", "value"], None, {}),
    "bert-cls": ("BertForSequenceClassification", "BertConfig",
                 dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, num_labels=3), ["query", "value"], "SEQ_CLS", {}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=64), ["c_attn", "c_fc"],
             "CAUSAL_LM", {"fan_in_fan_out": True}),
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
              ["q_proj", "v_proj"], "CAUSAL_LM", {}),
}


def model_class(family: str):
    import transformers

    return getattr(transformers, FAMILIES[family][0])


def make_base(out: Path, family: str, **overrides) -> Path:
    import transformers

    model_name, config_name, config, *_ = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**{**config, **overrides}))
    model.save_pretrained(out)
    return out


def make_adapter(out: Path, base: Path, family: str, seed: int, **vera) -> Path:
    """A VeRA adapter whose trainable tensors (λ, and a head for SEQ_CLS) are drawn from ``seed``."""
    from peft import VeraConfig, get_peft_model

    _, _, _, targets, task_type, extra = FAMILIES[family]
    model = model_class(family).from_pretrained(base)
    config = VeraConfig(**{"r": 16, "target_modules": targets, "task_type": task_type, **extra, **vera})
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(out)
    return out

"""Small transformers base folders with PEFT VeRA adapter folders, as users keep them on disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Family:
    model: str  # transformers class of the base model
    config: str  # its config class
    settings: dict
    targets: list[str]
    task_type: str | None  # what a user who sets it would pass; None: the family has none
    head: list[str] | None = None  # modules_to_save a user lists when task_type is not set
    vera: dict = dataclasses.field(default_factory=dict)  # other VeraConfig fields


_BERT = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
_DECODER = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)
_FUSED = dict(_DECODER, hidden_size=64, num_key_value_heads=2)  # head size 16
_T5 = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)

FAMILIES = {
    "bert-features": Family("BertModel", "BertConfig", dict(_BERT, vocab_size=30522), ["query", "value"], None),
    "bert-cls": Family("BertForSequenceClassification", "BertConfig", dict(_BERT, num_labels=3),
                       ["query", "value"], "SEQ_CLS", ["classifier"]),
    "distilbert-cls": Family("DistilBertForSequenceClassification", "DistilBertConfig",
                             dict(vocab_size=1000, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                  max_position_embeddings=64, num_labels=3),
                             ["q_lin", "v_lin"], "SEQ_CLS", ["classifier"]),  # also wraps pre_classifier
    "roberta-cls": Family("RobertaForSequenceClassification", "RobertaConfig",
                          dict(_BERT, max_position_embeddings=72, num_labels=3), ["query", "value"], "SEQ_CLS",
                          ["classifier"]),  # RobertaClassificationHead: dense -> tanh -> out_proj
    "opt": Family("OPTForCausalLM", "OPTConfig",
                  dict(vocab_size=1000, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32),
                  ["q_proj", "v_proj", "fc1", "fc2"], "CAUSAL_LM"),  # fc1/fc2 see [batch*seq, d]
    "gpt2": Family("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=50257, n_embd=64, n_layer=2, n_head=4,
                                                          n_positions=64),
                   ["c_attn", "c_fc"], "CAUSAL_LM", vera={"fan_in_fan_out": True}),
    "gpt-neox": Family("GPTNeoXForCausalLM", "GPTNeoXConfig", _DECODER, ["query_key_value", "dense_h_to_4h"],
                       "CAUSAL_LM"),
    "llama": Family("LlamaForCausalLM", "LlamaConfig", dict(_DECODER, num_key_value_heads=2),
                    ["q_proj", "v_proj"], "CAUSAL_LM"),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", dict(_DECODER, num_key_value_heads=2),
                    ["q_proj", "k_proj", "v_proj"], "CAUSAL_LM"),
    "mistral": Family("MistralForCausalLM", "MistralConfig", dict(_DECODER, num_key_value_heads=2),
                      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "CAUSAL_LM"),
    # the fused export's families (onnxruntime-genai's builder: GroupQueryAttention on the CPU wants head size 16+)
    "phi3": Family("Phi3ForCausalLM", "Phi3Config", dict(_FUSED, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                              original_max_position_embeddings=64),
                   ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "CAUSAL_LM"),
    "gemma2": Family("Gemma2ForCausalLM", "Gemma2Config", dict(_FUSED, head_dim=16, query_pre_attn_scalar=16,
                                                               sliding_window=32),
                     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "CAUSAL_LM"),
    "phi": Family("PhiForCausalLM", "PhiConfig", _DECODER, ["q_proj", "v_proj", "fc1", "fc2"], "CAUSAL_LM"),
    "vit": Family("ViTForImageClassification", "ViTConfig",
                  dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=3),
                  ["q_proj", "v_proj"], None, ["classifier"]),
    "t5-seq2seq": Family("T5ForConditionalGeneration", "T5Config", _T5, ["q", "v"], "SEQ_2_SEQ_LM"),
    "t5-encoder": Family("T5EncoderModel", "T5Config", _T5, ["q", "v"], "FEATURE_EXTRACTION"),
    "whisper": Family("WhisperForConditionalGeneration", "WhisperConfig",
                      dict(vocab_size=1000, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
                      ["q_proj", "v_proj"], "SEQ_2_SEQ_LM"),
    "wav2vec2": Family("Wav2Vec2Model", "Wav2Vec2Config",
                       dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, vocab_size=32),
                       ["q_proj", "v_proj"], "FEATURE_EXTRACTION"),
}


def model_class(family: str):
    import transformers

    return getattr(transformers, FAMILIES[family].model)


def make_base(out: Path, family: str, **overrides) -> Path:
    import transformers

    spec = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, spec.config)(**{**spec.settings, **overrides})
    getattr(transformers, spec.model)(config).save_pretrained(out)
    return out


def make_adapter(out: Path, base: Path, family: str, seed: int, typed: bool = True, **vera) -> Path:
    """A VeRA adapter whose trainable tensors (λ, and a head when there is one) are drawn from ``seed``.

    ``typed=False`` saves it as users often do, without task_type: PEFT then records the model
    class in ``auto_mapping``, and the head must be listed in modules_to_save by hand.
    """
    from peft import VeraConfig, get_peft_model

    spec = FAMILIES[family]
    model = model_class(family).from_pretrained(base)
    fields = {"task_type": spec.task_type} if typed and spec.task_type else {"modules_to_save": spec.head}
    config = VeraConfig(**{"r": 16, "target_modules": spec.targets, **fields, **spec.vera, **vera})
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(out)
    return out


def example_feeds(inputs: dict, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Model inputs for a VeraSession's ``inputs``: ids below 1000, a padded last row, random floats."""
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "sequence": 10, "decoder_sequence": 5, "samples": 400}
    feeds = {}
    for name, info in inputs.items():
        shape = [sizes[d] if isinstance(d, str) else d for d in info.shape]
        if info.dtype == np.float32:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
        elif name.endswith("attention_mask"):
            feeds[name] = np.ones(shape, np.int64)
            feeds[name][-1, shape[1] // 2:] = 0
        else:
            feeds[name] = rng.integers(0, 1000, shape)
    return feeds


def add_tokenizer(base: Path, vocab_size: int) -> Path:
    """A word-level tokenizer ("w5 w17" -> [1, 5, 17]; <pad> 0, <s> 1, </s> 2) saved in ``base``, built
    locally as a user's base folder would hold one from the hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.decoder = decoders.WordPiece()  # words joined by spaces
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(base)
    return base

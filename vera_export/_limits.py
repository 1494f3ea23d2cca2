"""What the runtime checks feeds against: the token vocabulary and the positions a model learned."""

from __future__ import annotations

from torch import nn

from ._inputs import Dim, InputSpec

_TOKEN_INPUTS = ("input_ids", "decoder_input_ids")
_POSITION_FIELDS = ("max_positions", "n_positions", "max_position_embeddings")
_SEQUENCE_FIELDS = {"sequence": _POSITION_FIELDS, "total_sequence": _POSITION_FIELDS,  # a KV cache: past + new
                    "decoder_sequence": ("max_target_positions",)}
_PADDED_POSITIONS = ("roberta", "xlm-roberta", "camembert")  # positions start after the padding id


def model_config(model: nn.Module):
    """The model's config (ours: a dataclass; transformers': a PretrainedConfig), or None."""
    config = getattr(model, "config", None)
    return config if config is not None and not isinstance(config, dict) else None


def input_highs(model: nn.Module, specs: list[InputSpec]) -> dict[str, int]:
    """Token id inputs and the vocabulary size their values stay below."""
    vocab = getattr(model_config(model), "vocab_size", None)
    names = {spec.name for spec in specs if spec.dtype.startswith("int")}
    return {name: vocab for name in _TOKEN_INPUTS if name in names and isinstance(vocab, int)}


def _learns_positions(model: nn.Module) -> bool:
    """Absolute positions from a table (BERT, GPT-2, OPT): a longer sequence would index past it.
    Rotary and relative positions (Llama, T5) have no such limit."""
    return any(isinstance(m, nn.Embedding) and ("position" in n or n.endswith("wpe")) for n, m in model.named_modules())


def dim_limits(model: nn.Module, specs: list[InputSpec]) -> dict[str, int]:
    """Symbolic dimensions bounded by a learned position table or by their spec, and their bound."""
    limits = _position_limits(model, specs)
    for dim in (d for spec in specs for d in spec.dims if isinstance(d, Dim) and d.high is not None):
        limits[dim.name] = min(limits.get(dim.name, dim.high), dim.high)
    return limits


def declared_positions(config, fields=_POSITION_FIELDS) -> int | None:
    """The number of positions a config declares (the first of ``fields`` that is an integer)."""
    return next((getattr(config, f) for f in fields if isinstance(getattr(config, f, None), int)), None)


def _position_limits(model: nn.Module, specs: list[InputSpec]) -> dict[str, int]:
    config = model_config(model)
    if config is None or not _learns_positions(model):
        return {}
    dims = {d.name for spec in specs for d in spec.dims if not isinstance(d, int)}
    offset = getattr(config, "pad_token_id", 0) + 1 if getattr(config, "model_type", "") in _PADDED_POSITIONS else 0
    limits = {}
    for dim, fields in _SEQUENCE_FIELDS.items():
        value = declared_positions(config, fields)
        if dim in dims and value:
            limits[dim] = value - offset
    return limits

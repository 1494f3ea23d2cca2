"""``genai_config.json`` and tokenizer files beside a KV-cache graph: what onnxruntime-genai's
``og.Model(folder)`` reads, and what ``vera-run generate`` tokenizes with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vera_runtime import Contract
from vera_runtime.files import load_file_bounded, same_file
from vera_runtime.layout import COMPANION_FILES, GENAI_CONFIG, PAST, PRESENT

from ._errors import VeraExportError
from ._kv_cache import TOTAL, CachedCausalLM
from ._limits import declared_positions
from ._staging import Staging

# onnxruntime-genai's model types that run a graph of this layout as a plain decoder. Its "gpt2" type
# means another layout (one combined past per layer), so other families get the generic decoder, "llama".
GENAI_DECODERS = ("llama", "mistral", "qwen2", "phi", "phi3", "gemma", "gemma2", "granite", "olmo")
TOKENIZER_FILES = tuple(name for name in COMPANION_FILES if name != GENAI_CONFIG)  # what a publish may write


def _token_ids(base: Path, config) -> dict[str, int | list[int] | None]:
    """bos/eos/pad as generation_config.json says (it wins, as in transformers), else config.json;
    no pad id means the eos id, as transformers' generate pads."""
    generation = {}
    path = base / "generation_config.json"
    if path.is_file():
        try:
            generation = load_file_bounded(path)
            if not isinstance(generation, dict):
                raise ValueError(f"it holds a JSON {type(generation).__name__}, not an object")
        except (OSError, ValueError) as exc:
            raise VeraExportError(f"{path} is not a readable generation config ({exc}): fix or remove it.") from exc
    ids = {key: generation.get(key, getattr(config, key, None)) for key in ("bos_token_id", "eos_token_id",
                                                                          "pad_token_id")}
    if ids["pad_token_id"] is None:
        eos = ids["eos_token_id"]
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return ids


def genai_config(model: CachedCausalLM, graph_name: str, base: Path, contract: Contract) -> dict:
    config, layout = model.config, model.layout
    # the positions the model declares, within the bound the graph records (a sliding window's)
    context = min(filter(None, (declared_positions(config), contract.dim_limits.get(TOTAL))), default=None)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": graph_name,
        "head_size": layout.head_dim,
        "hidden_size": config.hidden_size,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": PAST.format("%d", "key"), "past_value_names": PAST.format("%d", "value")},
        "outputs": {"logits": "logits", "present_key_names": PRESENT.format("%d", "key"),
                    "present_value_names": PRESENT.format("%d", "value")},
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": layout.layers,
        "num_key_value_heads": layout.kv_heads,
    }
    model_type = config.model_type if config.model_type in GENAI_DECODERS else "llama"
    return {
        "model": {**_token_ids(base, config), "context_length": context, "decoder": decoder, "type": model_type,
                  "vocab_size": config.vocab_size},
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def stage_genai_files(model: CachedCausalLM, graph: Path, base: Path, contract: Contract, stage: Staging) -> list[Path]:
    """Stage ``genai_config.json`` and the base folder's tokenizer files beside ``graph``."""
    config_path = graph.with_name(GENAI_CONFIG)
    text = json.dumps(genai_config(model, graph.name, base, contract), indent=2)
    stage.path(config_path).write_text(text + "\n")
    return [config_path, *stage_tokenizer_files(graph, base, stage)]


def stage_tokenizer_files(graph: Path, base: Path, stage: Staging) -> list[Path]:
    """Stage the base folder's tokenizer files (``tokenizer.json``, …) beside ``graph``."""
    written = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file() and not same_file(base / name, graph.with_name(name)):  # graph in the base folder
            shutil.copyfile(base / name, stage.path(graph.with_name(name)))
            written.append(graph.with_name(name))
    return written

"""Module-wide exported graphs: each export traces a model once (~10 s) and many tests read it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import vera_models
from helpers import Exported, export_two_task_encoder, find_vera_layers
from vera_export import export
from vera_export._export import model_input_specs

warnings.filterwarnings("ignore", category=FutureWarning)


def _export(model, tmp_path_factory, name: str, inputs=None) -> Exported:
    out = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    specs = model_input_specs(model, inputs)
    result = export(model, out, inputs=inputs)
    return Exported(model, find_vera_layers(model), result, specs)


def _randomise_lambdas(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def peft_bert():
    from peft import VeraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    # query/value (64 -> 64) and intermediate.dense (64 -> 128): slices of different shapes
    model = get_peft_model(BertModel(config), VeraConfig(r=16, target_modules=["query", "value", "intermediate.dense"],
                                                         projection_prng_key=7))
    _randomise_lambdas(model, 3)
    return model.eval()


def peft_gpt2():
    from peft import VeraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    # Conv1D layers: c_attn (64 -> 192) and c_fc (64 -> 256)
    model = get_peft_model(GPT2LMHeadModel(config), VeraConfig(r=16, target_modules=["c_attn", "c_fc"],
                                                                fan_in_fan_out=True))
    _randomise_lambdas(model, 4)
    return model.eval()


# The real vocabularies: the graph's fixed overhead (~50 KB of nodes and names) is then well under 1%.
GPT_INPUTS = ["input_ids:int64<50257:batch=2,sequence=8"]
BERT_INPUTS = ["input_ids:int64<30522:batch=2,sequence=8", "attention_mask:int64<2:batch=2,sequence=8"]


@pytest.fixture(scope="session")
def encoder(tmp_path_factory) -> Exported:
    return _export(vera_models.make_task(vera_models.build("tiny-encoder"), 1), tmp_path_factory, "encoder")


@pytest.fixture(scope="session")
def two_task_encoder(tmp_path_factory) -> Path:
    """The tiny encoder with tasks 'first' and 'second', alone in its folder (tests write elsewhere)."""
    return export_two_task_encoder(tmp_path_factory.mktemp("two-tasks") / "encoder.onnx")


@pytest.fixture(scope="session")
def decoder(tmp_path_factory) -> Exported:
    return _export(vera_models.make_task(vera_models.build("tiny-decoder"), 2), tmp_path_factory, "decoder")


@pytest.fixture(scope="session")
def bert(tmp_path_factory) -> Exported:
    return _export(peft_bert(), tmp_path_factory, "bert", BERT_INPUTS)


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory) -> Exported:
    return _export(peft_gpt2(), tmp_path_factory, "gpt2", GPT_INPUTS)


@pytest.fixture(params=["encoder", "decoder", "bert", "gpt2"])
def exported(request) -> Exported:
    """Every exported model: ours (encoder, decoder) and PEFT's (BERT Linear, GPT-2 Conv1D)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """The Quick start's graph: real MiniLM weights, the two shipped adapters (test_minilm, test_js)."""
    from vera_export import export_peft
    from vera_models import minilm

    out = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    tasks = {name: minilm.HERE / name for name in minilm.TASKS}
    return export_peft(tasks, out, base=minilm.base_path()), minilm



class BertFolders(NamedTuple):
    root: Path
    base: Path  # a transformers BertModel folder
    first: Path  # a VeRA adapter over it (seed 1)
    second: Path  # another (seed 2)


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory) -> BertFolders:
    """A tiny BERT base folder and two VeRA adapter folders over it (PEFT save_pretrained)."""
    from peft_folders import make_adapter, make_base

    root = tmp_path_factory.mktemp("bert-folders")
    base = make_base(root / "base", "bert-features")
    return BertFolders(root, base, make_adapter(root / "first", base, "bert-features", seed=1),
                       make_adapter(root / "second", base, "bert-features", seed=2))


@pytest.fixture
def encoder_inputs(tmp_path) -> Path:
    """An example input of the tiny encoder, as vera-run reads it (``x.npz``)."""
    import numpy as np

    path = tmp_path / "x.npz"
    np.savez(path, **vera_models.example_input(vera_models.build("tiny-encoder")))
    return path

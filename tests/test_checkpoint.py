"""Loading model.pt: the checkpoint format and allowlisted pickles give back the same model."""

from __future__ import annotations

import subprocess
import sys

import torch

import vera_models
from vera_export import load_model, save_checkpoint


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids)["logits"]


def test_checkpoint_and_pickle_round_trip_exactly(tmp_path):
    model = vera_models.make_task(vera_models.build("tiny-decoder"), 3)
    ids = torch.randint(0, 8192, (2, 10))
    save_checkpoint(model, tmp_path / "ckpt.pt", task_name="poems")
    torch.save(model, tmp_path / "whole.pt")
    from_checkpoint = load_model(tmp_path / "ckpt.pt")
    from_pickle = load_model(tmp_path / "whole.pt")  # allowlisted classes: no --trust-pickle needed
    assert from_checkpoint.task_name == "poems"
    for loaded in (from_checkpoint.model, from_pickle.model):
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
        assert torch.equal(loaded.vera_projection.vera_A, model.vera_projection.vera_A)
    # the tied embedding stays tied after loading the checkpoint
    assert from_checkpoint.model.lm_head.weight is from_checkpoint.model.tokens.weight


def test_reference_models_are_deterministic():
    first = vera_models.make_task(vera_models.build("tiny-encoder", seed=4), 9).state_dict()
    second = vera_models.make_task(vera_models.build("tiny-encoder", seed=4), 9).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_runtime_imports_without_torch(encoder):
    """vera_runtime reads task files in a process where `import torch` fails."""
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import vera_runtime
task = vera_runtime.read_task({str(encoder.result.task_path)!r})
print(len(task.tensors), "torch" in sys.modules and sys.modules["torch"] is not None)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["8", "False"]

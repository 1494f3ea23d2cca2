"""Per-row tasks follow the batch row whatever the adapted layer's leading dimensions; a layout that
breaks them is named as such, never blamed on the tolerance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import max_relative_diff, run, session
from vera_export import VeraConfig, VeraExportError, apply_vera, export


class Flattening(nn.Module):
    """Flattens [batch, sequence, d] to batch-major [batch * sequence, d] around its layer, as OPT's fc1/fc2."""

    def __init__(self, seq_major: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)  # A and B over 128 bytes: never folded
        self.seq_major = seq_major  # [sequence, batch, d] instead: rows no longer follow the batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seq_major:
            return self.proj(x.transpose(0, 1)).transpose(0, 1)
        return self.proj(x.reshape(-1, x.shape[-1])).reshape(x.shape)

    def vera_input_specs(self) -> list[str]:
        return ["x:float32:batch=2,sequence=4,32"]


def _adapted(seq_major: bool) -> nn.Module:
    torch.manual_seed(0)
    model = Flattening(seq_major)
    apply_vera(model, VeraConfig(target_modules=["proj"], r=8))
    with torch.no_grad():
        model.proj.vera_lambda_b.copy_(torch.randn(32))  # trained: Λb = 0 would hide the adapter
    return model.eval()


def test_batch_major_flattened_layers_take_their_batch_rows_task(tmp_path):
    model = _adapted(seq_major=False)
    result = export(model, tmp_path / "m.onnx")
    checks = {check.name: check for check in result.verification.checks}
    assert checks["a task per row"].relative <= 1e-5
    sess = session(result.onnx_path)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    lam_b = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    feeds = {"x": x.numpy(), "proj.vera_lambda_b": lam_b.numpy(), "proj.vera_lambda_d": torch.ones(3, 8).numpy()}
    got = run(sess, feeds)["output"]
    for row in range(3):
        with torch.no_grad():
            model.proj.vera_lambda_b.copy_(lam_b[row])
            model.proj.vera_lambda_d.fill_(1.0)
            want = model(x[row : row + 1]).numpy()
        assert max_relative_diff({"o": got[row : row + 1]}, {"o": want}) <= 1e-5


def test_a_layout_that_breaks_per_row_tasks_is_named_and_nothing_is_written(tmp_path):
    with pytest.raises(VeraExportError) as error:
        export(_adapted(seq_major=True), tmp_path / "m.onnx")
    message = str(error.value)
    assert "only on 'a task per row'" in message
    assert "layout breaks per-row tasks" in message and "single-task runs are unaffected" in message
    assert "--tolerance" not in message
    assert list(tmp_path.iterdir()) == []



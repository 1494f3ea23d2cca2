"""Hardening: exports are all or nothing even when killed, untrusted files cannot take memory they do
not hold, and task files cannot be routed to a graph they do not belong to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import vera_models
from vera_export import save_checkpoint
from vera_export._checkpoint import FORMAT, VERSION
from vera_export.cli import main
from vera_runtime import VeraSession

_CLI = [sys.executable, "-m", "vera_export.cli"]


def _checkpoint(folder: Path, seed: int, name: str) -> Path:
    return save_checkpoint(vera_models.make_task(vera_models.build("tiny-encoder"), seed), folder / f"{name}.pt", name)


def _visible(folder: Path) -> dict[str, object]:
    """What a folder holds, by file name; task files by metadata and tensors (safetensors orders its
    metadata differently from one process to the next)."""
    from vera_runtime._taskfile import read_safetensors

    contents = {}
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if path.name.endswith(".task.safetensors"):
            metadata, tensors = read_safetensors(path)
            contents[path.name] = (metadata, {k: v.tobytes() for k, v in tensors.items()})
        else:
            contents[path.name] = path.read_bytes()
    return contents


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The files of an old export (two tasks) and of the new export that replaces it, each made once."""
    root = tmp_path_factory.mktemp("sets")
    models = root / "models"
    models.mkdir()
    old_model, topic, new_model = (
        _checkpoint(models, seed, name) for seed, name in ((1, "sentiment"), (2, "topic"), (3, "sentiment"))
    )
    old, new = root / "old", root / "new"
    for folder, model in ((old, old_model), (new, new_model)):
        folder.mkdir()
        assert CliRunner().invoke(main, [str(model), "--out", str(folder / "m.onnx")]).exit_code == 0
    assert CliRunner().invoke(main, ["task", str(topic), "--graph", str(old / "m.onnx")]).exit_code == 0
    return old, new, new_model


def _start(model: Path, out: Path, pause: str) -> subprocess.Popen:
    env = {**os.environ, "VERA_EXPORT_TEST_PAUSE": pause}
    process = subprocess.Popen([*_CLI, str(model), "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # wait until it stands where it will be killed
        if line.startswith("vera-export paused at"):
            return process
    raise AssertionError(f"the export never paused (exit {process.wait()})")


@pytest.mark.parametrize(("point", "sig", "expect"), [
    ("verify", signal.SIGKILL, "old"),  # killed while verifying: staged files stay behind, hidden
    ("verify", signal.SIGTERM, "old"),  # terminated: everything staged is removed at once
    ("publish:60", signal.SIGKILL, "new"),  # killed between renames: the journal finishes the set
    ("publish:2", signal.SIGTERM, "new"),  # SIGTERM waits for the renames, then ends the process
])
def test_a_killed_export_leaves_the_old_set_or_the_new_one(sets, tmp_path, point, sig, expect):
    old, new, model = sets
    for path in old.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    process = _start(model, tmp_path / "m.onnx", point)
    process.send_signal(sig)
    process.wait(timeout=120)
    VeraSession(tmp_path / "m.onnx", device="cpu")  # opening the graph finishes an interrupted publish
    assert _visible(tmp_path) == _visible(old if expect == "old" else new)
    if sig == signal.SIGTERM:
        assert not list(tmp_path.glob(".*")), "SIGTERM must leave no staged file"
    result = CliRunner().invoke(main, [str(model), "--out", str(tmp_path / "m.onnx"), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob(".*")), "the next export removes what a killed one staged"
    assert set(_visible(tmp_path)) == set(_visible(new))


def _peak_rss_of_loading(path: Path) -> tuple[str, float]:
    """Load ``path`` in a child process; its error message and its peak RSS in MB (VmHWM: unlike
    ru_maxrss, it does not inherit the parent's peak across fork and exec)."""
    code = (
        "import re\nfrom pathlib import Path\nfrom vera_export import VeraExportError, load_model\n"
        f"try:\n    load_model({str(path)!r})\n    print('loaded')\n"
        "except VeraExportError as exc:\n    print(exc)\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1]) / 1024)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = child.stdout.splitlines()
    assert len(lines) >= 2, child.stderr
    return lines[0], float(lines[-1])


class _Constructs:
    """Pickles as a call to an allowlisted constructor: nn.Linear(20000, 20000), 1.6 GB of weights."""

    def __reduce__(self):
        return nn.Linear, (20000, 20000)


def test_a_pickle_that_calls_a_constructor_is_refused_without_allocating(tmp_path):
    torch.save(_Constructs(), tmp_path / "model.pt")
    assert (tmp_path / "model.pt").stat().st_size < 2000
    message, peak = _peak_rss_of_loading(tmp_path / "model.pt")
    assert "builds 'weight' [20000, 20000] by calling a constructor instead of storing it" in message
    assert peak < 300, f"peak RSS {peak:.0f} MB"


def test_a_checkpoint_whose_config_declares_more_than_it_holds_is_refused_first(tmp_path):
    model = vera_models.build("tiny-encoder")
    checkpoint = {"format": FORMAT, "version": VERSION, "architecture": "tiny-encoder",
                  "config": {**vars(model.config), "vocab_size": 4_000_000},
                  "vera": {"target_modules": ["query", "value"], "r": 8}, "task": "x", "state_dict": {}}
    torch.save(checkpoint, tmp_path / "model.pt")
    message, peak = _peak_rss_of_loading(tmp_path / "model.pt")
    assert "declares 'tokens.weight' [4000000," in message and "but the file holds nothing" in message, message
    assert peak < 300, f"peak RSS {peak:.0f} MB"


def test_a_compressed_storage_is_refused_before_it_inflates(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(100_000_000)}}, plain)  # 400 MB of zeros
    packed = tmp_path / "model.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            with source.open(info) as data, target.open(info.filename, "w", force_zip64=True) as out:
                while chunk := data.read(1 << 24):
                    out.write(chunk)
    plain.unlink()
    assert packed.stat().st_size < 5_000_000
    message, peak = _peak_rss_of_loading(packed)
    assert "holds a compressed entry" in message and "torch.save never compresses" in message, message
    assert peak < 300, f"peak RSS {peak:.0f} MB"

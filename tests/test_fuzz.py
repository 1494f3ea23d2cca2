"""Fuzzed task files, .onnx_adapter files, PEFT adapter files and adapter_config.json: each load raises
TaskFileError or loads what the file held before the damage (native files by their digest, adapters by the
native file beside them); PEFT files, which have no digest, load finite values of the right shapes at
worst. The tasks already loaded keep giving the same outputs."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vera_runtime import TaskFileError, VeraSession

_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def _damaged(draw, data: bytes) -> bytes:
    """Bytes flipped, cut, inserted or overwritten, mostly near the header where the parsers look."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        limit = len(data) if draw(st.booleans()) else min(len(data), 256)
        at = draw(st.integers(0, max(limit - 1, 0)))
        action = draw(st.sampled_from(["flip", "cut", "insert", "digits"]))
        if action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + 4] = draw(st.sampled_from([b"9999", b"-1,0", b'"":[', b"NaN,", b"\x00\x00\x00\x00"]))
    return bytes(data)


class Fuzzed(NamedTuple):
    session: VeraSession
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]  # the outputs of the task every file below holds
    sources: dict[str, bytes]  # a valid file of each kind, to damage
    folder: Path
    native: Path  # the native task file, put beside a damaged adapter


@pytest.fixture(scope="module")
def files(bert, tmp_path_factory) -> Fuzzed:
    """A session with one task loaded, its reference output, and valid files of every kind to damage."""
    folder = tmp_path_factory.mktemp("fuzz")
    bert.model.save_pretrained(folder / "peft")
    session = VeraSession(bert.path, device="cpu")
    session.load_task("kept", bert.result.task_path)
    feeds = {"input_ids": np.arange(12, dtype=np.int64).reshape(2, 6), "attention_mask": np.ones((2, 6), np.int64)}
    sources = {
        "native": bert.result.task_path.read_bytes(),
        "adapter": bert.result.adapter_path.read_bytes(),
        "peft": (folder / "peft" / "adapter_model.safetensors").read_bytes(),
        "config": (folder / "peft" / "adapter_config.json").read_bytes(),
    }
    return Fuzzed(session, feeds, session.run(feeds, task="kept"), sources, folder, bert.result.task_path)


def _load_damaged(files: Fuzzed, kind: str, damaged: bytes, tmp_path) -> None:
    session = files.session
    folder = tmp_path / "case"
    folder.mkdir(exist_ok=True)
    if kind == "config":  # a PEFT file without A/B reads its seed and r from the config beside it
        from safetensors.numpy import load_file, save_file

        tensors = {k: v for k, v in load_file(files.folder / "peft" / "adapter_model.safetensors").items()
                   if not k.endswith(("vera_A", "vera_B"))}
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_bytes(damaged)
        path = folder / "adapter_model.safetensors"
    else:
        path = folder / {"native": "t.task.safetensors", "adapter": "t.onnx_adapter",
                         "peft": "adapter_model.safetensors"}[kind]
        path.write_bytes(damaged)
        if kind == "adapter":  # as exported: the native task file of the same name beside it
            (folder / "t.task.safetensors").write_bytes(files.native.read_bytes())
    try:
        session.load_task("fuzzed", path)
    except TaskFileError:
        pass
    else:
        got = session.run(files.feeds, task="fuzzed")
        session.unload_task("fuzzed")
        if kind in ("native", "adapter"):  # a digest guards them: what loads is what was written
            for key, value in got.items():
                np.testing.assert_array_equal(value, files.reference[key], err_msg=f"a damaged {kind} file loaded")
        else:  # PEFT files have no digest: a changed λ byte loads, but never NaN, Inf or a wrong shape
            assert all(np.isfinite(value).all() for value in got.values())
    assert session.tasks == ("kept",)
    for key, value in session.run(files.feeds, task="kept").items():
        np.testing.assert_array_equal(value, files.reference[key])


@pytest.mark.parametrize("kind", ["native", "adapter", "peft", "config"])
def test_damaged_files_raise_task_file_error_and_change_nothing(files, kind, tmp_path):
    @_SETTINGS
    @given(st.data())
    def check(data):
        _load_damaged(files, kind, data.draw(_damaged(files.sources[kind])), tmp_path)

    check()

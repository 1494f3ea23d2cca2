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


# The CLI in a child that stops at a point of the export (after verifying, or after the first rename of the
# publish), says so on stderr and sleeps, to be killed there: the fault injection lives here, not in the product.
_KILLABLE = """
import sys, time
point, _, seconds = sys.argv[1].partition(":")
def pause():
    print(f"vera-export paused at {point}", file=sys.stderr, flush=True)
    time.sleep(float(seconds or 60))
if point == "verify":
    import vera_export._export as export
    verify = export.verify_export
    def verify_then_pause(*args, **kwargs):
        result = verify(*args, **kwargs)
        pause()
        return result
    export.verify_export = verify_then_pause
else:
    import vera_runtime._publish as publish
    rename, renamed = publish._rename, []
    def rename_then_pause(*args):
        rename(*args)
        if not renamed:
            renamed.append(args)
            pause()
    publish._rename = rename_then_pause
from vera_export.cli import main
main(sys.argv[2:])
"""


def _start(model: Path, out: Path, pause: str) -> subprocess.Popen:
    command = [sys.executable, "-c", _KILLABLE, pause, str(model), "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # wait until it stands where it will be killed
        if line.startswith("vera-export paused at"):
            return process
    raise AssertionError(f"the export never paused (exit {process.wait()})")


@pytest.mark.parametrize(("point", "sig", "expect"), [
    pytest.param("verify", signal.SIGKILL, "old", marks=pytest.mark.slow),  # staged files stay behind, hidden
    pytest.param("verify", signal.SIGTERM, "old", marks=pytest.mark.slow),  # everything staged is removed at once
    pytest.param("publish:60", signal.SIGKILL, "new", marks=pytest.mark.slow),  # the journal finishes the set
    pytest.param("publish:2", signal.SIGTERM, "new", marks=pytest.mark.slow),  # SIGTERM waits for the renames
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


def _memory_of_loading(path: Path) -> tuple[str, float]:
    """Load ``path`` in a child process: its error message, and how far loading raised the process's peak
    RSS above what importing torch and vera-export had already taken, in MB. (VmHWM: unlike ru_maxrss, it
    does not inherit the parent's peak across fork and exec. Importing torch alone takes 218-275 MB
    here, depending on how its libraries are cached: the absolute peak is reported, the growth asserted.)"""
    code = (
        "import re\nfrom pathlib import Path\nimport vera_models\nfrom vera_export import VeraExportError, load_model\n"
        "def peak():\n    return int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1]) / 1024\n"
        "before = peak()\n"
        f"try:\n    load_model({str(path)!r})\n    print('loaded')\n"
        "except VeraExportError as exc:\n    print(exc)\n"
        "print(peak() - before, peak())\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = child.stdout.splitlines()
    assert len(lines) >= 2, child.stderr
    growth, peak = (float(x) for x in lines[-1].split())
    print(f"{path.name}: peak RSS {peak:.0f} MB, {growth:.1f} MB of it while loading")
    return lines[0], growth


class _Constructs:
    """Pickles as a call to an allowlisted constructor: nn.Linear(20000, 20000), 1.6 GB of weights."""

    def __reduce__(self):
        return nn.Linear, (20000, 20000)


def test_a_pickle_that_calls_a_constructor_is_refused_without_allocating(tmp_path):
    torch.save(_Constructs(), tmp_path / "model.pt")
    assert (tmp_path / "model.pt").stat().st_size < 2000
    message, growth = _memory_of_loading(tmp_path / "model.pt")
    assert "builds 'weight' [20000, 20000] by calling a constructor instead of storing it" in message
    assert growth < 32, f"loading took {growth:.0f} MB"


def test_a_checkpoint_whose_config_declares_more_than_it_holds_is_refused_first(tmp_path):
    model = vera_models.build("tiny-encoder")
    checkpoint = {"format": FORMAT, "version": VERSION, "architecture": "tiny-encoder",
                  "config": {**vars(model.config), "vocab_size": 4_000_000},
                  "vera": {"target_modules": ["query", "value"], "r": 8}, "task": "x", "state_dict": {}}
    torch.save(checkpoint, tmp_path / "model.pt")
    message, growth = _memory_of_loading(tmp_path / "model.pt")
    assert "declares 'tokens.weight' [4000000," in message and "but the file holds nothing" in message, message
    assert growth < 32, f"loading took {growth:.0f} MB"


@pytest.mark.slow
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
    message, growth = _memory_of_loading(packed)
    assert "holds a compressed entry" in message and "torch.save never compresses" in message, message
    assert growth < 32, f"loading took {growth:.0f} MB"


# -- task files cannot be misrouted ------------------------------------------------------------------------


def _strip_metadata(source: Path, target: Path, **changes) -> Path:
    """A copy of a native task file with metadata keys removed (None) or changed."""
    from safetensors.numpy import save_file

    from vera_runtime._taskfile import read_safetensors

    metadata, tensors = read_safetensors(source)
    for key, value in changes.items():
        key = key.replace("__", ".")
        metadata.pop(key) if value is None else metadata.__setitem__(key, value)
    save_file(tensors, target, metadata=metadata)
    return target


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": None}, "carries vera-export metadata but not format='vera-task'"),
    ({"vera__contract_version": "999"}, "follows task contract version '999'"),
])
def test_native_task_files_must_say_what_they_are(encoder, tmp_path, changes, message):
    from vera_runtime import TaskFileError

    path = _strip_metadata(encoder.result.task_path, tmp_path / "t.task.safetensors", **changes)
    session = VeraSession(encoder.path, device="cpu")
    with pytest.raises(TaskFileError, match=message):
        session.load_task("t", path)
    assert session.tasks == ()


def test_a_peft_file_without_projections_needs_its_adapter_config(bert, tmp_path):
    from safetensors.numpy import load_file, save_file

    from vera_runtime import TaskFileError

    bert.model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if not k.endswith(("vera_A", "vera_B"))}
    save_file(tensors, weights)
    session = VeraSession(bert.path, device="cpu")
    session.load_task("with-config", weights)  # seed and r checked against adapter_config.json
    config = tmp_path / "adapter" / "adapter_config.json"
    for text, message in ((b"", "is not valid JSON"), (b'{"r": 1', "is not valid JSON"),
                          (b"[1, 2]", "holds a JSON list, not an object"), (b"\xff\xfe", "is not valid JSON")):
        config.write_bytes(text)
        with pytest.raises(TaskFileError, match=message):
            session.load_task("bad", weights)
    config.unlink()
    with pytest.raises(TaskFileError, match="stores no A/B and has no adapter_config.json beside it"):
        session.load_task("bad", weights)
    assert session.tasks == ("with-config",)


def test_task_files_belong_to_a_graph_by_exact_stem(encoder, tmp_path):
    from vera_runtime._taskfile import task_files_beside

    for name in ("encoder.onnx", "encoder.v2.onnx"):
        (tmp_path / name).write_bytes(encoder.path.read_bytes())
    for name in ("encoder.a1", "encoder.v2.a1", "encoder.v2.b2"):
        (tmp_path / f"{name}.task.safetensors").write_bytes(encoder.result.task_path.read_bytes())
    assert list(task_files_beside(tmp_path / "encoder.onnx")) == ["a1"]
    assert list(task_files_beside(tmp_path / "encoder.v2.onnx")) == ["a1", "b2"]


@pytest.mark.parametrize("name", ["v2.a1", "topic\n", "", "x" * 65, "a b"])
def test_task_names_are_letters_digits_dash_underscore(name):
    from vera_runtime import TaskFileError
    from vera_runtime._taskfile import check_task_name

    with pytest.raises(TaskFileError, match="use 1-64 letters, digits, '_' or '-'"):
        check_task_name(name)


@pytest.mark.slow
def test_tasks_are_not_replaced_by_accident_and_reexports_replace_the_whole_set(sets, tmp_path):
    old, _, model = sets
    for path in old.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    graph = tmp_path / "m.onnx"
    topic = old.parent / "models" / "topic.pt"
    for task_name in ("topic", "sentiment"):  # an added task, and the graph's default task
        result = CliRunner().invoke(main, ["task", str(topic), "--graph", str(graph), "--task-name", task_name])
        assert result.exit_code == 1 and f"already has a task '{task_name}'" in result.stderr, result.output
        assert "--overwrite" in result.stderr
    result = CliRunner().invoke(main, ["task", str(topic), "--graph", str(graph), "--overwrite"])
    assert result.exit_code == 0, result.output
    legacy = tmp_path / ".m.onnx.k2j4_x9a.tmp"  # what vera-export 0.1.0 left when killed mid-export
    legacy.write_bytes(b"92 MB in real life")
    os.utime(legacy, (1, 1))
    result = CliRunner().invoke(main, [str(model), "--out", str(graph), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.sentiment.onnx_adapter",
                                                           "m.sentiment.task.safetensors"]  # no stale 'topic'
    result = CliRunner().invoke(main, ["task", str(topic), "--graph", str(graph)])
    assert result.exit_code == 0, result.output  # the README's commands run again as they did the first time


def test_duplicate_task_names_in_one_command_are_refused(bert_folders, tmp_path):
    base, first, second = bert_folders.base, bert_folders.first, bert_folders.second
    for extra in ([f"first={second}"], [f"a1={first}", f"a1={second}"]):
        args = [str(first), "--base", str(base), *[a for e in extra for a in ("--adapter", e)], "--out",
                str(tmp_path / "m.onnx")]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "is given twice" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


# -- a task over other base weights ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_task_trained_over_other_base_weights_is_refused(sets, tmp_path):
    """Same layout, other base weights (as cased vs uncased BERT): the task would give garbage."""
    from vera_runtime import TaskFileError

    other_base = vera_models.make_task(vera_models.build("tiny-encoder", seed=5), 2)
    other = save_checkpoint(other_base, tmp_path / "other.pt", "other")
    old, _, _ = sets
    result = CliRunner().invoke(main, ["task", str(other), "--graph", str(old / "m.onnx")])
    assert result.exit_code == 1 and "its base weights differ" in result.stderr, result.output
    (tmp_path / "own").mkdir()
    result = CliRunner().invoke(main, [str(other), "--out", str(tmp_path / "own" / "o.onnx"), "--no-verify"])
    assert result.exit_code == 0, result.output
    session = VeraSession(old / "m.onnx", device="cpu")
    with pytest.raises(TaskFileError, match="trained over other base weights"):
        session.load_task("other", tmp_path / "own" / "o.other.task.safetensors")
    with pytest.raises(TaskFileError, match="was made for another graph"):
        session.load_task("other", tmp_path / "own" / "o.other.onnx_adapter")


# -- one line for every bad path ---------------------------------------------------------------------------


def test_bad_model_paths_give_one_line_that_names_the_problem(tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop.pt")
    (tmp_path / "text.pt").write_text("not a model, just text\n" * 4)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "out").mkdir()
    cases = {
        "fifo.pt": "is not a regular file (a FIFO, socket or device)",
        "loop.pt": "is a symbolic link loop",
        "text.pt": "is not a readable PyTorch file (truncated, corrupt, or not saved by torch.save?)",
        "empty.pt": "is empty: save the model again",
        "missing.pt": "does not exist",
    }
    for name, message in cases.items():
        result = CliRunner().invoke(main, [str(tmp_path / name), "--out", str(tmp_path / "out" / "m.onnx")])
        lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], (name, result.output)
        assert "Traceback" not in result.output and "unexpected" not in result.output
    result = CliRunner().invoke(main, [str(tmp_path / "missing.pt"), "--out", str(tmp_path / "nowhere" / "m.onnx")])
    assert result.exit_code == 1 and "directory" in result.stderr and "does not exist" in result.stderr


def test_bad_adapter_configs_give_one_line(bert_folders, tmp_path):
    import shutil

    base, first = bert_folders.base, bert_folders.first
    broken = tmp_path / "broken"
    shutil.copytree(first, broken)
    for text, message in ((b"", "is not valid JSON"), (b'{"peft_type": "VERA"', "is not valid JSON"),
                          (b"[]", "holds a JSON list, not an object"), (b"\xff\xfe\x00", "is not valid JSON")):
        (broken / "adapter_config.json").write_bytes(text)
        result = CliRunner().invoke(main, [str(broken), "--base", str(base), "--out", str(tmp_path / "m.onnx")])
        assert result.exit_code == 1 and message in result.stderr and "unexpected" not in result.stderr, result.output
    result = CliRunner().invoke(main, [str(first), "--base", str(tmp_path / "no-base"), "--out",
                                       str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "base model folder" in result.stderr and "does not exist" in result.stderr


# -- failures while writing --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_leaves_nothing(sets, tmp_path):
    """RLIMIT_FSIZE makes every write past 256 KB fail as a full disk would (EFBIG instead of ENOSPC)."""
    import resource

    _, _, model = sets

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    result = subprocess.run([*_CLI, str(model), "--out", str(tmp_path / "m.onnx")], capture_output=True, text=True,
                            preexec_fn=small_files, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert f"cannot write {tmp_path / 'm.onnx'}: File too large" in errors[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_blocked_task_path_in_a_multi_task_export_writes_nothing(bert_folders, tmp_path):
    base, first, second = bert_folders.base, bert_folders.first, bert_folders.second
    (tmp_path / "m.second.task.safetensors").mkdir()  # in the way of the second task's file
    result = CliRunner().invoke(main, [str(first), "--base", str(base), "--adapter", f"second={second}", "--out",
                                       str(tmp_path / "m.onnx"), "--no-verify"])
    assert result.exit_code == 1 and "m.second.task.safetensors: a directory is in the way" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.second.task.safetensors"]

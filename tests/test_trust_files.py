"""Trust boundaries for files (issue 17): a model folder made by someone else never touches files outside
it, never takes memory it does not hold, and never changes results silently. Each test is an attack
file and what must hold: nothing outside the folder touched, memory bound, state intact, the error."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from vera_export.cli import main as export_main
from vera_runtime import ContractError, FeedError, GraphError, JournalError, TaskFileError, VeraSession
from vera_runtime._publish import journal_path
from vera_runtime.cli import main as run_main

# -- helpers ----------------------------------------------------------------------------------------------


def _snapshot(*folders: Path) -> dict[str, bytes | str]:
    """Every entry under ``folders``: file bytes, link targets, and folders by name."""
    seen: dict[str, bytes | str] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink():
                seen[str(path)] = f"-> {os.readlink(path)}"
            elif path.is_file():
                seen[str(path)] = path.read_bytes()
            else:
                seen[str(path)] = "dir"
    return seen


def _peak_growth(code: str) -> tuple[str, float]:
    """Run ``code`` (which sets ``result``) in a child process: its result and how far it raised the
    process's peak RSS (VmHWM) above what the imports had taken, in MB."""
    program = (
        "import re\nfrom pathlib import Path\nimport vera_runtime\n"
        "def peak():\n    return int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1]) / 1024\n"
        "before = peak()\ntry:\n" + "".join(f"    {line}\n" for line in code.splitlines())
        + "except Exception as exc:\n    result = f'{type(exc).__name__}: {exc}'\n"
        "print(result)\nprint(peak() - before)\n"
    )
    child = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    lines = child.stdout.splitlines()
    assert len(lines) >= 2, child.stderr
    return "\n".join(lines[:-1]), float(lines[-1])


@pytest.fixture
def folder(two_task_encoder, tmp_path) -> Path:
    """A copy of the two-task encoder's folder (graph, task files) and a victim file outside it."""
    target = tmp_path / "model"
    shutil.copytree(two_task_encoder.parent, target)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.txt").write_text("precious\n")
    return target


def _edit_metadata(graph: Path, **changes) -> Path:
    """Rewrite a graph's metadata in place: keys set to a value, or removed with None."""
    proto = onnx.load(str(graph))
    metadata = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        key = key.replace("__", ".")
        metadata.pop(key, None) if value is None else metadata.__setitem__(key, value)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(graph))
    return graph


# -- 1. the publish journal --------------------------------------------------------------------------------


def _forged_journals(folder: Path) -> dict[str, str | bytes]:
    victim = folder.parent / "outside" / "victim.txt"
    staged = ".encoder.onnx.4242.abcdef12.vera-tmp"
    plan = {"version": 2, "renames": [], "remove": []}
    return {
        "absolute path removed": json.dumps({**plan, "remove": [str(victim)]}),
        "dot-dot path removed": json.dumps({**plan, "remove": ["../outside/victim.txt"]}),
        "rename onto a file outside": json.dumps({**plan, "renames": [[staged, str(victim)]]}),
        "a name not the graph's": json.dumps({**plan, "remove": ["notes.txt"]}),
        "a source not staged for its name": json.dumps({**plan, "renames": [["payload.bin", "encoder.onnx"]]}),
        "the 0.1 format with paths": json.dumps({"renames": [[str(folder / "payload.bin"), str(victim)]],
                                                 "remove": [str(victim)]}),
        "nested 5,000 deep": "[" * 5000 + "]" * 5000,
        "2 MB long": json.dumps({**plan, "remove": ["encoder.first.task.safetensors"] * 70_000}),
        "not JSON": b"\xff\xfe{",
    }


@pytest.mark.parametrize("case", list(_forged_journals(Path("/x/model"))))
def test_a_forged_journal_is_refused_whole_and_touches_nothing(folder, case):
    (folder / "payload.bin").write_text("attacker's bytes\n")
    (folder / "notes.txt").write_text("the user's notes\n")
    journal = _forged_journals(folder)[case]
    journal_path(folder / "encoder.onnx").write_bytes(journal.encode() if isinstance(journal, str) else journal)
    before = _snapshot(folder, folder.parent / "outside")
    with pytest.raises(JournalError, match=r"\.encoder\.onnx\.vera-publish is not a publish journal") as error:
        VeraSession(folder / "encoder.onnx", device="cpu")
    assert "nothing was changed" in str(error.value)
    result = CliRunner().invoke(export_main, ["inspect", str(folder / "encoder.onnx")])  # read-only: reports it
    assert result.exit_code == 0 and "records an export interrupted" in result.output, result.output
    assert _snapshot(folder, folder.parent / "outside") == before


def test_a_staged_file_that_links_outside_is_never_moved(folder, checkpoint):
    victim = folder.parent / "outside" / "victim.txt"
    staged = folder / ".encoder.onnx.4242.abcdef12.vera-tmp"
    staged.symlink_to(victim)
    plan = {"version": 2, "renames": [[staged.name, "encoder.onnx"]], "remove": ["encoder.second.task.safetensors"]}
    journal_path(folder / "encoder.onnx").write_text(json.dumps(plan))
    before = _snapshot(folder, folder.parent / "outside")
    with pytest.raises(JournalError, match="is not a regular file"):
        VeraSession(folder / "encoder.onnx", device="cpu")
    result = CliRunner().invoke(export_main, ["task", str(checkpoint), "--graph", str(folder / "encoder.onnx"),
                                              "--task-name", "third"])  # a writer refuses it too
    assert result.exit_code == 1 and "is not a publish journal" in result.stderr, result.output
    assert _snapshot(folder, folder.parent / "outside") == before


def test_a_journal_that_is_a_link_is_refused(folder):
    victim = folder.parent / "outside" / "victim.txt"
    journal_path(folder / "encoder.onnx").symlink_to(victim)
    before = _snapshot(folder, folder.parent / "outside")
    with pytest.raises(JournalError, match="it is not a regular file"):
        VeraSession(folder / "encoder.onnx", device="cpu")
    assert _snapshot(folder, folder.parent / "outside") == before


def test_read_only_commands_never_finish_a_journal(folder, capsys):
    """A journal an export really wrote (a rename of its own staged file): inspect and vera-run tasks
    report it and change nothing; a VeraSession finishes it."""
    staged = folder / ".encoder.onnx.4242.abcdef12.vera-tmp"
    shutil.copy(folder / "encoder.onnx", staged)
    plan = {"version": 2, "renames": [[staged.name, "encoder.onnx"]], "remove": ["encoder.second.task.safetensors"]}
    journal_path(folder / "encoder.onnx").write_text(json.dumps(plan))
    before = _snapshot(folder)
    assert CliRunner().invoke(export_main, ["inspect", str(folder / "encoder.onnx")]).exit_code == 0
    assert run_main(["tasks", str(folder / "encoder.onnx")]) == 0
    assert "records an export interrupted" in capsys.readouterr().out
    assert _snapshot(folder) == before
    VeraSession(folder / "encoder.onnx", device="cpu")
    assert not staged.exists() and not journal_path(folder / "encoder.onnx").exists()
    assert not (folder / "encoder.second.task.safetensors").exists()


# -- 3. task files declaring what the graph does not take -----------------------------------------------


def _sparse_extra_tensor(source: Path, target: Path, gib: float = 1.5) -> Path:
    """``source`` plus one declared tensor of ``gib`` GiB whose bytes are a hole in the file (sparse)."""
    from vera_runtime._header import read_header

    header = read_header(source)
    raw = json.loads(source.read_bytes()[8 : header.data_start])
    data = source.read_bytes()[header.data_start :]
    extra = int(gib * (1 << 30)) // 4 * 4
    raw["zz.extra"] = {"dtype": "F32", "shape": [extra // 4], "data_offsets": [len(data), len(data) + extra]}
    text = json.dumps(raw).encode()
    text += b" " * (-len(text) % 8)
    with open(target, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + data)
        handle.truncate(8 + len(text) + len(data) + extra)
    return target


@pytest.mark.parametrize("loader", ["load_task", "load_tasks_beside"])
def test_a_task_file_with_a_huge_extra_tensor_is_refused_before_it_is_read(folder, loader):
    graph = folder / "encoder.onnx"
    if loader == "load_task":
        attack = _sparse_extra_tensor(folder / "encoder.first.task.safetensors", folder / "attack.task.safetensors")
        code = f"s = vera_runtime.VeraSession({str(graph)!r}, device='cpu')\ns.load_task('x', {str(attack)!r})\n"
    else:
        attack = folder / "encoder.second.task.safetensors"
        _sparse_extra_tensor(attack, attack)
        code = f"s = vera_runtime.VeraSession({str(graph)!r}, device='cpu')\ns.load_tasks_beside()\n"
    assert attack.stat().st_size > 1.5 * (1 << 30) and attack.stat().st_blocks * 512 < 1 << 20
    message, growth = _peak_growth(code + "result = 'loaded'")
    assert "TaskFileError" in message and "unknown ['zz.extra'] tensors" in message, message
    assert growth < 32, f"refusing it took {growth:.0f} MB"


def test_an_oversized_adapter_is_refused_before_it_is_read(folder):
    attack = folder / "attack.onnx_adapter"
    with open(attack, "wb") as handle:
        handle.write((folder / "encoder.first.onnx_adapter").read_bytes())
        handle.truncate(3 << 30)  # 3 GiB, sparse
    session = VeraSession(folder / "encoder.onnx", device="cpu")
    with pytest.raises(TaskFileError, match="more than an adapter of this graph can be"):
        session.load_task("x", attack)
    assert session.tasks == ()


# -- 4. a changed byte is refused ------------------------------------------------------------------------


def test_no_bit_flip_in_a_task_file_loads_other_values(folder):
    """300 random single-bit flips each in the native task file and in the .onnx_adapter beside it: every
    damaged file is refused, or loads a task whose outputs are exactly the original's (a flip in its name,
    say), never other values. (Before digests, 42-45% of such flips loaded other values.)"""
    session = VeraSession(folder / "encoder.onnx", device="cpu")
    session.load_task("first", folder / "encoder.first.task.safetensors")
    feeds = {"input_ids": np.arange(12, dtype=np.int64).reshape(2, 6) % 50, "attention_mask": np.ones((2, 6), np.int64)}
    truth = session.run(feeds, task="first")
    rng = random.Random(17)
    counts = {"refused": 0, "same values": 0}
    for suffix in (".task.safetensors", ".onnx_adapter"):
        path = folder / f"encoder.first{suffix}"
        original = path.read_bytes()
        for _ in range(300):
            data = bytearray(original)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
            try:
                session.load_task("flipped", path)
            except TaskFileError:
                counts["refused"] += 1
                continue
            got = session.run(feeds, task="flipped")
            assert all(np.array_equal(got[k], truth[k]) for k in truth), f"a flip in {path.name} loaded other values"
            counts["same values"] += 1
        path.write_bytes(original)
    print(counts)
    assert counts["refused"] > counts["same values"]


def test_a_task_file_without_its_digest_is_refused(folder):
    from safetensors.numpy import save_file

    from vera_runtime._taskfile import KEY_DIGEST, read_safetensors

    metadata, tensors = read_safetensors(folder / "encoder.first.task.safetensors")
    del metadata[KEY_DIGEST]
    save_file(tensors, folder / "old.task.safetensors", metadata=metadata)
    with pytest.raises(TaskFileError, match="carries no digest of its tensors"):
        VeraSession(folder / "encoder.onnx", device="cpu").load_task("old", folder / "old.task.safetensors")


# -- 5. an output never replaces an input --------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import vera_models
    from vera_export import save_checkpoint

    folder = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(vera_models.make_task(vera_models.build("tiny-encoder"), 1), folder / "model.pt", "t")


@pytest.mark.parametrize("how", ["same path", "symbolic link", "hard link", "other spelling"])
def test_an_export_never_replaces_its_own_input(checkpoint, tmp_path, how):
    model = tmp_path / "model.pt"
    shutil.copy(checkpoint, model)
    (tmp_path / "sub").mkdir()
    out = {"same path": model, "symbolic link": tmp_path / "link.onnx", "hard link": tmp_path / "hard.onnx",
           "other spelling": tmp_path / "sub" / ".." / "model.pt"}[how]
    if how == "symbolic link":
        out.symlink_to(model)
    elif how == "hard link":
        os.link(model, out)
    before = model.read_bytes()
    result = CliRunner().invoke(export_main, [str(model), "--out", str(out), "--no-verify"])
    assert result.exit_code == 1 and "an input of this command" in result.stderr, result.output
    assert model.read_bytes() == before


@pytest.mark.parametrize("how", ["same path", "symbolic link", "hard link"])
def test_vera_run_never_replaces_its_input(two_task_encoder, encoder_inputs, tmp_path, capsys, how):
    inputs = encoder_inputs
    out = {"same path": inputs, "symbolic link": tmp_path / "l.npz", "hard link": tmp_path / "h.npz"}[how]
    if how == "symbolic link":
        out.symlink_to(inputs)
    elif how == "hard link":
        os.link(inputs, out)
    before = inputs.read_bytes()
    assert run_main(["run", str(two_task_encoder), "--input", str(inputs), "--out", str(out)]) == 1
    assert "an input of this command" in capsys.readouterr().err
    assert inputs.read_bytes() == before


def test_convert_never_replaces_its_source(two_task_encoder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(two_task_encoder.parent, folder)
    (folder / "web.onnx").symlink_to(folder / "encoder.onnx")
    before = _snapshot(folder)
    result = CliRunner().invoke(export_main, ["convert", str(folder / "encoder.onnx"), "--to", "web", "--out",
                                              str(folder / "web.onnx")])
    assert result.exit_code == 1 and "an input of this command" in result.stderr, result.output
    assert _snapshot(folder) == before


# -- 6. the hot template is trusted by its content ---------------------------------------------------------


@pytest.fixture(scope="module")
def hot_pair(tmp_path_factory):
    """Two graphs exported with hot templates: the tiny decoder over two different base seeds."""
    import vera_models
    from vera_export import export

    graphs = []
    for seed in (5, 6):
        out = tmp_path_factory.mktemp(f"hot{seed}") / "decoder.onnx"
        export(vera_models.make_task(vera_models.build("tiny-decoder", seed=seed), seed), out, hot_template=True,
               task_name="default")
        graphs.append(out)
    return graphs


def _external_length(tensor) -> int:
    return int(next(entry.value for entry in tensor.external_data if entry.key == "length"))


def _untrusted_template(mine: Path, other: Path, folder: Path, how: str) -> Path:
    """A copy of ``mine``'s folder whose hot template was edited, replaced by ``other``'s, or not recorded."""
    shutil.copytree(mine.parent, folder)
    template = folder / "decoder.hot.onnx"
    if how == "edited":  # weights +5: what a tampered template served silently from the 9th call on
        proto = onnx.load(str(template), load_external_data=False)
        floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                  and t.data_location == onnx.TensorProto.EXTERNAL]  # the weights are in its .data
        where = {entry.key: entry.value for entry in max(floats, key=_external_length).external_data}
        with open(template.parent / where["location"], "r+b") as data:
            data.seek(int(where["offset"]))
            weights = np.frombuffer(data.read(int(where["length"])), np.float32)
            data.seek(int(where["offset"]))
            data.write((weights + 5).astype(np.float32).tobytes())
    elif how == "from another graph":
        for name in ("decoder.hot.onnx", "decoder.hot.onnx.data"):
            shutil.copy(other.parent / name, folder / name)
    else:  # a graph that records no digest (exported before vera-export checked templates)
        _edit_metadata(folder / "decoder.onnx", vera__hot_template_sha256=None)
    return folder / "decoder.onnx"


@pytest.mark.parametrize("how", ["edited", "from another graph", "no digest recorded"])
@pytest.mark.slow
def test_an_untrusted_hot_template_is_never_served(hot_pair, tmp_path, how):
    graph = _untrusted_template(*hot_pair, tmp_path / "m", how)
    session = VeraSession(graph, device="cpu", hot_tasks=1)
    session.load_tasks_beside()
    feeds = {"input_ids": np.arange(8, dtype=np.int64)[None] % 100}
    factored = session.run(feeds, task="default")["logits"]
    with pytest.warns(RuntimeWarning, match="is not used"):
        with pytest.raises(GraphError, match="is not used"):
            session.specialize("default")
    for _ in range(40):  # streaks of 8 never schedule a build again, and nothing is served from it
        np.testing.assert_array_equal(session.run(feeds, task="default")["logits"], factored)
    assert session.hot == ()


@pytest.mark.slow
def test_a_trusted_hot_template_is_still_served(hot_pair):
    session = VeraSession(hot_pair[0], device="cpu", hot_tasks=1)
    session.load_tasks_beside()
    session.specialize("default").result()
    assert session.hot == ("default",)


# -- 8. graph metadata and JSON files -------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "message"), [
    ("vera__layers", "[" * 3000 + "]" * 3000, "'vera.layers' it is nested deeper"),
    ("vera__layers", '[{"name":"a","in_features":-4,"out_features":8}]', "'in_features' = -4"),
    ("vera__layers", '[{"name":"a","in_features":"64","out_features":8}]', "'in_features' = 64 for a, not an"),
    ("vera__layers", '[{"name":"a","in_features":99999999999,"out_features":8}]', "not an integer in [1, 16,777,216]"),
    ("vera__fingerprint", "", "'vera.fingerprint' is '', not a SHA-256"),
    ("vera__r", "-3", "'vera.r' is '-3', not an integer in [1, 65536]"),
    ("vera__input_highs", '{"input_ids": true}', "'vera.input_highs' gives 'input_ids' the value True"),
    ("vera__dim_limits", '{"sequence": -1}', "'vera.dim_limits' gives 'sequence' the value -1"),
    ("vera__default_task", "\x1b[2Jx", "'vera.default_task' is not a printable string"),
    ("vera__default_task", "a.b", "'vera.default_task' is 'a.b', not a task name"),
    ("vera__projection_recipe", "ok\x1b]0;owned\x07", "'vera.projection_recipe' is not a printable string"),
])
def test_malformed_metadata_is_refused_when_the_session_is_built(folder, key, value, message):
    graph = _edit_metadata(folder / "encoder.onnx", **{key: value})
    with pytest.raises(ContractError, match="has malformed vera metadata") as error:
        VeraSession(graph, device="cpu")
    assert message in str(error.value), str(error.value)


def test_a_huge_layer_table_is_refused_with_bounded_memory(folder):
    layers = [{"name": f"layer.{i}." + "x" * 200, "in_features": 8, "out_features": 8} for i in range(200_000)]
    graph = _edit_metadata(folder / "encoder.onnx", vera__layers=json.dumps(layers))
    assert graph.stat().st_size > 41_000_000
    message, growth = _peak_growth(f"vera_runtime.VeraSession({str(graph)!r}, device='cpu')\nresult = 'built'")
    assert "'vera.layers' is longer than" in message, message
    print(f"refusing 41+ MB of layer metadata raised the peak RSS by {growth:.0f} MB")
    assert growth < 300, f"{growth:.0f} MB"  # 849 MB before the bound


def test_deeply_nested_json_files_give_the_project_error(folder, tmp_path):
    from vera_runtime._generate import TokenIds
    from vera_runtime._jsonio import read_adapter_config

    deep = "[" * 5000 + "]" * 5000
    (tmp_path / "adapter_config.json").write_text(deep)
    with pytest.raises(ValueError, match="nested deeper than"):
        read_adapter_config(tmp_path / "adapter_config.json")
    (tmp_path / "genai_config.json").write_text(deep)
    assert TokenIds.beside(tmp_path / "model.onnx") == TokenIds()  # ignored, as any unreadable config


def test_a_huge_config_file_is_refused_before_it_is_read(tmp_path):
    """A 2 GiB (sparse) adapter_config.json or genai_config.json is refused from its size alone."""
    from vera_runtime._generate import TokenIds
    from vera_runtime._jsonio import read_adapter_config

    for name in ("adapter_config.json", "genai_config.json"):
        with open(tmp_path / name, "wb") as handle:
            handle.write(b'{"model": {"eos_token_id": 7}, "pad": "')
            handle.truncate(2 << 30)
    with pytest.raises(ValueError, match="2,147,483,648 bytes, more than the 1,048,576 such a file takes"):
        read_adapter_config(tmp_path / "adapter_config.json")
    assert TokenIds.beside(tmp_path / "model.onnx") == TokenIds()


# -- 9. the terminal -------------------------------------------------------------------------------------


def test_strings_from_files_are_escaped_when_printed(folder, capsys):
    from safetensors.numpy import save_file

    from vera_runtime._taskfile import read_safetensors

    metadata, tensors = read_safetensors(folder / "encoder.first.task.safetensors")
    save_file(tensors, folder / "encoder.first.task.safetensors", metadata={**metadata, "vera.task": "\x1b[2Jowned"})
    assert run_main(["tasks", str(folder / "encoder.onnx")]) == 0
    out = capsys.readouterr().out
    assert "\\x1b[2Jowned" in out and "\x1b" not in out
    proto = onnx.load(str(folder / "encoder.onnx"))  # an output name that would retitle the terminal
    old, new = proto.graph.output[0].name, "logits\x1b]0;owned\x07"
    proto.graph.output[0].name = new
    for node in proto.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    onnx.save(proto, str(folder / "encoder.onnx"))
    result = CliRunner().invoke(export_main, ["inspect", str(folder / "encoder.onnx")])
    assert result.exit_code == 0 and "logits\\x1b]0;owned\\x07" in result.output and "\x1b" not in result.output


# -- 12. messages that name what happened --------------------------------------------------------------


def test_external_data_outside_the_folder_is_named(folder, capsys):
    proto = onnx.load(str(folder / "encoder.onnx"))
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    onnx.external_data_helper.set_external_data(tensor, location="../outside/victim.txt")
    tensor.ClearField("raw_data")
    onnx.save(proto, str(folder / "encoder.onnx"))
    assert run_main(["tasks", str(folder / "encoder.onnx")]) == 1
    err = capsys.readouterr().err
    assert "ONNX Runtime cannot load" in err and "unexpected" not in err, err


def test_feeds_in_another_byte_order_or_masked_are_named(two_task_encoder):
    session = VeraSession(two_task_encoder, device="cpu")
    ids = np.ones((1, 4), np.int64)
    with pytest.raises(FeedError, match=r"big-endian byte order \('>i8'\).*astype\('<i8'\)"):
        session.run({"input_ids": ids.astype(">i8"), "attention_mask": ids})
    with pytest.raises(FeedError, match=r"is a masked array.*filled"):
        session.run({"input_ids": np.ma.masked_array(ids, mask=ids == 0), "attention_mask": ids})
    for mask in (-5, 2**62):
        with pytest.raises(FeedError, match=f"'attention_mask' holds {mask}; a mask holds 0"):
            session.run({"input_ids": ids, "attention_mask": ids * mask})


def test_an_output_that_cannot_be_written_is_named(two_task_encoder, encoder_inputs, capsys):
    assert run_main(["run", str(two_task_encoder), "--input", str(encoder_inputs), "--out", "/proc/x.npz"]) == 1
    err = capsys.readouterr().err
    assert "cannot use /proc/x.npz" in err and "unexpected" not in err, err

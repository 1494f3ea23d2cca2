"""TaskBank (issue 19, the library and VeraSession): many tasks of one graph in one mapped, append-only
file, on the tiny encoder: runs from the bank equal the same tasks loaded from files, per call and per row;
adds and removals while threads run; a writer killed mid-add; a flipped byte; another process's view."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import export_two_task_encoder
from vera_runtime import BankError, FeedError, Task, TaskBank, TaskFileError, VeraSession, write_task

BANK_TASKS = 10_000


def _random_task(shapes: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * 0.5).astype(np.float32) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    return export_two_task_encoder(tmp_path_factory.mktemp("bank") / "encoder.onnx")


@pytest.fixture(scope="module")
def big_bank(graph, tmp_path_factory) -> Path:
    """10,000 tasks drawn from their index as seed (task i: 'user<i>')."""
    session = VeraSession(graph, device="cpu")
    path = tmp_path_factory.mktemp("big") / "tasks.bank"
    bank = TaskBank.create(path, session)
    shapes = session.contract.task_shapes()
    for i in range(BANK_TASKS):
        bank.add(f"user{i}", _random_task(shapes, i))
    return path


def _filled_bank(graph: Path, path: Path, count: int) -> tuple[TaskBank, dict]:
    """A bank at ``path`` with tasks t0 … t<count-1> (task i drawn from seed i), and the task shapes."""
    bank = TaskBank.create(path, VeraSession(graph, device="cpu"))
    shapes = bank.contract.task_shapes()
    for i in range(count):
        bank.add(f"t{i}", _random_task(shapes, i))
    return bank, shapes


def _feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 100, (batch, 8)), "attention_mask": np.ones((batch, 8), np.int64)}


def test_bank_tasks_equal_the_same_tasks_loaded_from_files_per_call_and_per_row(graph, big_bank, tmp_path):
    banked = VeraSession(graph, device="cpu", bank=big_bank)
    loaded = VeraSession(graph, device="cpu")
    contract = loaded.contract
    chosen = [f"user{i}" for i in np.random.default_rng(1).choice(BANK_TASKS, 8, replace=False)]
    for name in chosen:
        task = Task(name, contract.fingerprint, _random_task(contract.task_shapes(), int(name[4:])),
                    contract.base_digest)
        loaded.load_task(name, write_task(tmp_path / f"encoder.{name}.task.safetensors", task))
    assert len(TaskBank(big_bank)) == BANK_TASKS and banked.tasks == ()  # nothing loaded: all from the bank
    feeds = _feeds(8)
    for name in chosen:
        np.testing.assert_array_equal(banked.run(feeds, task=name)["logits"], loaded.run(feeds, task=name)["logits"])
    per_row = banked.run(feeds, tasks=chosen)["logits"]
    np.testing.assert_array_equal(per_row, loaded.run(feeds, tasks=chosen)["logits"])
    alone = [banked.run({k: v[i:i + 1] for k, v in feeds.items()}, task=name)["logits"][0]
             for i, name in enumerate(chosen)]
    np.testing.assert_allclose(per_row, np.stack(alone), rtol=1e-5, atol=1e-6)
    assert not np.allclose(per_row[0], banked.run(feeds, task=chosen[1])["logits"][0])  # tasks differ


def test_a_name_in_neither_place_says_both(graph, big_bank):
    with pytest.raises(FeedError, match=r"task 'nobody' is not loaded nor in the bank .*tasks.bank"):
        VeraSession(graph, device="cpu", bank=big_bank).run(_feeds(1), task="nobody")


def test_a_bank_of_another_graph_is_refused(big_bank, tmp_path):
    import vera_models
    from vera_export import export

    other = tmp_path / "decoder.onnx"
    export(vera_models.make_task(vera_models.build("tiny-encoder", seed=7), 1), other)
    with pytest.raises(BankError, match=r"is a bank for another graph"):
        VeraSession(other, device="cpu", bank=big_bank)


def test_sources_are_checked_and_a_bad_one_changes_nothing(graph, tmp_path):
    session = VeraSession(graph, device="cpu")
    bank = TaskBank.create(tmp_path / "b.bank", session)
    bank.add("first", graph.with_name("encoder.first.task.safetensors"))
    bank.add("adapter", graph.with_name("encoder.second.onnx_adapter"))
    size = bank.path.stat().st_size
    shapes = session.contract.task_shapes()
    bad = _random_task(shapes, 0)
    bad[next(iter(bad))] = bad[next(iter(bad))][:-1]
    with pytest.raises(TaskFileError, match=r"the tensors given: tensor '.*' is float32\[63\], the graph needs"):
        bank.add("bad", bad)
    with pytest.raises(TaskFileError):
        bank.add("nan", {**_random_task(shapes, 0), next(iter(shapes)): np.full(shapes[next(iter(shapes))], np.nan,
                                                                                 np.float32)})
    assert bank.path.stat().st_size == size and bank.names() == ["adapter", "first"]
    session.load_task("second", graph.with_name("encoder.second.task.safetensors"))
    from_bank = VeraSession(graph, device="cpu", bank=bank.path).run(_feeds(2), task="adapter")["logits"]
    np.testing.assert_array_equal(from_bank, session.run(_feeds(2), task="second")["logits"])


def test_adds_and_removals_while_eight_threads_run(graph, tmp_path):
    session = VeraSession(graph, device="cpu")
    shapes = session.contract.task_shapes()
    bank = TaskBank.create(tmp_path / "b.bank", session)
    stable = [f"s{i}" for i in range(16)]
    for i, name in enumerate(stable):
        bank.add(name, _random_task(shapes, i))
    banked = VeraSession(graph, device="cpu", bank=bank.path)
    feeds = _feeds(4)
    expected = {name: banked.run(feeds, task=name)["logits"] for name in stable}
    errors, stop = [], threading.Event()

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            rows = [stable[i] for i in rng.integers(0, len(stable), 4)]
            got = banked.run(feeds, tasks=rows)["logits"]
            for row, name in enumerate(rows):
                if not np.allclose(got[row], expected[name][row], rtol=1e-5, atol=1e-6):
                    errors.append(f"row {row} of {rows}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for i in range(200):  # meanwhile: other tasks come and go, one compaction
        bank.add(f"t{i}", _random_task(shapes, 100 + i))
        if i % 2:
            bank.remove(f"t{i - 1}")
        if i == 100:
            bank.compact()
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(TaskBank(bank.path)) == 16 + 100 and "t199" in bank and "t198" not in bank


_ADDER = textwrap.dedent("""
    import sys, numpy as np
    from vera_runtime import TaskBank
    bank = TaskBank(sys.argv[1])
    shapes = bank.contract.task_shapes()
    print("ready", flush=True)
    i = 0
    while True:
        bank.add(f"k{i}", {n: np.full(s, i, np.float32) for n, s in shapes.items()})
        i += 1
""")


def test_a_writer_killed_mid_add_leaves_the_bank_as_before_or_with_the_task(graph, tmp_path):
    bank = TaskBank.create(tmp_path / "b.bank", VeraSession(graph, device="cpu"))
    for attempt in range(5):
        adder = subprocess.Popen([sys.executable, "-c", _ADDER, str(bank.path)], stdout=subprocess.PIPE, text=True)
        assert adder.stdout.readline().strip() == "ready"
        time.sleep(0.2 + 0.07 * attempt)
        os.kill(adder.pid, signal.SIGKILL)
        adder.wait()
        reopened = TaskBank(bank.path)
        for name in reopened.names(prefix="k"):  # every task it lists is whole and holds what was added
            assert np.all(reopened.row(name) == float(name[1:])), name
        zeros = {n: np.zeros(s, np.float32) for n, s in reopened.contract.task_shapes().items()}
        reopened.add(f"after{attempt}", zeros)
        assert f"after{attempt}" in TaskBank(bank.path)
    # a torn tail, as a writer killed between its record and the end mark leaves it
    with open(bank.path, "ab") as file:
        file.write(b"VREC\x01\x04" + b"\0" * 40)
    count = len(TaskBank(bank.path))
    bank.add("last", {n: np.ones(s, np.float32) for n, s in bank.contract.task_shapes().items()})
    assert len(TaskBank(bank.path)) == count + 1 and "last" in TaskBank(bank.path)


def test_a_flipped_byte_in_a_row_is_refused_on_use(graph, tmp_path):
    bank, _ = _filled_bank(graph, tmp_path / "b.bank", 3)
    offset = bank._index["t1"] + 100
    with open(bank.path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x10]))
    banked = VeraSession(graph, device="cpu", bank=bank.path)
    banked.run(_feeds(1), task="t0")
    with pytest.raises(BankError, match=r"task 't1' in .*b.bank is damaged \(its SHA-256 differs\): add it again"):
        banked.run(_feeds(1), task="t1")
    with pytest.raises(BankError, match="damaged"):
        banked.run(_feeds(2), tasks=["t0", "t1"])
    banked.run(_feeds(1), task="t2")


_READER = textwrap.dedent("""
    import sys, time
    from vera_runtime import TaskBank
    bank = TaskBank(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    while "newcomer" not in bank.names():  # names() refreshes at most every REFRESH_S
        time.sleep(0.01)
    print(time.monotonic() - start, flush=True)
""")


def test_another_process_sees_an_add_within_a_second_without_reopening(graph, tmp_path):
    bank = TaskBank.create(tmp_path / "b.bank", VeraSession(graph, device="cpu"))
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(bank.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"
    reader.stdin.write("go\n")
    reader.stdin.flush()
    bank.add("newcomer", {n: np.ones(s, np.float32) for n, s in bank.contract.task_shapes().items()})
    seen_after = float(reader.stdout.readline())
    reader.wait(timeout=10)
    assert seen_after < 1.0


def test_compaction_reclaims_removed_rows_and_keeps_the_others(graph, tmp_path):
    bank, shapes = _filled_bank(graph, tmp_path / "b.bank", 50)
    kept = {f"t{i}": bank.row(f"t{i}").copy() for i in range(0, 50, 2)}
    for i in range(1, 50, 2):
        bank.remove(f"t{i}")
    size = bank.path.stat().st_size
    reclaimed = bank.compact()
    assert reclaimed > 0 and bank.path.stat().st_size == size - reclaimed
    assert bank.names() == sorted(kept) and all(np.array_equal(bank.row(n), row) for n, row in kept.items())
    row_bytes = sum(int(np.prod(s)) for s in shapes.values()) * 4
    assert bank.path.stat().st_size <= 4096 + 25 * row_bytes * 1.2  # bank bytes <= 1.2x the raw vectors


def test_vera_run_bank_commands_and_run_from_a_bank(graph, tmp_path, capsys):
    from vera_runtime.cli import main as vera_run

    bank = str(tmp_path / "cli.bank")
    assert vera_run(["bank", "create", bank, "--graph", str(graph)]) == 0
    first, second = (str(graph.with_name(f"encoder.{t}.task.safetensors")) for t in ("first", "second"))
    assert vera_run(["bank", "add", bank, f"a1={first}", f"a2={second}", f"b1={first}"]) == 0
    assert vera_run(["bank", "remove", bank, "b1"]) == 0
    capsys.readouterr()
    assert vera_run(["bank", "list", bank, "--prefix", "a"]) == 0
    assert capsys.readouterr().out.split() == ["a1", "a2"]
    assert vera_run(["bank", "compact", bank]) == 0 and "Reclaimed" in capsys.readouterr().out
    np.savez(tmp_path / "x.npz", **_feeds(2))
    assert vera_run(["run", str(graph), "--input", str(tmp_path / "x.npz"), "--task", "a2", "--bank", bank]) == 0
    assert "logits" in capsys.readouterr().out
    assert vera_run(["bank", "add", bank, "bad=nowhere.task.safetensors"]) == 1
    assert "nowhere.task.safetensors" in capsys.readouterr().err
    assert vera_run(["bank", "create", bank, "--graph", str(graph)]) == 1
    assert "exists: give a new path" in capsys.readouterr().err


def test_load_task_takes_the_same_mapping_and_a_bad_one_changes_nothing(graph):
    session = VeraSession(graph, device="cpu")
    shapes = session.contract.task_shapes()
    session.load_task("given", _random_task(shapes, 5))
    before = session.run(_feeds(2), task="given")["logits"]
    bad = _random_task(shapes, 6)
    del bad[next(iter(bad))]
    with pytest.raises(TaskFileError, match=r"the tensors given"):
        session.load_task("given", bad)
    np.testing.assert_array_equal(session.run(_feeds(2), task="given")["logits"], before)


def test_add_many_imports_in_bulk_and_checks_every_task_first(graph, tmp_path):
    session = VeraSession(graph, device="cpu")
    shapes = session.contract.task_shapes()
    bank = TaskBank.create(tmp_path / "b.bank", session)
    assert bank.add_many((f"t{i}", _random_task(shapes, i)) for i in range(300)) == 300
    assert len(TaskBank(bank.path)) == 300 and np.array_equal(bank.tensors("t7")[next(iter(shapes))],
                                                              _random_task(shapes, 7)[next(iter(shapes))])
    size = bank.path.stat().st_size
    bad = [("u0", _random_task(shapes, 0)), ("u1", {})]
    with pytest.raises(TaskFileError):
        bank.add_many(bad)
    assert bank.path.stat().st_size == size and "u0" not in bank


_MEMORY = textwrap.dedent("""
    import json, sys
    from vera_runtime import TaskBank
    def rss():
        return int([l for l in open("/proc/self/status") if l.startswith("RssFile")][0].split()[1]) * 1024
    before = rss()
    bank = TaskBank(sys.argv[1])
    opened = rss()
    for i in range(1000):
        bank.row(f"user{i}")
    print(json.dumps({"open": opened - before, "touched": rss() - opened, "tasks": len(bank)}))
""")


def test_memory_grows_with_the_tasks_touched_not_with_the_bank(big_bank):
    """10,000 rows (30 MB): opening maps none of them; touching 1,000 maps about their bytes."""
    import json

    done = subprocess.run([sys.executable, "-c", _MEMORY, str(big_bank)], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout)
    row_bytes = TaskBank(big_bank).row("user0").nbytes
    assert measured["tasks"] == BANK_TASKS
    assert measured["open"] < 0.1 * BANK_TASKS * row_bytes  # was the whole bank before headers were pread
    assert 0.5 * 1000 * row_bytes < measured["touched"] < 2 * 1000 * row_bytes


def test_generate_takes_its_tasks_from_the_bank_per_row(tmp_path):
    """A KV-cache decoder: generating with bank tasks equals generating with the same tasks loaded."""
    import vera_models
    from vera_export import export

    graph = tmp_path / "decoder.onnx"
    export(vera_models.make_task(vera_models.build("tiny-decoder"), 1), graph, kv_cache=True)
    loaded = VeraSession(graph, device="cpu")
    bank = TaskBank.create(tmp_path / "d.bank", loaded)
    shapes = loaded.contract.task_shapes()
    for name, seed in (("p", 1), ("q", 2)):
        bank.add(name, _random_task(shapes, seed))
        loaded.load_task(name, _random_task(shapes, seed))
    banked = VeraSession(graph, device="cpu", bank=bank.path)
    ids = np.random.default_rng(0).integers(0, 8192, (2, 5))
    got = banked.generate(ids, tasks=["q", "p"], max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(got, loaded.generate(ids, tasks=["q", "p"], max_new_tokens=6, eos_token_id=[]))


def test_tenants_files_and_keys(tmp_path):
    """What vera-serve --tenants reads, and who a header says it is; messages never show a key."""
    from vera_runtime._tenants import Tenants, TenantsError, namespaced, read_tenants

    good = tmp_path / "tenants.json"
    good.write_text('{"k-0123456789abcdefgh": "alice", "k-zyxwvutsrqponmlkjih": "bob"}')
    tenants = Tenants(read_tenants(good))
    assert tenants.tenant("Bearer k-0123456789abcdefgh") == "alice"
    assert tenants.tenant("bearer k-zyxwvutsrqponmlkjih") == "bob"
    wrong = (None, "", "Bearer", "Basic k-0123456789abcdefgh", "Bearer k-0123456789abcdefg", "k-0123456789abcdefgh")
    for header in wrong:
        assert tenants.tenant(header) is None, header
    assert namespaced("alice", "mine") == "alice/mine" and namespaced(None, "mine") == "mine"
    assert namespaced("alice", "../x") is None and namespaced("alice", "a/b") is None
    cases = (('{"short": "alice"}', "shorter than 16"), ('{"k-0123456789abcdefgh": "a b"}', "names a tenant"),
             ("[]", "expected a JSON object"), ("{}", "expected a JSON object"), ("{", "not a readable"))
    for text, fragment in cases:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(TenantsError, match=fragment) as caught:
            read_tenants(bad)
        assert "k-0123456789abcdefgh" not in str(caught.value) and "short\"" not in str(caught.value)


def test_an_add_waiting_for_the_lock_while_the_bank_is_compacted_lands_in_the_new_file(graph, tmp_path):
    """A writer that opened the file before another process renamed a compacted bank in must not write to
    the old, unlinked file (its task would be lost)."""
    import fcntl
    import shutil

    bank, shapes = _filled_bank(graph, tmp_path / "b.bank", 2)
    holder = open(bank.path, "r+b")  # noqa: SIM115 - the other process's lock, held below
    fcntl.flock(holder, fcntl.LOCK_EX)
    adder = threading.Thread(target=bank.add, args=("late", _random_task(shapes, 9)))
    adder.start()
    time.sleep(0.5)  # the adder has opened the old file and waits for its lock
    shutil.copyfile(bank.path, tmp_path / "new.bank")
    os.replace(tmp_path / "new.bank", bank.path)  # what a compaction does, under the lock
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    adder.join(timeout=30)
    assert TaskBank(bank.path).names() == ["late", "t0", "t1"]


def test_forged_names_in_a_bank_file_are_never_indexed_or_listed(graph, tmp_path):
    bank, shapes = _filled_bank(graph, tmp_path / "b.bank", 2)
    bank.add("evil", _random_task(shapes, 3))
    data = bank.path.read_bytes()
    forged = data.replace(b"evil", b"\x1b[2J")  # a terminal escape where the name was
    (tmp_path / "forged.bank").write_bytes(forged)
    assert TaskBank(tmp_path / "forged.bank").names() == ["t0", "t1"]


def test_a_forged_bank_header_is_refused_with_the_reason(tmp_path):
    """Nested a million levels deep, or not a contract: a BankError naming the file, never a crash."""
    import struct

    for text, fragment in ((b"[" * 1_000_000, "nested deeper"), (b'{"a": 1}', "damaged header")):
        forged = tmp_path / "forged.bank"
        forged.write_bytes(b"VERABANK" + struct.pack("<IQ", 1, len(text)) + text)
        with pytest.raises(BankError, match=fragment):
            TaskBank(forged)

"""VeraSession: task switching per call and per row, refusals that keep the state, threads, devices."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from helpers import random_task, run, session
from vera_runtime import DeviceError, FeedError, Task, TaskFileError, VeraSession, read_task, write_task
from vera_runtime._device import cuda_problem


def _feeds(batch: int = 3, seq: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1:, seq // 2 :] = 0
    return {"input_ids": rng.integers(0, 8192, (batch, seq)), "attention_mask": mask}


def _write_random_task(exported, tmp_path, name: str, seed: int):
    task = random_task(exported.adapted, seed)
    tensors = {k: v.numpy() for k, v in task.items()}
    path = write_task(tmp_path / f"{name}.task.safetensors", Task(name, exported.result.contract.fingerprint, tensors))
    return path, task


@pytest.fixture
def vera(encoder, tmp_path):
    """A CPU session over the encoder graph with three tasks loaded: default, a, b."""
    sess = VeraSession(encoder.path, device="cpu")
    sess.load_task("default", encoder.result.task_path)
    tasks = {"default": read_task(encoder.result.task_path).tensors}
    for name, seed in (("a", 31), ("b", 32)):
        path, task = _write_random_task(encoder, tmp_path, name, seed)
        sess.load_task(name, path)
        tasks[name] = {k: v.numpy() for k, v in task.items()}
    return sess, tasks


def test_switching_per_call_equals_feeding_the_lambdas(encoder, vera):
    sess, tasks = vera
    plain = session(encoder.path)
    feeds = _feeds()
    results = {}
    for name in ("a", "b", "default", "a"):
        got = sess.run(feeds, task=name)
        want = run(plain, {**feeds, **{k: v[None] for k, v in tasks[name].items()}})
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
        results[name] = got["logits"]
    assert not np.allclose(results["a"], results["b"])
    np.testing.assert_array_equal(sess.run(feeds)["logits"], results["default"])  # no task: the graph's default


def test_rows_of_a_mixed_batch_equal_their_single_task_runs(vera):
    sess, _ = vera
    feeds = _feeds(batch=4)
    order = ["b", "a", "default", "b"]
    mixed = sess.run(feeds, tasks=order)
    for row, name in enumerate(order):
        single = sess.run(feeds, task=name)
        for key in mixed:
            np.testing.assert_allclose(mixed[key][row], single[key][row], rtol=0, atol=1e-6)
    same = sess.run(feeds, tasks=["a"] * 4)
    np.testing.assert_array_equal(same["logits"], sess.run(feeds, task="a")["logits"])


def _bad_files(encoder, decoder, tmp_path) -> dict[str, tuple]:
    good = read_task(encoder.result.task_path)
    query_d = "blocks.0.attention.query.vera_lambda_d"

    def variant(name: str, array: np.ndarray):
        tensors = {**good.tensors, query_d: array}
        return write_task(tmp_path / f"{name}.task.safetensors", dataclasses.replace(good, tensors=tensors))

    data = encoder.result.task_path.read_bytes()
    truncated = tmp_path / "truncated.task.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    corrupt = tmp_path / "corrupt.task.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    nan = good.tensors[query_d].copy()
    nan[3] = np.nan
    return {
        "missing": (tmp_path / "absent.task.safetensors", "does not exist"),
        "truncated": (truncated, "not a readable task file"),
        "corrupt": (corrupt, "not a readable task file"),
        "fingerprint": (decoder.result.task_path, "was made for another graph"),
        "adapter fingerprint": (decoder.result.adapter_path, "was made for another graph"),
        "shape": (variant("shape", np.zeros(5, np.float32)), f"'{query_d}' is float32[5]"),
        "dtype": (variant("dtype", good.tensors[query_d].astype(np.float16)), f"'{query_d}' is float16[64]"),
        "nan": (variant("nan", nan), f"'{query_d}' holds NaN or Inf"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "truncated", "corrupt", "fingerprint", "adapter fingerprint", "shape", "dtype", "nan"]
)
def test_a_bad_task_file_is_refused_and_the_previous_state_still_serves(encoder, decoder, vera, tmp_path, case):
    sess, _ = vera
    feeds = _feeds()
    before = {name: sess.run(feeds, task=name)["logits"] for name in sess.tasks}
    path, message = _bad_files(encoder, decoder, tmp_path)[case]
    for name in ("a", "new"):  # replacing a loaded task, and adding a new one
        with pytest.raises(TaskFileError, match=re.escape(message)) as error:
            sess.load_task(name, path)
        assert path.name in str(error.value)
    assert sess.tasks == ("default", "a", "b")
    for name, logits in before.items():
        np.testing.assert_array_equal(sess.run(feeds, task=name)["logits"], logits)


def test_onnx_adapter_and_native_file_load_the_same_task(encoder):
    sess = VeraSession(encoder.path, device="cpu")
    sess.load_task("native", encoder.result.task_path)
    sess.load_task("adapter", encoder.result.adapter_path)
    feeds = _feeds()
    np.testing.assert_array_equal(sess.run(feeds, task="native")["logits"], sess.run(feeds, task="adapter")["logits"])


def test_peft_adapter_file_loads_and_matches_peft(bert, tmp_path):
    from helpers import inputs_for, torch_reference

    bert.model.save_pretrained(tmp_path / "adapter")
    sess = VeraSession(bert.path, device="cpu")
    sess.load_task("peft", tmp_path / "adapter" / "adapter_model.safetensors")
    feeds = inputs_for(bert, batch=2, seq=6, seed=4)
    got = sess.run({k: v.numpy() for k, v in feeds.items()}, task="peft")
    want = torch_reference(bert, feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5 * np.abs(want[key]).max())


def test_peft_adapter_with_other_projections_is_refused(bert, gpt2, tmp_path):
    gpt2.model.save_pretrained(tmp_path / "gpt2")
    sess = VeraSession(bert.path, device="cpu")
    with pytest.raises(TaskFileError, match="adapter_model.safetensors"):
        sess.load_task("wrong", tmp_path / "gpt2" / "adapter_model.safetensors")
    assert sess.tasks == ()


def test_feeds_are_checked(vera):
    sess, _ = vera
    feeds = _feeds()
    cases = [
        ({"input_ids": feeds["input_ids"]}, {}, "missing input 'attention_mask' (int64['batch', 'sequence'])"),
        ({**feeds, "token_type_ids": feeds["input_ids"]}, {}, "the graph has no input 'token_type_ids'"),
        ({**feeds, "input_ids": feeds["input_ids"].astype(np.int32)}, {},
         "'input_ids' is int32, the graph needs int64"),
        ({**feeds, "input_ids": feeds["input_ids"][0]}, {}, "'input_ids' has shape [9]"),
        ({**feeds, "blocks.0.attention.query.vera_lambda_d": np.zeros((1, 64), np.float32)}, {}, "is a task input"),
        (feeds, {"tasks": ["a", "b"]}, "tasks= gives 2 names for a batch of 3 rows"),
        (feeds, {"task": "a", "tasks": ["a"] * 3}, "not both"),
        (feeds, {"task": "zzz"}, "task 'zzz' is not loaded"),
        (feeds, {"outputs": ["nope"]}, "the graph has no output ['nope']"),
        # before ONNX Runtime sees them: its own messages (or silent wrap-around) are no help
        ({**feeds, "attention_mask": feeds["attention_mask"][:2]}, {},
         "input 'attention_mask' has batch=2, but 'input_ids' has batch=3: inputs must agree on 'batch'"),
        ({**feeds, "attention_mask": feeds["attention_mask"][:, :5]}, {}, "inputs must agree on 'sequence'"),
        (_feeds(seq=129), {}, "'input_ids' has sequence=129, but the model has positions for 128"),
        ({**feeds, "input_ids": feeds["input_ids"] + 8192}, {}, "outside the model's vocabulary [0, 8192)"),
        ({**feeds, "input_ids": -feeds["input_ids"] - 1}, {}, "input 'input_ids' holds -"),
        (_feeds(batch=0), {}, "the batch is empty (0 rows)"),
        (feeds, {"tasks": [None, None, None]}, "tasks= takes a list of names"),
        (feeds, {"tasks": "aaa"}, "tasks= takes a list of names"),
        (feeds, {"task": ["a"]}, "task= takes one task name (a str)"),
        (feeds, {"outputs": "logits"}, "outputs= takes a list of names, e.g. outputs=['logits']"),
        ([1, 2], {}, "feeds is a list: pass a dict"),
    ]
    for bad_feeds, kwargs, message in cases:
        with pytest.raises(FeedError) as error:
            sess.run(bad_feeds, **kwargs)
        assert message in str(error.value)


def test_concurrent_calls_with_random_tasks_and_loads(encoder, vera, tmp_path):
    sess, _ = vera
    names = ["default", "a", "b"]
    inputs = [_feeds(batch=2, seq=7, seed=s) for s in range(4)]
    reference = {(i, n): sess.run(inputs[i], task=n)["logits"] for i in range(4) for n in names}
    mixed_reference = sess.run(inputs[0], tasks=["a", "b"])["logits"]
    extra_path, _ = _write_random_task(encoder, tmp_path, "extra", 40)
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(25):
            i, name = int(rng.integers(4)), names[int(rng.integers(3))]
            if not np.array_equal(sess.run(inputs[i], task=name)["logits"], reference[(i, name)]):
                failures.append(f"input {i} task {name}")
            if not np.array_equal(sess.run(inputs[0], tasks=["a", "b"])["logits"], mixed_reference):
                failures.append("mixed")

    def loader() -> None:
        for _ in range(10):
            sess.load_task("extra", extra_path)
            sess.unload_task("extra")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)] + [threading.Thread(target=loader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sess.tasks == ("default", "a", "b")


def test_unload_task(vera):
    sess, _ = vera
    sess.unload_task("a")
    assert sess.tasks == ("default", "b")
    with pytest.raises(FeedError, match="task 'a' is not loaded"):
        sess.run(_feeds(), task="a")
    with pytest.raises(FeedError, match="task 'a' is not loaded"):
        sess.unload_task("a")


def test_runtime_runs_a_model_where_torch_cannot_import(encoder):
    script = f"""
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
import numpy as np
from vera_runtime import VeraSession
sess = VeraSession({str(encoder.path)!r}, device="auto")
sess.load_tasks_beside()
feeds = {{"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64)}}
out = sess.run(feeds, tasks=["default", "default"])["logits"]
print(sess.tasks, out.shape, sys.modules["torch"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("('default',) (2, 3) None")


@pytest.mark.skipif(cuda_problem() is None, reason="CUDA is usable here: the no-CUDA behaviour can't be shown")
def test_without_cuda_auto_is_quiet_cpu_and_cuda_says_what_is_missing(encoder):
    script = f"""
from vera_runtime import VeraSession
print(VeraSession({str(encoder.path)!r}, device="auto").device)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "cpu"
    assert result.stderr == ""  # no ONNX Runtime error spam
    with pytest.raises(DeviceError, match=r"device='cuda' was asked for, but .*(CUDA|onnxruntime-gpu)"):
        VeraSession(encoder.path, device="cuda")


@pytest.mark.skipif(cuda_problem() is not None, reason=f"no usable CUDA here: {cuda_problem()}")
def test_cuda_session_matches_cpu_per_call_and_per_row(vera, encoder):
    cpu, _ = vera
    gpu = VeraSession(encoder.path, device="cuda")
    assert gpu.device == "cuda"
    for name in cpu.tasks:
        gpu.load_task(name, cpu._store.current(name).path)
    feeds = _feeds(batch=3)
    for kwargs in ({"task": "a"}, {"task": "b"}, {"tasks": ["b", "a", "default"]}, {}):
        got, want = gpu.run(feeds, **kwargs)["logits"], cpu.run(feeds, **kwargs)["logits"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    on_device = gpu.run(feeds, task="a", keep_on_device=True)["logits"]
    assert on_device.device_name().lower() == "cuda"


@pytest.fixture(scope="module")
def hot_graph(tmp_path_factory):
    import vera_models
    from vera_export import export

    out = tmp_path_factory.mktemp("hot") / "decoder.onnx"
    export(vera_models.make_task(vera_models.build("tiny-decoder"), 5), out, hot_template=True)
    return out


def test_hot_path_serves_a_task_at_merged_form_with_the_same_outputs(hot_graph, tmp_path):
    import vera_models
    from vera_export._discover import find_vera_layers
    from vera_export._verify import random_task as draw

    sess = VeraSession(hot_graph, device="cpu")
    assert sess.hot_tasks == 1 and sess.load_tasks_beside() == ["default"]
    other = {k: v.numpy() for k, v in draw(find_vera_layers(vera_models.build("tiny-decoder")), 8).items()}
    write_task(tmp_path / "other.task.safetensors", Task("other", sess.contract.fingerprint, other))
    sess.load_task("other", tmp_path / "other.task.safetensors")
    feeds = {"input_ids": np.random.default_rng(1).integers(0, 8192, (2, 11))}
    factored = {name: sess.run(feeds, task=name)["logits"] for name in ("default", "other")}
    sess.specialize("default").result()
    assert sess.hot == ("default",)
    hot = sess.run(feeds, task="default")["logits"]
    assert np.abs(hot - factored["default"]).max() <= 1e-5 * np.abs(factored["default"]).max()
    sess.specialize("other").result()
    assert sess.hot == ("other",)  # one hot task by default: the older one was dropped
    hot_other = sess.run(feeds, task="other")["logits"]
    assert np.abs(hot_other - factored["other"]).max() <= 1e-5 * np.abs(factored["other"]).max()
    mixed = sess.run(feeds, tasks=["other", "default"])["logits"]  # rows still use the factored graph
    np.testing.assert_allclose(mixed[1], factored["default"][1], rtol=0, atol=1e-5 * np.abs(mixed).max())
    sess.unload_task("other")
    assert sess.hot == ()


def test_without_hot_template_specialize_says_how_to_get_one(encoder):
    sess = VeraSession(encoder.path, device="cpu")
    assert sess.hot_tasks == 0
    sess.load_tasks_beside()
    with pytest.raises(FileNotFoundError, match="--hot-template"):
        sess.specialize("default")


def test_a_task_used_repeatedly_is_specialised_automatically(hot_graph):
    sess = VeraSession(hot_graph, device="cpu")
    sess.load_tasks_beside()
    feeds = {"input_ids": np.ones((1, 4), np.int64)}
    factored = sess.run(feeds, task="default")["logits"]
    for _ in range(8):
        sess.run(feeds, task="default")
    for _ in range(200):  # the background build takes well under a second here
        if sess.hot:
            break
        threading.Event().wait(0.05)
    assert sess.hot == ("default",)
    hot = sess.run(feeds, task="default")["logits"]
    assert np.abs(hot - factored).max() <= 1e-5 * np.abs(factored).max()


def test_close_releases_every_session_and_thread_and_later_calls_say_so(hot_graph):
    import gc
    import weakref

    from vera_runtime import ClosedError

    feeds = {"input_ids": np.ones((1, 4), np.int64)}
    with VeraSession(hot_graph, device="cpu") as sess:
        sess.load_tasks_beside()
        sess.specialize("default").result()
        assert sess.hot == ("default",) and any(t.name.startswith("vera-hot") for t in threading.enumerate())
        sessions = [weakref.ref(sess._session), weakref.ref(sess._hot._hot["default"].session)]
        sess.run(feeds, task="default")
    gc.collect()
    assert [ref() for ref in sessions] == [None, None], "an ONNX Runtime session outlived close()"
    assert not any(t.name.startswith("vera-hot") for t in threading.enumerate())
    for call in (lambda: sess.run(feeds, task="default"), lambda: sess.load_tasks_beside(),
                 lambda: sess.specialize("default"), lambda: sess.unload_task("default")):
        with pytest.raises(ClosedError, match="was closed: create another one"):
            call()
    sess.close()  # twice is fine

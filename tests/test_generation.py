"""Generation through a KV-cache graph (``--kv-cache``) against PEFT's own ``generate``: one task, a task
per row, left-padded prompts, eos; Llama-style (grouped KV heads, rotary) and GPT-2 (Conv1D, learned
positions) decoders, each exported from PEFT adapter folders with two adapters."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from peft_folders import add_tokenizer, make_adapter, make_base, model_class

from helpers import genai_generate
from vera_export import VeraExportError
from vera_export._peft import export_peft
from vera_runtime import FeedError, VeraSession
from vera_runtime._device import cuda_problem

TASKS = ("alpha", "beta")
NEW = 10


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    graph: Path
    base: Path
    adapters: dict[str, Path]
    peft: object  # a PeftModel holding every adapter

    def peft_generate(self, task: str, ids, mask, **options) -> np.ndarray:
        self.peft.set_adapter(task)
        options = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, **options}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.peft.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **options)
        return out.numpy()


def _family(name: str, root: Path, base: Path, adapters: dict[str, Path]) -> Family:
    """The adapters exported with --kv-cache to root/out/model.onnx, and PEFT's model holding them all."""
    from peft import PeftModel

    graph = root / "out" / "model.onnx"
    graph.parent.mkdir()
    export_peft({t: str(p) for t, p in adapters.items()}, graph, base=base, kv_cache=True)
    first, *others = adapters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(model_class(name).from_pretrained(base), adapters[first], adapter_name=first)
        for task in others:
            peft.load_adapter(adapters[task], adapter_name=task)
    peft.get_base_model().generation_config.eos_token_id = None  # no eos unless a test gives one
    return Family(name, graph, base, adapters, peft.eval())


def _build(tmp_path_factory, family: str, tokenizer: bool) -> Family:
    root = tmp_path_factory.mktemp(f"generation-{family}")
    base = make_base(root / "base", family)
    if tokenizer:
        add_tokenizer(base, 1000)
    return _family(family, root, base, {task: make_adapter(root / task, base, family, seed)
                                        for seed, task in enumerate(TASKS, 1)})


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Family:
    return _build(tmp_path_factory, "llama", tokenizer=True)


@pytest.fixture(scope="module")
def gpt2_lm(tmp_path_factory) -> Family:
    return _build(tmp_path_factory, "gpt2", tokenizer=False)


@pytest.fixture(params=["llama", "gpt2_lm"])
def family(request) -> Family:
    return request.getfixturevalue(request.param)


def _session(family: Family) -> VeraSession:
    session = VeraSession(family.graph, device="cpu")
    session.load_tasks_beside()
    return session


def _prompts(vocab: int = 1000):
    """Three rows of 6, 4 and 2 tokens, left-padded with 0."""
    rng = np.random.default_rng(3)
    lengths = np.array([6, 4, 2])
    mask = (np.arange(6)[None] >= 6 - lengths[:, None]).astype(np.int64)
    return np.where(mask == 1, rng.integers(4, vocab, (3, 6)), 0), mask


def test_graph_has_the_genai_layout(llama):
    graph = onnx.load(llama.graph, load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["position_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 8]  # 2 KV heads of 4: GQA
    outputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.output}
    assert outputs["logits"] == ["batch", "sequence", 1000]
    assert outputs["present.1.key"] == ["batch", 2, "total_sequence", 8]
    config = json.loads((llama.graph.parent / "genai_config.json").read_text())["model"]
    assert config["type"] == "llama" and config["decoder"]["filename"] == "model.onnx"
    assert (config["decoder"]["num_key_value_heads"], config["decoder"]["num_hidden_layers"]) == (2, 2)
    assert config["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert (llama.graph.parent / "tokenizer.json").read_bytes() == (llama.base / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("task", TASKS)
def test_greedy_equals_peft_generate_with_left_padding(family, task):
    ids, mask = _prompts()
    expected = family.peft_generate(task, ids, mask)
    got = _session(family).generate(ids, mask, task=task, max_new_tokens=NEW, eos_token_id=[])
    np.testing.assert_array_equal(got, expected)
    other = TASKS[1 - TASKS.index(task)]
    assert not np.array_equal(expected, family.peft_generate(other, ids, mask))  # the tasks do differ


def test_a_task_per_row_equals_each_rows_own_task(family):
    ids, mask = _prompts()
    tasks = ["alpha", "beta", "alpha"]
    got = _session(family).generate(ids, mask, tasks=tasks, max_new_tokens=NEW, eos_token_id=[])
    for row, task in enumerate(tasks):
        start = mask[row].argmax()  # the row alone, without padding
        alone = family.peft_generate(task, ids[row:row + 1, start:], mask[row:row + 1, start:])
        np.testing.assert_array_equal(got[row, -NEW:], alone[0, -NEW:])


def test_eos_ends_rows_and_pads_them_like_peft(family):
    ids, mask = _prompts()
    session = _session(family)
    free = session.generate(ids, mask, task="beta", max_new_tokens=NEW, eos_token_id=[])
    eos = int(free[0, 6 + 2])  # row 0 ends at its third new token; the others may run on
    expected = family.peft_generate("beta", ids, mask, eos_token_id=eos)
    got = session.generate(ids, mask, task="beta", max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(got, expected)
    assert (got[0, 6 + 3:] == 0).all()


def test_stream_yields_the_tokens_generate_returns(llama):
    ids, mask = _prompts()
    session = _session(llama)
    steps = list(session.generate_stream(ids, mask, tasks=["beta", "alpha", "beta"], max_new_tokens=5,
                                         eos_token_id=[]))
    assert [s.shape for s in steps] == [(3,)] * 5
    full = session.generate(ids, mask, tasks=["beta", "alpha", "beta"], max_new_tokens=5, eos_token_id=[])
    np.testing.assert_array_equal(np.stack(steps, 1), full[:, 6:])


def test_sampling_is_repeatable_by_seed_and_top_k_1_is_greedy(llama):
    ids, mask = _prompts()
    session = _session(llama)
    options = {"task": "alpha", "max_new_tokens": 8, "eos_token_id": [], "do_sample": True}
    first = session.generate(ids, mask, seed=1, temperature=2.0, **options)
    np.testing.assert_array_equal(first, session.generate(ids, mask, seed=1, temperature=2.0, **options))
    assert not np.array_equal(first, session.generate(ids, mask, seed=2, temperature=2.0, **options))
    greedy = session.generate(ids, mask, task="alpha", max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(session.generate(ids, mask, seed=5, top_k=1, **options), greedy)
    np.testing.assert_array_equal(session.generate(ids, mask, seed=5, top_p=1e-9, **options), greedy)


@pytest.mark.slow
def test_a_sliding_window_bounds_the_graph_where_it_stays_exact(tmp_path):
    """Mistral with a 16-token window: transformers crops its cache past the window, this layout does
    not, so the graph is exact (and accepted) up to 15 tokens in all, and generation beyond is refused."""
    base = make_base(tmp_path / "base", "mistral", sliding_window=16)
    mistral = _family("mistral", tmp_path, base, {"a": make_adapter(tmp_path / "adapter", base, "mistral", 1)})
    session = VeraSession(mistral.graph, device="cpu")
    assert session.contract.dim_limits["total_sequence"] == 15
    assert json.loads((mistral.graph.parent / "genai_config.json").read_text())["model"]["context_length"] == 15
    ids, mask = _prompts()
    np.testing.assert_array_equal(session.generate(ids, mask, max_new_tokens=9, eos_token_id=[]),
                                  mistral.peft_generate("a", ids, mask, max_new_tokens=9))
    with pytest.raises(FeedError, match="exceeds the model's 15 positions"):
        session.generate(ids, mask, max_new_tokens=10)


@pytest.mark.slow
def test_hot_template_generates_the_same_tokens(llama, tmp_path, monkeypatch):
    """--hot-template with --kv-cache: a specialised task generates from the merged graph, same tokens."""
    graph = tmp_path / "model.onnx"
    export_peft({t: str(p) for t, p in llama.adapters.items()}, graph, base=llama.base, kv_cache=True,
                hot_template=True)
    session = VeraSession(graph, device="cpu", hot_tasks=1)
    session.load_tasks_beside()
    ids, mask = _prompts()
    factored = session.generate(ids, mask, task="beta", max_new_tokens=NEW, eos_token_id=[])
    session.specialize("beta").result()
    assert session.hot == ("beta",)
    monkeypatch.setattr(session, "_session", None)  # the factored session must not run now
    np.testing.assert_array_equal(session.generate(ids, mask, task="beta", max_new_tokens=NEW, eos_token_id=[]),
                                  factored)


@pytest.mark.slow
def test_task_files_of_the_logits_only_graph_fit(llama, tmp_path):
    """Same model, same fingerprint: a task file written beside the graph without a cache loads here."""
    plain = export_peft({"alpha": str(llama.adapters["alpha"])}, tmp_path / "plain.onnx", base=llama.base)
    session = _session(llama)
    session.load_task("from-plain", plain.export.task_path)
    ids, mask = _prompts()
    np.testing.assert_array_equal(session.generate(ids, mask, task="from-plain", max_new_tokens=4),
                                  session.generate(ids, mask, task="alpha", max_new_tokens=4))


def test_defaults_come_from_genai_config(llama):
    session = _session(llama)
    assert (session.token_ids().eos, session.token_ids().pad) == ((2,), 2)  # no pad id: eos pads, as in transformers


@pytest.mark.parametrize("target", ["web", "int8"])
def test_converted_kv_graphs_still_generate_per_task(llama, target, tmp_path):
    from vera_export import convert

    result = convert(llama.graph, tmp_path / f"model.{target}.onnx", target)
    assert {a.name for a in result.agreements} >= set(TASKS)  # compared on a past + new split, per task
    converted = VeraSession(result.path, device="cpu")
    converted.load_tasks_beside()
    ids, mask = _prompts()
    rows = ["alpha", "beta", "beta"]
    got = converted.generate(ids, mask, tasks=rows, max_new_tokens=NEW, eos_token_id=[])
    fp32 = _session(llama).generate(ids, mask, tasks=rows, max_new_tokens=NEW, eos_token_id=[])
    if target == "web":
        np.testing.assert_array_equal(got, fp32)
    else:  # int8 weights round differently; the first token of each row is robust on this model
        assert result.contract.weight_dtype == "int8"
        np.testing.assert_array_equal(got[:, 6], fp32[:, 6])
    assert not np.array_equal(got[1], converted.generate(ids, mask, tasks=["alpha"] * 3, max_new_tokens=NEW,
                                                         eos_token_id=[])[1])


def test_the_int4_graph_generates_each_rows_task_and_genai_runs_it_with_our_adapters(llama, tmp_path):
    """int4 in a folder of its own: genai_config.json (naming the int4 graph) and the tokenizer come along;
    a task per row generates what each row's task generates alone; onnxruntime-genai, given each task's
    .onnx_adapter, generates what VeraSession does on the same graph."""
    from vera_export import convert

    out = tmp_path / "int4" / "model.int4.onnx"
    out.parent.mkdir()
    result = convert(llama.graph, out, "int4")
    assert result.contract.weight_dtype == "int4"
    assert json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]["filename"] == out.name
    assert (out.parent / "tokenizer.json").is_file()
    session = VeraSession(out, device="cpu")
    session.load_tasks_beside()
    ids, mask = _prompts()
    rows = ["alpha", "beta", "beta"]
    mixed = session.generate(ids, mask, tasks=rows, max_new_tokens=NEW, eos_token_id=[])
    for row, task in enumerate(rows):
        alone = session.generate(ids, mask, task=task, max_new_tokens=NEW, eos_token_id=[])
        np.testing.assert_array_equal(mixed[row], alone[row])
    prompt = [5, 17, 300, 42]
    adapters = {t: str(out.with_name(f"model.int4.{t}.onnx_adapter")) for t in TASKS}
    got = genai_generate(out.parent, prompt, len(prompt) + NEW, adapters, tmp_path)
    for task in TASKS:
        ours = session.generate(np.array([prompt]), task=task, max_new_tokens=NEW, eos_token_id=[])
        assert got[task] == ours[0].tolist(), task
    assert got[TASKS[0]] != got[TASKS[1]]


@pytest.mark.parametrize("call, message", [
    (lambda s, i, m: s.generate(i, np.flip(m, 1), task="alpha"), "padded on the right"),
    (lambda s, i, m: s.generate(i, m, task="alpha", max_new_tokens=100), "exceeds the model's 64 positions"),
    (lambda s, i, m: s.generate(i, m, tasks=["alpha"]), "give one per row"),
    (lambda s, i, m: s.generate(i, m, task="gamma"), "task 'gamma' is not loaded"),
    (lambda s, i, m: s.generate(i[0], m[0], task="alpha"), "shape [batch, prompt]"),
    (lambda s, i, m: s.generate(i, m * 0, task="alpha"), "has no tokens"),
    (lambda s, i, m: s.generate(i, m, task="alpha", do_sample=True, temperature=0), "temperature must be > 0"),
    (lambda s, i, m: s.generate(i, m, task="alpha", max_new_tokens=-1), "max_new_tokens must be"),
])
def test_bad_generation_requests_are_refused(gpt2_lm, call, message):
    ids, mask = _prompts()
    with pytest.raises(FeedError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(_session(gpt2_lm), ids, mask)


def test_a_graph_without_cache_cannot_generate(encoder):
    session = VeraSession(encoder.result.onnx_path, device="cpu")
    with pytest.raises(FeedError, match="exported with `vera-export ADAPTER_DIR --kv-cache"):
        session.generate(np.ones((1, 3), np.int64))


def test_kv_cache_refuses_an_encoder(tmp_path):
    base = make_base(tmp_path / "base", "bert-cls")
    adapter = make_adapter(tmp_path / "adapter", base, "bert-cls", 1)
    with pytest.raises(VeraExportError, match="--kv-cache needs a causal LM .* a BertForSequenceClassification"):
        export_peft({"a": str(adapter)}, tmp_path / "m.onnx", base=base, kv_cache=True)
    assert not (tmp_path / "m.onnx").exists()


def test_vera_run_generate_prints_what_peft_generates(llama, capsys):
    from tokenizers import Tokenizer

    from vera_runtime.cli import main

    prompts = ["w5 w17 w300 w42", "w7 w8"]
    tokenizer = Tokenizer.from_file(str(llama.base / "tokenizer.json"))
    assert main(["generate", str(llama.graph), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--tasks", "alpha,beta", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line, prompt, task in zip(lines, prompts, ("alpha", "beta"), strict=True):
        ids = np.array([tokenizer.encode(prompt).ids])
        new = llama.peft_generate(task, ids, np.ones_like(ids), max_new_tokens=6)[0, ids.shape[1]:]
        assert line == f"[{task}] {tokenizer.decode(new.tolist(), skip_special_tokens=True)}"


@pytest.mark.skipif(cuda_problem() is not None, reason=f"no CUDA here: {cuda_problem()}")
def test_cuda_generation_keeps_the_cache_on_device_and_matches_cpu(llama):
    ids, mask = _prompts()
    cuda = VeraSession(llama.graph, device="cuda")
    cuda.load_tasks_beside()
    got = cuda.generate(ids, mask, tasks=["alpha", "beta", "alpha"], max_new_tokens=NEW, eos_token_id=[])
    expected = _session(llama).generate(ids, mask, tasks=["alpha", "beta", "alpha"], max_new_tokens=NEW,
                                        eos_token_id=[])
    np.testing.assert_array_equal(got, expected)


def _greedy_without_cache(model, ids: np.ndarray, steps: int) -> np.ndarray:
    """The eager model's own loop: the whole sequence through its forward for every new token."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.from_numpy(ids))["logits"]
            ids = np.concatenate([ids, logits[:, -1].argmax(-1).numpy()[:, None]], axis=1)
    return ids


@pytest.mark.slow
def test_our_tiny_decoder_generates_as_its_eager_loop(tmp_path):
    """This project's decoder (learned positions, tied embeddings) through vera-export's file path:
    its own forward_cached is traced; tokens equal its eager loop without a cache, per task and per row."""
    from click.testing import CliRunner

    import vera_models
    from vera_export import add_task, save_checkpoint
    from vera_export.cli import main

    models = {task: vera_models.make_task(vera_models.build("tiny-decoder"), seed) for seed, task in
              enumerate(TASKS, 5)}
    checkpoint = save_checkpoint(models["alpha"], tmp_path / "decoder.pt", task_name="alpha")
    result = CliRunner().invoke(main, [str(checkpoint), "--kv-cache", "--out", str(tmp_path / "decoder.onnx")])
    assert result.exit_code == 0, result.output
    assert "generation with a task per row" in result.output
    add_task(models["beta"], tmp_path / "decoder.onnx", "beta")
    session = VeraSession(tmp_path / "decoder.onnx", device="cpu")
    session.load_tasks_beside()
    ids = np.random.default_rng(0).integers(0, 8192, (2, 5))
    for task, model in models.items():
        np.testing.assert_array_equal(session.generate(ids, task=task, max_new_tokens=NEW, eos_token_id=[]),
                                      _greedy_without_cache(model.eval(), ids, NEW))
    rows = session.generate(ids, tasks=["beta", "alpha"], max_new_tokens=NEW, eos_token_id=[])
    np.testing.assert_array_equal(rows[0], _greedy_without_cache(models["beta"], ids[:1], NEW)[0])
    np.testing.assert_array_equal(rows[1], _greedy_without_cache(models["alpha"], ids[1:], NEW)[0])


@pytest.mark.slow
def test_a_cache_path_that_drifts_from_pytorch_refuses_the_export(tmp_path, monkeypatch):
    """The export's generation checks are enforced: ORT's decode steps, made to drift, stop the export."""
    import vera_models
    from vera_export import _verify_cache, export

    real = _verify_cache._ort_run

    def drifting(session, lambdas):
        run = real(session, lambdas)
        return lambda feeds: {k: v + 0.1 if feeds["input_ids"].shape[1] == 1 else v for k, v in run(feeds).items()}

    monkeypatch.setattr(_verify_cache, "_ort_run", drifting)
    with pytest.raises(VeraExportError, match="ONNX Runtime differs from PyTorch on 'generation"):
        export(vera_models.make_task(vera_models.build("tiny-decoder"), 1), tmp_path / "m.onnx", kv_cache=True)
    assert not (tmp_path / "m.onnx").exists()


def test_onnxruntime_genai_runs_our_graph_with_our_adapters(family, tmp_path):
    """og.Model(folder) + og.Adapters with each task's .onnx_adapter, greedy, in onnxruntime-genai's own
    environment: the tokens are PEFT's. genai's min_length keeps eos out, as PEFT's min_new_tokens does."""
    prompt = [5, 17, 300, 42]
    adapters = {"": "", **{t: str(family.graph.with_name(f"model.{t}.onnx_adapter")) for t in TASKS}}
    got = genai_generate(family.graph.parent, prompt, len(prompt) + NEW, adapters, tmp_path)
    eos = json.loads((family.graph.parent / "genai_config.json").read_text())["model"]["eos_token_id"]
    ids = np.array([prompt])
    for name, task in (("", TASKS[0]), *((t, t) for t in TASKS)):  # "": no adapter, the graph's default task
        expected = family.peft_generate(task, ids, np.ones_like(ids), eos_token_id=eos, min_new_tokens=NEW)
        assert got[name] == expected[0].tolist(), name
    assert got[TASKS[0]] != got[TASKS[1]]

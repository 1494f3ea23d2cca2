"""The fused decoder (issue 18): python bench/fused.py [--repeats N] [--threads T] [--cases llama,qwen2]

A 125M Llama (bench/generate.py's "large") and a Qwen2 of the same size (random weights, a word-level
tokenizer), each with 8 VeRA tasks (r=256 on q_proj/v_proj) from PEFT folders, side by side:
  - ours: `vera-export ADAPTER --fused fp32|int4 --hot-template` (the builder's graph with VeRA branches),
    through VeraSession.generate: one task from its hot session (`specialize`: the task merged into each
    adapted builder MatMul — fp32 folded by ONNX Runtime, int4 requantized as the builder quantizes) and
    from the factored graph, and at batch 8 one task per row;
  - the builder's own fp32 and int4 graphs of the *merged* model (task 0 merged by PEFT), run by the same
    kind of loop (one shared cache buffer, greedy) in the same process, interleaved;
  - Llama: our traced `--kv-cache` graph (the previous baseline);
  - onnxruntime-genai (its own C++ loop, separate processes): the builder's int4 merged model, and our
    fused int4 graph with our .onnx_adapter.
Also: file sizes, export and build times, the export's peak memory, and how close each int4 graph's
prefill logits stay to its fp32 graph (cosine). Writes bench/results/fused.md. 8-token prompts, 64 new
tokens. Needs .venv-genai (see .ci/run).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
from _measure import Timing  # noqa: E402
from generate import CASES, GENAI_PYTHON, NEW, PROMPT, TASKS, _build, _interleaved, _prompt  # noqa: E402
from int4 import _size  # noqa: E402
from run import _options  # noqa: E402

WORK = HERE / "results" / "work" / "fused"
QWEN2 = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, r=256)


def _qwen2_case() -> dict:
    """Base and 8 adapters of a Qwen2 shaped like the Llama (no traced graph: the Llama's row shows that)."""
    import torch
    import transformers
    from peft import VeraConfig, get_peft_model

    work = WORK / "qwen2"
    settings = dict(QWEN2)
    r = settings.pop("r")
    if not (work / "base").is_dir():
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**settings)).save_pretrained(work / "base")
    adapters = {}
    for seed, task in enumerate(TASKS, 1):
        adapters[task] = work / task
        if not adapters[task].is_dir():
            model = get_peft_model(transformers.Qwen2ForCausalLM.from_pretrained(work / "base"),
                                   VeraConfig(r=r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param in (p for p in model.parameters() if p.requires_grad):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            model.save_pretrained(adapters[task])
    params = sum(p.numel() for p in transformers.Qwen2ForCausalLM.from_pretrained(work / "base").parameters())
    return {"work": work, "adapters": adapters, "params": params, "graphs": {}}


def _in_child(code: str) -> tuple[float, int, int]:
    """Run ``code`` in a fresh interpreter: (seconds, its peak RSS, its children's (the builder's) peak RSS)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    return time.perf_counter() - start, peaks["self"], peaks["children"]


# The export's own peak from /proc (ru_maxrss survives exec: it would count the benchmark that forked it);
# its children's (the builder's) from getrusage.
_PEAK = ("import json, re, resource; print(json.dumps({'self': int(re.search(r'VmHWM:\\s+(\\d+)',"
         " open('/proc/self/status').read()).group(1)) * 1024,"
         " 'children': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")


def _prepare(name: str, case: dict) -> dict:
    """The tokenizer the builder needs, our fused graphs, the merged model and the builder's graphs of it."""
    from peft_folders import add_tokenizer

    base, work = case["work"] / "base", case["work"]
    if not (base / "tokenizer.json").is_file():
        add_tokenizer(base, 32000)
    made = {}
    adapters = {t: str(p) for t, p in case["adapters"].items()}
    for precision in ("fp32", "int4"):
        for hot, folder, label in ((False, "plain", ""), (True, "", " --hot-template")):  # timed apart
            graph = work / f"fused-{precision}{folder and '-'}{folder}" / "model.onnx"
            if not graph.is_file():
                graph.parent.mkdir(parents=True, exist_ok=True)
                made[f"ours {precision}{label}"] = _in_child(
                    "import sys; sys.path.insert(0, 'tests'); from vera_export import export_fused;"
                    f" export_fused({adapters!r}, {str(graph)!r}, base={str(base)!r}, precision={precision!r},"
                    f" builder={str(GENAI_PYTHON)!r}, hot_template={hot}); " + _PEAK)
        case["graphs"][f"fused {precision}"] = graph
    merged = work / "merged"
    if not merged.is_dir():
        _merge(name, base, case["adapters"][TASKS[0]], merged)
    for precision in ("fp32", "int4"):
        out = work / f"builder-{precision}"
        if not (out / "model.onnx").is_file():
            command = [str(GENAI_PYTHON), "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out),
                       "-p", precision, "-e", "cpu", "-c", str(work / "cache")]
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True)
            made[f"builder {precision}"] = (time.perf_counter() - start, 0, 0)
        case["graphs"][f"builder {precision}"] = out / "model.onnx"
    times_file = work / "times.json"
    times = {**(json.loads(times_file.read_text()) if times_file.is_file() else {}), **made}
    times_file.write_text(json.dumps(times))
    case["times"] = times
    return case


def _merge(name: str, base: Path, adapter: Path, out: Path) -> None:
    """Task 0 merged into the base by PEFT, saved with the tokenizer: what a user who merges runs."""
    import shutil

    import transformers
    from peft import PeftModel

    cls = transformers.LlamaForCausalLM if name == "llama" else transformers.Qwen2ForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(cls.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / file, out / file)


def _plain_generate(session, layout, ids: np.ndarray, new: int) -> np.ndarray:
    """Greedy with the builder's graph as onnxruntime-genai runs it on the CPU: one shared cache buffer."""
    step = layout.shared_step(session, {}, len(ids), ids.shape[1] + new)
    feed, width, chosen = ids, ids.shape[1], []
    for _ in range(new):
        logits, _ = step({"input_ids": feed, "attention_mask": np.ones((len(ids), width), np.int64)}, None)
        chosen.append(logits[:, -1].argmax(-1))
        feed, width = chosen[-1][:, None].astype(np.int64), width + 1
    return np.stack(chosen, 1)


def _sessions(case: dict, threads: int) -> dict:
    import onnxruntime as ort

    from vera_runtime import VeraSession
    from vera_runtime.layout import CacheLayout

    sessions = {}
    for label, graph in case["graphs"].items():
        if label.startswith("builder"):
            raw = ort.InferenceSession(str(graph), _options(threads), providers=["CPUExecutionProvider"])
            inputs = {i.name: i for i in raw.get_inputs()}
            layers = sum(1 for n in inputs if n.endswith(".key"))
            kv_heads = inputs["past_key_values.0.key"].shape[1]  # the head size is symbolic in its graph
            sessions[label] = (raw, CacheLayout.of_layers(layers, kv_heads, 64))
        else:
            sessions[label] = VeraSession(graph, device="cpu", session_options=_options(threads))
            sessions[label].load_tasks_beside()
            if label.startswith("fused"):  # one task from the hot template, as a server keeps its busiest
                sessions[label].specialize(TASKS[0]).result()
                factored = VeraSession(graph, device="cpu", session_options=_options(threads), hot_tasks=0)
                factored.load_tasks_beside()
                sessions[f"{label} factored"] = factored
    return sessions


def _runners(sessions: dict, batch: int) -> dict:
    ids = _prompt(batch)
    runners = {}
    for label, session in sessions.items():
        if label.startswith("builder"):
            raw, layout = session
            runners[f"{label} (merged task 0)"] = lambda raw=raw, layout=layout: _plain_generate(raw, layout, ids, NEW)
        else:
            runners[f"{label} (one task)"] = lambda s=session: s.generate(ids, task=TASKS[0], max_new_tokens=NEW,
                                                                       eos_token_id=[])
            if batch > 1 and label.startswith("fused") and label.endswith("factored"):
                runners[f"{label} (8 tasks, one per row)"] = lambda s=session: s.generate(
                    ids, tasks=TASKS[:batch], max_new_tokens=NEW, eos_token_id=[])
    return runners


def _genai(folder: Path, adapter: str, batch: int, repeats: int, threads: int) -> Timing:
    args = [str(GENAI_PYTHON), str(HERE / "genai_generate.py"), str(folder), adapter, str(batch), str(PROMPT),
            str(NEW), str(repeats), str(threads)]
    seconds = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)["seconds"]
    return Timing(float(np.median(seconds)), min(seconds), max(seconds))


def _cosines(sessions: dict) -> dict[str, float]:
    """Prefill logits of a 16-token prompt, int4 against fp32: ours per task (the lowest), the builder's merged."""
    ids = _prompt(1, 16)

    def cosine(a, b):
        a, b = a.ravel(), b.ravel()
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    def prefill(session, task=None):
        if isinstance(session, tuple):
            raw, layout = session
            step = layout.shared_step(raw, {}, 1, ids.shape[1])
            return step({"input_ids": ids, "attention_mask": np.ones_like(ids)}, None)[0]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **session.cache.empty(1)}
        return session.run(feeds, task=task, outputs=["logits"])["logits"]

    ours = {t: cosine(prefill(sessions["fused fp32 factored"], t), prefill(sessions["fused int4 factored"], t))
            for t in TASKS}
    return {"ours (lowest of 8 tasks)": min(ours.values()), "ours (task 0)": ours[TASKS[0]],
            "ours hot (task 0)": cosine(prefill(sessions["fused fp32"], TASKS[0]),
                                        prefill(sessions["fused int4"], TASKS[0])),
            "builder (merged task 0)": cosine(prefill(sessions["builder fp32"]), prefill(sessions["builder int4"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="llama,qwen2")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sections, sessions = [], None
    for name in args.cases.split(","):
        del sessions  # the previous case's sessions: not alive while the next case exports and loads
        case = _build("large", CASES["large"]) if name == "llama" else _qwen2_case()
        if name == "llama":
            case["graphs"] = {"traced --kv-cache fp32": case["graphs"]["cache"]}
        case = _prepare(name, case)
        sessions = _sessions(case, args.threads)
        rows, ratios = [], {}
        for batch in (1, 8):
            timings = _interleaved(_runners(sessions, batch), args.repeats)
            ours_int4 = case["graphs"]["fused int4"]
            adapter_file = str(ours_int4.with_name(f"model.{TASKS[0]}.onnx_adapter"))
            for folder, adapter, label in ((case["graphs"]["builder int4"].parent, "-", "genai: builder int4 (merged)"),
                                           (ours_int4.parent, adapter_file, "genai: ours fused int4, our adapter")):
                timings[label] = _genai(folder, adapter, batch, args.repeats, args.threads)
            for label, timing in timings.items():
                ratios[(batch, label)] = timing.median
                rows.append((batch, label, f"{timing.median:.3f} ({timing.low:.3f}–{timing.high:.3f})",
                             f"{batch * NEW / timing.median:.0f}"))
        sections.append(_section(name, case, sessions, rows, ratios))
    _write(sections, args)


def _section(name: str, case: dict, sessions: dict, rows: list, t: dict) -> list[str]:
    sizes = {label: _size(graph) for label, graph in case["graphs"].items()}
    cos = _cosines(sessions)
    one = "(one task)"
    merged = "(merged task 0)"
    targets = [
        *[(f"batch {b}: ours int4 vs the builder's int4 (target ≤ 1.15×)",
           t[(b, f"fused int4 {one}")] / t[(b, f"builder int4 {merged}")]) for b in (1, 8)],
        *[(f"batch {b}: ours fp32 vs the builder's fp32 (target ≤ 1.10×)",
           t[(b, f"fused fp32 {one}")] / t[(b, f"builder fp32 {merged}")]) for b in (1, 8)],
        *[(f"batch 8: {p}, 8 tasks one per row vs one task, both on the graph (target ≤ 1.15×)",
           t[(8, f"fused {p} factored (8 tasks, one per row)")] / t[(8, f"fused {p} factored {one}")])
          for p in ("fp32", "int4")],
        *[(f"batch 8: {p}, 8 tasks one per row vs one task merged (hot)",
           t[(8, f"fused {p} factored (8 tasks, one per row)")] / t[(8, f"fused {p} {one}")])
          for p in ("fp32", "int4")],
        *[(f"batch {b}: {p}, one task from the factored graph vs from the hot template",
           t[(b, f"fused {p} factored {one}")] / t[(b, f"fused {p} {one}")]) for b in (1, 8) for p in ("fp32", "int4")],
        *[(f"batch {b}: onnxruntime-genai, ours int4 + adapter vs the builder's int4",
           t[(b, "genai: ours fused int4, our adapter")] / t[(b, "genai: builder int4 (merged)")]) for b in (1, 8)],
        ("files: ours int4 vs ours fp32 (target ≤ 0.35×)", sizes["fused int4"] / sizes["fused fp32"]),
    ]
    times = case["times"]
    lines = [
        f"## {name} ({case['params'] / 1e6:.0f}M parameters, 8 VeRA tasks, r=256 on q_proj and v_proj)", "",
        "| batch | variant | seconds (min–max) | tokens/s |", "| --- | --- | --- | --- |",
        *[f"| {b} | {label} | {sec} | {tps} |" for b, label, sec, tps in rows], "",
        "| target | measured |", "| --- | --- |", *[f"| {label} | {value:.2f}× |" for label, value in targets], "",
        "- Files (graph + data): " + ", ".join(f"{label} {size / 1e6:.0f} MB" for label, size in sizes.items()) + ".",
        "- Build times (first run, in a fresh interpreter: imports included; cached after): " + ", ".join(
            f"{label} {sec:.1f} s" + (f" (peak RSS {rss / 1e9:.2f} GB; the builder's process {child / 1e9:.2f} GB)"
                                      if rss else "")
            for label, (sec, rss, child) in times.items()) + f"; the weights are {case['params'] * 4 / 1e9:.2f} GB.",
        f"- Prefill logits, int4 vs fp32 (cosine, 16-token prompt): ours factored {cos['ours (task 0)']:.4f} for"
        f" task 0 ({cos['ours (lowest of 8 tasks)']:.4f} the lowest of the 8 tasks), ours hot (merged, requantized)"
        f" {cos['ours hot (task 0)']:.4f} for task 0, the builder's {cos['builder (merged task 0)']:.4f} (task 0"
        " merged).", "",
    ]
    return lines


def _write(sections: list, args) -> None:
    import onnxruntime

    lines = [
        "# Fused decoder graphs (issue 18)", "",
        f"`python bench/fused.py --repeats {args.repeats} --threads {args.threads} --cases {args.cases}` on"
        f" {platform.processor() or platform.machine()}, {args.threads} threads, CPU, onnxruntime"
        f" {onnxruntime.__version__} (onnxruntime-genai 0.18.0 with its own onnxruntime in .venv-genai):"
        f" random weights, {PROMPT}-token prompts, {NEW} new tokens, greedy, medians of {args.repeats} runs,"
        " interleaved within this process; the two onnxruntime-genai rows run in their own processes, one"
        " after the other.", "",
        *[line for section in sections for line in section],
    ]
    out = HERE / "results" / "fused.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Generation: python bench/generate.py [--repeats N] [--threads T] [--cases tiny,large]

Tokens per second for 64 new tokens after an 8-token prompt, at batch 1 and batch 8, on a tiny Llama
(hidden 64) and a larger one (~125M parameters, random weights), each with 8 VeRA tasks from PEFT
adapter folders. Side by side in one run (CPU, --threads threads everywhere, greedy):
  - ours with the KV cache (VeraSession.generate on a `--kv-cache` graph),
  - ours without it (the logits-only graph, the whole sequence re-run per token),
  - PEFT `generate` with its cache (one adapter per batch: PEFT has no per-row VeRA adapters),
  - onnxruntime-genai on our graph with our .onnx_adapter (one adapter per generator),
then the issue's targets: cache vs no cache at 256 total tokens, 8 tasks vs 1 task in a batch of 8,
and decode time per token from position 16 to 256. Writes bench/results/generate.md.
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
from run import _interleaved as _interleaved_with_feeds  # noqa: E402
from run import _options  # noqa: E402

RESULTS = HERE / "results"
WORK = RESULTS / "work" / "generate"
GENAI_PYTHON = ROOT / ".venv-genai" / "bin" / "python"
TASKS = [f"task{i}" for i in range(8)]
PROMPT, NEW = 8, 64
ONE_TASK = "ours, KV cache (one task)"
CASES = {
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, r=16),
    "large": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512, r=256),
}


def _build(name: str, settings: dict) -> dict:
    """Base folder, 8 adapters, and both graphs (with and without the cache), built once."""
    import torch
    import transformers
    from peft import VeraConfig, get_peft_model

    from vera_export import export_peft

    work = WORK / name
    graphs = {"cache": work / "cache" / "model.onnx", "nocache": work / "nocache" / "model.onnx"}
    settings = dict(settings)
    r = settings.pop("r")
    if not (work / "base").is_dir():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).save_pretrained(work / "base")
    adapters = {}
    for seed, task in enumerate(TASKS, 1):
        adapters[task] = work / task
        if adapters[task].is_dir():
            continue
        model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(work / "base"),
                               VeraConfig(r=r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in (p for p in model.parameters() if p.requires_grad):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        model.save_pretrained(adapters[task])
    for kind, graph in graphs.items():
        if not graph.is_file():
            graph.parent.mkdir(parents=True, exist_ok=True)
            export_peft({t: str(p) for t, p in adapters.items()}, graph, base=work / "base", kv_cache=kind == "cache")
    params = sum(p.numel() for p in transformers.LlamaForCausalLM.from_pretrained(work / "base").parameters())
    return {"work": work, "graphs": graphs, "adapters": adapters, "params": params}


def _peft_model(case: dict):
    import transformers
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(case["work"] / "base"),
                                          case["adapters"][TASKS[0]], adapter_name=TASKS[0])
        for task in TASKS[1:]:
            model.load_adapter(case["adapters"][task], adapter_name=task)
    model.get_base_model().generation_config.eos_token_id = None
    return model.eval()


def _prompt(batch: int, length: int = PROMPT) -> np.ndarray:
    return np.random.default_rng(0).integers(4, 1000, (batch, length)).astype(np.int64)


def _without_cache(session, tasks, ids: np.ndarray, new: int) -> np.ndarray:
    """The loop a logits-only graph allows: the whole sequence again for every new token."""
    for _ in range(new):
        logits = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids)}, tasks=tasks)["logits"]
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return ids


def _runners(case: dict, threads: int, batch: int) -> dict:
    import torch

    from vera_runtime import VeraSession

    sessions = {}
    for kind, graph in case["graphs"].items():
        sessions[kind] = VeraSession(graph, device="cpu", session_options=_options(threads))
        sessions[kind].load_tasks_beside()
    peft = _peft_model(case)
    ids = _prompt(batch)
    tasks = TASKS[:batch] if batch > 1 else TASKS[:1]

    def peft_generate():
        with torch.no_grad():
            return peft.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                 max_new_tokens=NEW, do_sample=False, pad_token_id=0).numpy()

    def peft_runner():
        peft.set_adapter(TASKS[0])
        return peft_generate()

    runners = {
        "ours, KV cache": lambda: sessions["cache"].generate(ids, tasks=tasks, max_new_tokens=NEW, eos_token_id=[]),
        "ours, no cache": lambda: _without_cache(sessions["nocache"], tasks, ids, NEW),
        "PEFT generate (one task)": peft_runner,
    }
    if batch > 1:  # "ours, KV cache" gives each row its own task; this is the same batch with one
        runners[ONE_TASK] = lambda: sessions["cache"].generate(ids, task=TASKS[0], max_new_tokens=NEW, eos_token_id=[])
    return runners


def _interleaved(runners: dict, repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """run.py's interleaved timing, for runners without feeds; one warm-up by default (a generation is long)."""
    return _interleaved_with_feeds({label: lambda _, go=go: go() for label, go in runners.items()}, None, repeats,
                                   warmup=warmup)


def _genai(case: dict, batch: int, repeats: int, threads: int, prompt: int = PROMPT) -> Timing | None:
    if not GENAI_PYTHON.is_file():
        return None
    folder = case["graphs"]["cache"].parent
    adapter = folder / f"model.{TASKS[0]}.onnx_adapter"
    args = [str(GENAI_PYTHON), str(HERE / "genai_generate.py"), str(folder), str(adapter), str(batch), str(prompt),
            str(NEW), str(repeats), str(threads)]
    seconds = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)["seconds"]
    return Timing(float(np.median(seconds)), min(seconds), max(seconds))


def _long_context(case: dict, threads: int, repeats: int) -> dict[str, Timing]:
    """256 total tokens at batch 1: a 192-token prompt and 64 new ones, with and without the cache."""
    from vera_runtime import VeraSession

    sessions = {k: VeraSession(g, device="cpu", session_options=_options(threads)) for k, g in case["graphs"].items()}
    ids = _prompt(1, 256 - NEW)
    runners = {
        "KV cache": lambda: sessions["cache"].generate(ids, max_new_tokens=NEW, eos_token_id=[]),
        "no cache": lambda: _without_cache(sessions["nocache"], None, ids, NEW),
    }
    return _interleaved(runners, repeats)


def _per_token(case: dict, threads: int) -> dict[str, float]:
    """Median decode-step time by position, batch 1: a 15-token prompt, then 241 steps to position 256."""
    from vera_runtime import VeraSession

    session = VeraSession(case["graphs"]["cache"], device="cpu", session_options=_options(threads))
    steps, last = [], time.perf_counter()
    for _ in session.generate_stream(_prompt(1, 15), max_new_tokens=241, eos_token_id=[]):
        now = time.perf_counter()
        steps.append(now - last)
        last = now
    early, late = steps[1:17], steps[-16:]  # steps[0] is the prefill; then positions 16-31 ... 240-255
    return {"16-31": float(np.median(early)), "240-255": float(np.median(late))}


def _table(rows: list[tuple]) -> str:
    head = "| decoder | batch | variant | seconds (min–max) | tokens/s | ratio to ours with cache |\n"
    head += "| --- | --- | --- | --- | --- | --- |\n"
    return head + "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="tiny,large")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows, targets, notes = [], [], []
    for name in args.cases.split(","):
        case = _build(name, CASES[name])
        notes.append(f"{name}: {case['params'] / 1e6:.1f}M parameters, r={CASES[name]['r']} on q_proj and v_proj")
        for batch in (1, 8):
            timings = _interleaved(_runners(case, args.threads, batch), args.repeats)
            genai = _genai(case, batch, args.repeats, args.threads)
            if genai:
                timings["onnxruntime-genai, our adapter (one task)"] = genai
            ours = timings["ours, KV cache"].median
            for label, timing in timings.items():
                if batch > 1 and label in ("ours, KV cache", "ours, no cache"):
                    label += " (8 tasks, one per row)"
                rows.append((name, batch, label,
                             f"{timing.median:.3f} ({timing.low:.3f}–{timing.high:.3f})",
                             f"{batch * NEW / timing.median:.0f}", f"{timing.median / ours:.2f}×"))
            if batch == 1:
                targets.append((f"{name}: ours with cache vs PEFT generate, batch 1 (target ≥ 1.5× on large)",
                                timings["PEFT generate (one task)"].median / ours))
            else:
                targets.append((f"{name}: batch 8, 8 tasks vs 1 task (target ≤ 1.15×)",
                                ours / timings[ONE_TASK].median))
        long = _long_context(case, args.threads, args.repeats)
        targets.append((f"{name}: no cache vs cache at 256 total tokens, batch 1 (target ≥ 5×)",
                        long["no cache"].median / long["KV cache"].median))
        steps = _per_token(case, args.threads)
        targets.append((f"{name}: decode step at positions 240–255 vs 16–31 ({steps['240-255'] * 1e3:.2f} vs"
                        f" {steps['16-31'] * 1e3:.2f} ms; target ≤ 1.3×)", steps["240-255"] / steps["16-31"]))
    _write(rows, targets, notes, args)


def _write(rows, targets, notes, args) -> None:
    import onnxruntime
    import torch

    lines = [
        "# Generation (issue 11)", "",
        f"`python bench/generate.py --repeats {args.repeats} --threads {args.threads}` on"
        f" {platform.processor() or platform.machine()}, {args.threads} threads, CPU; torch {torch.__version__},"
        f" onnxruntime {onnxruntime.__version__}."
        f" {PROMPT}-token prompts, {NEW} new tokens, greedy, medians of {args.repeats} interleaved runs.", "",
        *[f"- {note}" for note in notes], "",
        _table(rows),
        "| target | measured |", "| --- | --- |",
        *[f"| {label} | {value:.2f}× |" for label, value in targets], "",
    ]
    (RESULTS / "generate.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

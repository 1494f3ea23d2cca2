"""Check a grafted builder graph the way generation uses it: a prefill, then decode steps that feed each
step's ``present`` back as ``past``, in ONNX Runtime against the PEFT model run over the whole sequence —
for each task alone and for a batch with a task per row.

PyTorch's references are computed first (``references``), so that the PEFT model can be released before
ONNX Runtime loads the graph (``verify_graphs``): the export never holds both copies of the weights."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from vera_runtime import Contract
from vera_runtime.files import MergePlan, replace_initializers
from vera_runtime.layout import CacheLayout, merge_path

from ._agreement import Check, compare_outputs
from ._defaults import DEFAULT_TOLERANCE
from ._export import _require_pass
from ._verify import Verification, ort_session

_BATCH, _PROMPT, _DECODE_STEPS = 2, 6, 3
# The float hot template folds W + ΔW where the graph adds ΔW·x: float32 rounding apart.
_HOT_TOLERANCE = DEFAULT_TOLERANCE
# The template's structure is the same for every task: the default task and one other (whose λ must
# replace the template's) check it; each hot session holds a copy of the weights and takes seconds.
_HOT_CHECKS = 2


@dataclasses.dataclass(frozen=True)
class References:
    """PyTorch's logits per step for each task on ``ids`` (the prompt), with ``tokens`` fed one per step."""

    ids: np.ndarray
    logits: dict[str, list[np.ndarray]]
    tokens: dict[str, list[np.ndarray]]


def references(model: torch.nn.Module, names: list[str], use_task: Callable[[str], None], vocab: int) -> References:
    """Each task's steps in PyTorch; ``use_task(name)`` makes the model run that task. The decode steps feed
    random tokens (any token checks a step), so one causal forward over the whole sequence gives every step's
    logits: a forward per task, not per step."""
    sequence = np.random.default_rng(0).integers(3, vocab, (_BATCH, _PROMPT + _DECODE_STEPS), dtype=np.int64)
    tokens = [sequence[:, i:i + 1] for i in range(_PROMPT, _PROMPT + _DECODE_STEPS)]
    logits = {}
    for name in names:
        use_task(name)
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(sequence)).logits.numpy()
        logits[name] = [out[:, :_PROMPT], *(out[:, i - 1:i] for i in range(_PROMPT + 1, _PROMPT + _DECODE_STEPS + 1))]
    return References(sequence[:, :_PROMPT], logits, {name: tokens for name in names})


def _ort_steps(session, cache: tuple[CacheLayout, int], ids: np.ndarray, tokens: list[np.ndarray],
               task_feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Prefill ``ids``, then feed ``tokens`` one step at a time, the cache in one shared buffer as the
    runtime keeps it (``cache``: its layout and least capacity); each step's logits ``[batch, new, vocab]``."""
    layout, capacity = cache
    step = layout.shared_step(session, task_feeds, len(ids), max(capacity, ids.shape[1] + len(tokens)))
    logits, feed, width = [], ids, ids.shape[1]
    for token in [None, *tokens]:
        if token is not None:
            feed, width = token, width + 1
        out, _ = step({"input_ids": feed, "attention_mask": np.ones((len(ids), width), np.int64)}, None)
        logits.append(out)
    return logits


def _flat(steps: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {f"step {i} logits": value for i, value in enumerate(steps)}


def _per_row(steps: dict[str, list[np.ndarray]], order: list[str]) -> list[np.ndarray]:
    """Row i of task ``order[i]``'s steps, for each step."""
    count = len(next(iter(steps.values())))
    return [np.concatenate([steps[name][step][row:row + 1] for row, name in enumerate(order)])
            for step in range(count)]


def _task_checks(session, cache, refs: References, feeds: dict) -> tuple[list[Check], Check | None]:
    """One check against PyTorch per task and one with a task per row (the tasks in turn); and, apart, the
    per-row run against each task's own run here, which must agree to rounding in any precision."""
    checks, alone = [], {}
    for name, task_feeds in feeds.items():
        alone[name] = _ort_steps(session, cache, refs.ids, refs.tokens[name], task_feeds)
        checks.append(compare_outputs(f"task '{name}' (prefill and {_DECODE_STEPS} decode steps)",
                                      _flat(alone[name]), _flat(refs.logits[name])))
    if len(feeds) == 1:
        return checks, None
    order = [list(feeds)[row % len(feeds)] for row in range(_BATCH)]
    per_row = {key: np.concatenate([feeds[name][key] for name in order]) for key in feeds[order[0]]}
    got = _flat(_ort_steps(session, cache, refs.ids, _per_row(refs.tokens, order), per_row))
    label = f"a task per row ({', '.join(order)})"
    checks.append(compare_outputs(label, got, _flat(_per_row(refs.logits, order))))
    return checks, compare_outputs(f"{label} vs each task alone", got, _flat(_per_row(alone, order)))


def _hot_session(template: Path, tensors: dict[str, np.ndarray], merges: bool):
    """A session of the hot template with ``tensors`` replacing its initializers, built as the runtime
    builds it."""
    import onnxruntime as ort

    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)) for array in tensors.values()]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    replace_initializers(options, tensors, values, merged=merges)
    session = ort.InferenceSession(str(template), options, providers=["CPUExecutionProvider"])
    session.vera_values = values  # ORT does not own external initializers: keep them as long as the session
    return session


def _written_session(template: Path, tensors: dict[str, np.ndarray]):
    """A session of a copy of the hot template with ``tensors`` written into it as its initializers."""
    model = ir.load(template)
    for name, array in tensors.items():
        model.graph.initializers[name].const_value = ir.tensor(array, name=name)
    with tempfile.TemporaryDirectory(dir=template.parent) as folder:
        ir.save(model, Path(folder) / "written.onnx", external_data="written.onnx.data")
        return ort_session(Path(folder) / "written.onnx")  # ONNX Runtime has read the weights


def _hot_checks(template: Path, merges: bool, contract: Contract, cache, refs: References, feeds: dict,
                graph_steps: dict, tokens: list[np.ndarray]) -> Verification:
    """Float templates: each task's hot session against the graph. Merged int4 templates: each task's hot
    session against a copy of the template with that task's merged weights written in — what the session
    must be (its weights themselves were checked against the builder's quantization and PEFT's merge when
    the template was written); against the graph or PyTorch it differs by int4 rounding, as the builder's
    int4 build of the merged model does."""
    if not merges:
        return Verification(tuple(
            compare_outputs(f"hot template, task '{name}', vs the graph",
                            _flat(_ort_steps(_hot_session(template, f, merges), cache, refs.ids, tokens, {})),
                            _flat(graph_steps[name])) for name, f in feeds.items()), _HOT_TOLERANCE)
    plan, checks = MergePlan(merge_path(template), contract), []
    for name, f in feeds.items():
        tensors = plan.initializers(f)
        written = _ort_steps(_written_session(template, tensors), cache, refs.ids, tokens, {})
        checks.append(compare_outputs(f"hot template, task '{name}' merged, vs its weights written in the graph",
                                      _flat(_ort_steps(_hot_session(template, tensors, merges), cache, refs.ids,
                                                       tokens, {})),
                                      _flat(written)))
    return Verification(tuple(checks), DEFAULT_TOLERANCE)


def verify_graphs(graph: Path, template: Path | None, refs: References, feeds: dict[str, dict[str, np.ndarray]],
                  cache: tuple[CacheLayout, int], contract: Contract, tolerance: float) -> Verification:
    """Each task (``feeds``: its λ as ``[1, n]`` feeds) and a task per row against PyTorch (``tolerance``); a
    task per row against each task alone (the same arithmetic: ``DEFAULT_TOLERANCE``); and the first two
    tasks' hot sessions (``template``, ``_hot_checks``), each built after the graph's session is released.
    Raises VeraExportError when a check fails."""
    session = ort_session(graph)
    checks, rows = _task_checks(session, cache, refs, feeds)
    hot_feeds = dict(list(feeds.items())[:_HOT_CHECKS]) if template is not None else {}
    merges = template is not None and merge_path(template).is_file()
    tokens = refs.tokens[next(iter(feeds))]
    graph_steps = {} if merges else {name: _ort_steps(session, cache, refs.ids, tokens, f)
                                     for name, f in hot_feeds.items()}
    del session
    if rows is not None:
        _require_pass(Verification((rows,), DEFAULT_TOLERANCE))
    hot = _hot_checks(template, merges, contract, cache, refs, hot_feeds, graph_steps, tokens) if hot_feeds else None
    if hot is not None:
        _require_pass(hot)
    _require_pass(Verification(tuple(checks), tolerance))
    return Verification((*checks, *filter(None, [rows]), *(hot.checks if hot else ())), tolerance)

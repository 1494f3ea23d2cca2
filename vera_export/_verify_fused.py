"""Check a grafted builder graph the way generation uses it: a prefill, then decode steps that feed each
step's ``present`` back as ``past``, in ONNX Runtime against the PEFT model run over the whole sequence —
for each task alone and for a batch with a task per row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vera_runtime import Contract
from vera_runtime.layout import CacheLayout

from ._agreement import Check, compare_outputs
from ._defaults import DEFAULT_TOLERANCE
from ._discover import find_vera_layers
from ._export import _require_pass, current_task
from ._fused_graphs import cache_layout
from ._verify import Verification, ort_session

_BATCH, _PROMPT, _DECODE_STEPS = 2, 6, 3


def _ort_steps(session, layout: CacheLayout, capacity: int, ids: np.ndarray, tokens: list[np.ndarray],
               task_feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Prefill ``ids``, then feed ``tokens`` one step at a time, the cache in one shared buffer as the
    runtime keeps it; each step's logits ``[batch, new, vocab]``."""
    step = layout.shared_step(session, task_feeds, len(ids), max(capacity, ids.shape[1] + len(tokens)))
    logits, feed, width = [], ids, ids.shape[1]
    for token in [None, *tokens]:
        if token is not None:
            feed, width = token, width + 1
        out, _ = step({"input_ids": feed, "attention_mask": np.ones((len(ids), width), np.int64)}, None)
        logits.append(out)
    return logits


def _torch_steps(model: torch.nn.Module, ids: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The same steps in PyTorch, each over the whole sequence so far (no cache), and the greedy tokens."""
    logits, tokens, sequence = [], [], torch.from_numpy(ids)
    with torch.no_grad():
        for step in range(_DECODE_STEPS + 1):
            out = model(input_ids=sequence).logits.numpy()
            logits.append(out if step == 0 else out[:, -1:])
            token = out[:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(token)
            sequence = torch.cat([sequence, torch.from_numpy(token)], dim=1)
    return logits, tokens[:-1]


def _flat(steps: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {f"step {i} logits": value for i, value in enumerate(steps)}


def verify_fused(session, model: torch.nn.Module, cache: tuple[CacheLayout, int], vocab: int,
                 tasks: dict[str, dict[str, np.ndarray]], use_task: Callable[[str], None]
                 ) -> tuple[list[Check], Check | None]:
    """One check against PyTorch per task (its feeds ``[1, n]``) and one with a task per row (the tasks in
    turn); and, apart, the per-row run against each task's own run in ONNX Runtime, which must agree to
    rounding in any precision (int4 included). ``cache``: the layout and the buffer's least capacity;
    ``use_task(name)`` makes the PyTorch model run that task."""
    ids = np.random.default_rng(0).integers(3, vocab, (_BATCH, _PROMPT), dtype=np.int64)
    references = {}
    for name in tasks:
        use_task(name)
        references[name] = _torch_steps(model, ids)
    checks, alone = [], {}
    for name, feeds in tasks.items():
        expected, tokens = references[name]
        alone[name] = _ort_steps(session, *cache, ids, tokens, feeds)
        checks.append(compare_outputs(f"task '{name}' (prefill and {_DECODE_STEPS} decode steps)",
                                      _flat(alone[name]), _flat(expected)))
    if len(tasks) == 1:
        return checks, None
    order = [list(tasks)[row % len(tasks)] for row in range(_BATCH)]

    def rows(steps_of: Callable[[str], list[np.ndarray]], count: int) -> list[np.ndarray]:
        """Row i of task order[i]'s steps, for each step."""
        return [np.concatenate([steps_of(name)[step][row:row + 1] for row, name in enumerate(order)])
                for step in range(count)]

    per_row = {key: np.concatenate([tasks[name][key] for name in order]) for key in tasks[order[0]]}
    got = _flat(_ort_steps(session, *cache, ids, rows(lambda n: references[n][1], _DECODE_STEPS), per_row))
    label = f"a task per row ({', '.join(order)})"
    checks.append(compare_outputs(label, got, _flat(rows(lambda n: references[n][0], _DECODE_STEPS + 1))))
    return checks, compare_outputs(f"{label} vs each task alone", got, _flat(rows(alone.get, _DECODE_STEPS + 1)))


def verify_hot(session, hot_session: Callable[[str], object], cache: tuple[CacheLayout, int], vocab: int,
               tasks: dict[str, dict[str, np.ndarray]]) -> list[Check]:
    """Each task's hot session (``hot_session(name)``: its λ folded into the template; one at a time, each
    holds a copy of the weights) against the graph run with that task's feeds, on the same prefill and
    decode tokens: the same arithmetic but for rounding, in any precision."""
    rng = np.random.default_rng(1)
    ids = rng.integers(3, vocab, (_BATCH, _PROMPT), dtype=np.int64)
    tokens = [rng.integers(3, vocab, (_BATCH, 1), dtype=np.int64) for _ in range(_DECODE_STEPS)]
    checks = []
    for name, feeds in tasks.items():
        expected = _ort_steps(session, *cache, ids, tokens, feeds)
        got = _ort_steps(hot_session(name), *cache, ids, tokens, {})
        checks.append(compare_outputs(f"hot template, task '{name}', vs the graph", _flat(got), _flat(expected)))
    return checks


def _hot_session(template: Path, tensors: dict[str, np.ndarray]):
    """A session of the hot template with one task's λ, built as the runtime builds it."""
    import onnxruntime as ort

    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)) for array in tensors.values()]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_external_initializers(list(tensors), values)
    session = ort.InferenceSession(str(template), options, providers=["CPUExecutionProvider"])
    session.vera_values = values  # ORT does not own external initializers: keep them as long as the session
    return session


# The hot template computes the VeRA delta in another order than the graph: rounding in float32, but in
# int4 MatMulNBits (accuracy level 4) quantizes its input to int8 per block, so a rounding difference can
# move a value by one int8 step, and the next layers carry it (1.5% of the logits' scale measured on a
# 125M Llama; a task's λ in the wrong place or of another task moves them by tens of percent).
HOT_TOLERANCES = {"float32": DEFAULT_TOLERANCE, "int4": 0.05}
# The template's structure is the same for every task: the default task and one other (whose λ must
# replace the template's) check it; each hot session holds a copy of the weights and takes seconds.
_HOT_CHECKS = 2


def verify_graphs(graph: Path, template: Path | None, peft_model: torch.nn.Module, root: torch.nn.Module,
                  contract: Contract, names: list[str], tolerance: float) -> Verification:
    """Each task and a task per row against PEFT (``tolerance``); a task per row against each task alone
    (the same arithmetic: ``DEFAULT_TOLERANCE``), and the first two tasks' hot sessions (``template``)
    against the graph (``HOT_TOLERANCES``). Raises VeraExportError when a check fails."""
    feeds = {}
    for name in names:
        peft_model.set_adapter(name)
        tensors = current_task(find_vera_layers(root, name), contract).tensors
        feeds[name] = {key: value[None] for key, value in tensors.items()}
    session = ort_session(graph)
    cache, vocab = (cache_layout(root.config), contract.kv_shared_buffer), contract.input_highs["input_ids"]
    checks, rows = verify_fused(session, peft_model, cache, vocab, feeds, peft_model.set_adapter)
    if rows is not None:
        _require_pass(Verification((rows,), DEFAULT_TOLERANCE))
    hot = []
    if template is not None:  # a task folded into the hot template computes what the graph does
        checked = dict(list(feeds.items())[:_HOT_CHECKS])
        hot = verify_hot(session, lambda name: _hot_session(template, feeds[name]), cache, vocab, checked)
        _require_pass(Verification(tuple(hot), HOT_TOLERANCES[contract.weight_dtype]))
    del session
    _require_pass(Verification(tuple(checks), tolerance))
    return Verification((*checks, *filter(None, [rows]), *hot), tolerance)

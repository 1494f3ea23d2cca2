"""Check a grafted builder graph the way generation uses it: a prefill, then decode steps that feed each
step's ``present`` back as ``past``, in ONNX Runtime against the PEFT model run over the whole sequence —
for each task alone and for a batch with a task per row."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ._agreement import Check, compare_outputs

_BATCH, _PROMPT, _DECODE_STEPS = 2, 6, 3


def _ort_steps(session, layers: int, kv_heads: int, head_dim: int, ids: np.ndarray, tokens: list[np.ndarray],
               task_feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Prefill ``ids``, then feed ``tokens`` one step at a time; each step's logits ``[batch, new, vocab]``."""
    past = {f"past_key_values.{i}.{kind}": np.zeros((len(ids), kv_heads, 0, head_dim), np.float32)
            for i in range(layers) for kind in ("key", "value")}
    names = ["logits", *(name.replace("past_key_values", "present") for name in past)]
    logits, feed, width = [], ids, ids.shape[1]
    for token in [None, *tokens]:
        if token is not None:
            feed, width = token, width + 1
        out = session.run(names, {"input_ids": feed, "attention_mask": np.ones((len(ids), width), np.int64),
                                  **past, **task_feeds})
        logits.append(out[0])
        past = dict(zip(past, out[1:], strict=True))
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


def verify_fused(session, model: torch.nn.Module, cache: tuple[int, int, int], vocab: int,
                 tasks: dict[str, dict[str, np.ndarray]], use_task: Callable[[str], None]) -> list[Check]:
    """One check per task (its feeds ``[1, n]``) and one with a task per row (the tasks in turn).
    ``use_task(name)`` makes the PyTorch model run that task."""
    ids = np.random.default_rng(0).integers(3, vocab, (_BATCH, _PROMPT), dtype=np.int64)
    references = {}
    for name in tasks:
        use_task(name)
        references[name] = _torch_steps(model, ids)
    checks = []
    for name, feeds in tasks.items():
        expected, tokens = references[name]
        got = _ort_steps(session, *cache, ids, tokens, feeds)
        checks.append(compare_outputs(f"task '{name}' (prefill and {_DECODE_STEPS} decode steps)", _flat(got),
                                      _flat(expected)))
    if len(tasks) > 1:
        order = [list(tasks)[row % len(tasks)] for row in range(_BATCH)]
        per_row = {key: np.concatenate([tasks[name][key] for name in order]) for key in tasks[order[0]]}
        tokens = [np.concatenate([references[name][1][step][row:row + 1] for row, name in enumerate(order)])
                  for step in range(_DECODE_STEPS)]
        expected = [np.concatenate([references[name][0][step][row:row + 1] for row, name in enumerate(order)])
                    for step in range(_DECODE_STEPS + 1)]
        got = _ort_steps(session, *cache, ids, tokens, per_row)
        checks.append(compare_outputs(f"a task per row ({', '.join(order)})", _flat(got), _flat(expected)))
    return checks

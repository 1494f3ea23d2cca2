"""Check a KV-cache graph the way it is used: a left-padded prefill, then decode steps that feed
each step's ``present`` back as the next ``past``, in ONNX Runtime against PyTorch's own cache."""

from __future__ import annotations

import numpy as np
import torch

from vera_runtime.layout import positions

from ._agreement import Check, compare_outputs
from ._kv_cache import CachedCausalLM

_PROMPTS = (6, 4)  # two rows, the second left-padded by two
_DECODE_STEPS = 3


def _prompt(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    width = max(_PROMPTS)
    ids = rng.integers(0, vocab, (len(_PROMPTS), width), dtype=np.int64)
    mask = np.array([[0] * (width - n) + [1] * n for n in _PROMPTS], dtype=np.int64)
    return np.where(mask == 1, ids, 0), mask


def _steps(run, model: CachedCausalLM, tokens: list[np.ndarray] | None) -> tuple[list[dict], list[np.ndarray]]:
    """Prefill and decode with ``run(feeds) -> outputs``; the next tokens are ``tokens`` when given
    (so both sides see the same ones), else each step's argmax. Returns every step's outputs."""
    ids, mask = _prompt(model.config.vocab_size)
    past = model.layout.empty(len(ids))
    outputs, chosen = [], []
    for step in range(_DECODE_STEPS + 1):
        out = run({"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)[:, -ids.shape[1]:],
                   **past})
        outputs.append(out)
        chosen.append(tokens[step] if tokens else out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64))
        ids, mask = chosen[-1], np.concatenate([mask, np.ones_like(chosen[-1])], axis=1)
        past = {p: out[q] for p, q in zip(model.layout.past, model.layout.present, strict=True)}
    return outputs, chosen


def _torch_run(model: CachedCausalLM):
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = model(**{name: torch.from_numpy(value) for name, value in feeds.items()})
        return {name: value.numpy() for name, value in out.items()}

    return run


def _ort_run(session, task_feeds: dict[str, np.ndarray]):
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {**feeds, **task_feeds}), strict=True))

    return run


def _flat(steps: list[dict]) -> dict[str, np.ndarray]:
    return {f"step {i} {name}": value for i, out in enumerate(steps) for name, value in out.items()}


def generation_check(name: str, model: CachedCausalLM, session, task_feeds: dict[str, np.ndarray]) -> Check:
    """Prefill plus decode steps of ONNX Runtime (with ``task_feeds`` fed) against the PyTorch model as
    its parameters stand; both are fed PyTorch's greedy tokens."""
    expected, tokens = _steps(_torch_run(model), model, None)
    got, _ = _steps(_ort_run(session, task_feeds), model, tokens)
    return compare_outputs(name, _flat(got), _flat(expected))


def mixed_generation_check(name: str, model: CachedCausalLM, session, rows: list) -> Check:
    """A task per row: ``rows[i]`` is (task feeds as ``[1, n]`` arrays, a context manager that sets the same
    task in the model). Rows are independent, so row i must equal row i of its own task's run."""
    references = []
    for _, use in rows:
        with use():
            references.append(_steps(_torch_run(model), model, None))
    tokens = [np.concatenate([ref[1][step][i:i + 1] for i, ref in enumerate(references)])
              for step in range(_DECODE_STEPS + 1)]
    mixed = {key: np.concatenate([task_feeds[key] for task_feeds, _ in rows]) for key in rows[0][0]}
    got, _ = _steps(_ort_run(session, mixed), model, tokens)
    expected = [{key: np.concatenate([ref[0][step][key][i:i + 1] for i, ref in enumerate(references)])
                 for key in got[step]} for step in range(len(got))]
    return compare_outputs(name, _flat(got), _flat(expected))

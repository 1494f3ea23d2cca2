"""How closely a converted graph follows the float32 graph it came from, task by task (torch-free)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vera_runtime import Contract, InputInfo, VeraSession

PER_ROW = "a task per row"


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison: the largest |got - reference| over all outputs, and the outputs' scale."""

    name: str
    max_abs_diff: float
    scale: float

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.scale, 1e-6)


@dataclasses.dataclass(frozen=True)
class Agreement(Check):
    """One task (``name``) of a converted graph against the float32 graph on generated inputs, with
    the share of positions whose argmax (first output, last axis) is unchanged."""

    argmax_agreement: float = 1.0


def generated_feeds(
    inputs: dict[str, InputInfo], contract: Contract, batch: int, sequence: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs the graph accepts: token ids within the vocabulary, masks of ones, other ints zero,
    floats normal; ``batch`` rows, other symbolic dimensions ``sequence`` (within the position table).
    A KV-cache graph gets half of ``sequence`` as its past and half as new tokens."""
    rng = np.random.default_rng(seed)
    sizes = _dim_sizes(inputs, contract, batch, sequence)
    feeds = {}
    for name, info in inputs.items():
        shape = tuple(dim if isinstance(dim, int) else sizes.get(str(dim), sequence) for dim in info.shape)
        if info.dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(info.dtype)
        elif name in contract.input_highs:
            feeds[name] = rng.integers(0, contract.input_highs[name], shape).astype(info.dtype)
        else:
            feeds[name] = (np.ones if "mask" in name else np.zeros)(shape, dtype=info.dtype)
    return feeds


def _dim_sizes(inputs: dict[str, InputInfo], contract: Contract, batch: int, sequence: int) -> dict[str, int]:
    names = {str(dim) for info in inputs.values() for dim in info.shape if not isinstance(dim, int)}
    sizes = {name: min(sequence, contract.dim_limits.get(name, sequence)) for name in names} | {"batch": batch}
    if "past_sequence" in names:  # the mask and present span past + new: total_sequence must add up
        total = min(sequence, contract.dim_limits.get("total_sequence", sequence))
        sizes |= {"past_sequence": total // 2, "sequence": total - total // 2, "total_sequence": total}
    return sizes


def compare_outputs(name: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> Check:
    """The largest |got - ref| over ``ref``'s outputs, and their scale (the exporter's checks use it too)."""
    diff = max(float(np.abs(got[k] - ref[k]).max(initial=0.0)) for k in ref)
    scale = max(float(np.abs(ref[k]).max(initial=0.0)) for k in ref)
    return Check(name, diff, scale)


def _agreement(task: str, new: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> Agreement:
    first = next(iter(ref))
    same = np.argmax(new[first], axis=-1) == np.argmax(ref[first], axis=-1) if ref[first].ndim else np.array(True)
    check = compare_outputs(task, new, ref)
    return Agreement(check.name, check.max_abs_diff, check.scale, argmax_agreement=float(np.mean(same)))


def compare_forms(reference: Path, converted: Path, *, batch: int = 4, sequence: int = 16) -> tuple[Agreement, ...]:
    """Run both graphs with every task beside them (the default task when there are none), and with a
    task per row when there are several, on the same generated inputs."""
    ref, new = VeraSession(reference, "cpu"), VeraSession(converted, "cpu")
    ref.load_tasks_beside()
    new.load_tasks_beside()
    feeds = generated_feeds(ref.inputs, ref.contract, batch, sequence)
    tasks = sorted(ref.tasks)
    results = [
        _agreement(task or ref.default_task, new.run(feeds, task=task), ref.run(feeds, task=task))
        for task in tasks or [None]
    ]
    if len(tasks) >= 2:
        rows = [tasks[i % len(tasks)] for i in range(batch)]
        results.append(_agreement(PER_ROW, new.run(feeds, tasks=rows), ref.run(feeds, tasks=rows)))
    return tuple(results)

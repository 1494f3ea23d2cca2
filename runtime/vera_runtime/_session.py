"""VeraSession: one ONNX Runtime session, many tasks, switched per call or per batch row.

Made of parts with one job each: the loaded tasks and the feeds of a run (``_tasks.TaskStore``), the
hot tasks and their builder thread (``_hot.HotTasks``), and generation (``_generate``); the session
checks what callers give it, runs the graph, and releases everything on ``close()``.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ._contract import Contract
from ._device import create_session
from ._errors import ClosedError, FeedError
from ._feeds import InputInfo, check_feeds
from ._generate import CacheLayout, Sampling, TokenIds, cache_step, check_length, check_prompt, stream
from ._hot import HotTasks
from ._io import file_problem
from ._publish import finish_publish
from ._taskfile import task_files_beside
from ._tasks import TaskStore


def _names(value, what: str, example: str) -> None:
    if value is not None and (isinstance(value, str) or not isinstance(value, (Sequence, np.ndarray))
                              or not all(isinstance(v, str) for v in value)):
        raise FeedError(f"{what} takes a list of names, e.g. {example}; got {value!r:.80}.")


def _check_choice(task, tasks, outputs) -> None:
    """task=, tasks= and outputs= by type, before anything runs."""
    if task is not None and tasks is not None:
        raise FeedError("give task=NAME for the whole batch or tasks=[NAME per row], not both.")
    if task is not None and not isinstance(task, str):
        raise FeedError(f"task= takes one task name (a str), got {task!r:.80}; for a task per row use tasks=[...].")
    _names(tasks, "tasks=", "tasks=['topic', 'sentiment'] (one per row)")
    _names(outputs, "outputs=", "outputs=['logits']")


class VeraSession:
    """Load a vera-export graph once; run it with any loaded task, per call or per batch row.

    ``device``: "auto" (CUDA when ONNX Runtime's CUDA provider really starts, else CPU), "cpu"
    or "cuda" (raises DeviceError naming what is missing). On CUDA, task vectors are copied to
    the GPU once, when loaded, and runs bind them with IOBinding.

    ``hot_tasks``: how many tasks to also serve at merged-graph speed, from the hot template
    (``<stem>.hot.onnx``, written by ``vera-export --hot-template``; used only when its content hashes to
    the digest the graph records, else never, with one warning). A task used for 8 calls in a row
    with ``task=`` is specialised in the background while the factored graph keeps serving it; the least
    recently specialised task is dropped beyond ``hot_tasks``. Default: 1 when the template
    exists, else 0. Each hot task holds a session, so a copy of the weights, in memory.

    ``bank``: a ``TaskBank`` file of this graph: ``task=``/``tasks=`` names that are not loaded are read
    from it (the rows straight from the mapped file, each checked on first use), with no ``load_task``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "auto",
        *,
        threads: int | None = None,
        session_options: ort.SessionOptions | None = None,
        hot_tasks: int | None = None,
        bank: str | os.PathLike | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        finish_publish(self.model_path)  # an export killed while renaming its files: finish it (checked) first
        if problem := file_problem(self.model_path):
            raise FileNotFoundError(f"graph file {self.model_path} {problem}.")
        options = session_options or ort.SessionOptions()
        options.log_severity_level = max(options.log_severity_level, 3)  # one warning per λ default otherwise
        if threads:
            options.intra_op_num_threads = threads
        self._session, self.device = create_session(str(self.model_path), device, options)
        metadata = self._session.get_modelmeta().custom_metadata_map
        self.contract = Contract.from_metadata(metadata, str(self.model_path))
        self._task_inputs = set(self.contract.task_shapes())
        self._inputs = {  # task inputs are listed here too in graphs without task defaults (the web form)
            i.name: InputInfo.from_ort(i) for i in self._session.get_inputs() if i.name not in self._task_inputs
        }
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.cache = CacheLayout.of(self._inputs, self.output_names)  # None: exported without --kv-cache
        self._token_ids = TokenIds.beside(self.model_path) if self.cache else TokenIds()  # read once, not per call
        self._store = TaskStore(self.contract, self.device, self.model_path.name, self._open_bank(bank))
        self._hot = HotTasks(self.model_path, self.contract, self._store, options,
                             0 if self.device == "cuda" else hot_tasks)  # hot sessions run on the CPU
        self.hot_template = self._hot.template.path
        self._closed = False

    @property
    def bank(self):
        """The ``TaskBank`` given as ``bank=``, or None."""
        return self._store.bank

    def _open_bank(self, bank: str | os.PathLike | None):
        """The bank at ``bank``, checked to be this graph's (BankError otherwise)."""
        if bank is None:
            return None
        from ._bank import TaskBank

        opened = TaskBank(bank)
        opened.check_contract(self.contract)
        return opened

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Release the ONNX Runtime sessions (hot ones included), the hot-task thread and every task's
        copies. Idempotent; afterwards every call raises ClosedError."""
        if self._closed:
            return
        self._closed = True
        self._hot.close()
        self._store.clear()
        self._session = None

    def __enter__(self) -> VeraSession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _open(self) -> None:
        if self._closed:
            raise ClosedError(f"this VeraSession of {self.model_path.name} was closed: create another one.")

    # -- tasks ---------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """Names of the loaded tasks."""
        return self._store.names

    def has_task(self, name: str) -> bool:
        """Whether ``task=name`` runs: a loaded task, or one of the bank's."""
        return name in self._store.names or (self.bank is not None and name in self.bank)

    @property
    def default_task(self) -> str:
        """The task the graph runs when none is chosen (its λ defaults)."""
        return self.contract.default_task

    @property
    def inputs(self) -> dict[str, InputInfo]:
        """The model inputs a run needs: name, dtype and shape (strings are symbolic dimensions)."""
        return dict(self._inputs)

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def load_task(self, name: str, source: str | os.PathLike | Mapping[str, np.ndarray]) -> None:
        """Load (or replace) task ``name`` from a task file, an .onnx_adapter or a PEFT adapter file, or from
        a mapping of the tensor names a native task file uses to arrays of its shapes.

        It is read and checked completely before anything changes: a failure raises TaskFileError and
        leaves the session and every loaded task as they were.
        """
        self._open()
        self._install([self._store.read(name, source)])

    def load_tasks_beside(self) -> list[str]:
        """Load every task file of this graph found beside it (``<stem>.<task>.task.safetensors``).

        All or nothing: every file is read and checked before any task is added or replaced."""
        self._open()
        beside = task_files_beside(self.model_path)
        self._install([self._store.read(name, path) for name, path in beside.items()])
        return list(beside)

    def _install(self, tasks) -> None:
        self._store.install(tasks)
        for task in tasks:
            self._hot.forget(task.name)

    def unload_task(self, name: str) -> None:
        """Forget task ``name`` (FeedError if it is not loaded)."""
        self._open()
        self._store.unload(name)
        self._hot.forget(name)

    # -- running -------------------------------------------------------------------------

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        task: str | None = None,
        tasks: Sequence[str] | None = None,
        outputs: Sequence[str] | None = None,
        keep_on_device: bool = False,
    ) -> dict[str, np.ndarray | ort.OrtValue]:
        """Run the model inputs ``feeds`` with one ``task``, or ``tasks`` (one name per batch row),
        or neither (the graph's default task). Returns outputs by name: numpy arrays, or OrtValues
        left on the GPU with ``keep_on_device=True``."""
        self._open()
        _check_choice(task, tasks, outputs)
        batch = check_feeds(feeds, self._inputs, self._task_inputs, self.contract)
        names = list(outputs or self.output_names)
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise FeedError(f"the graph has no output {unknown}; its outputs are {self.output_names}.")
        hot = self._hot.session_for(task) if tasks is None else None
        if hot is not None:
            return dict(zip(names, hot.session.run(names, dict(feeds)), strict=True))
        task_feeds = self._store.feeds(task, tasks, batch)
        if self.device == "cuda":
            return self._run_bound(feeds, task_feeds, names, keep_on_device)
        return dict(zip(names, self._session.run(names, {**feeds, **task_feeds}), strict=True))

    # -- hot tasks -----------------------------------------------------------------------

    @property
    def hot_tasks(self) -> int:
        """How many tasks may be served from hot sessions at once (0: none)."""
        return self._hot.capacity

    @property
    def hot(self) -> tuple[str, ...]:
        """Tasks served from a specialised session right now."""
        return self._hot.names

    def specialize(self, name: str) -> concurrent.futures.Future:
        """Build ``name``'s hot session in the background; the returned future completes when it serves."""
        self._open()
        return self._hot.specialize(self._store.get(name))

    # -- generation ----------------------------------------------------------------------

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        task: str | None = None,
        tasks: Sequence[str] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Generate up to ``max_new_tokens`` tokens after each prompt row; returns ``[batch, prompt + new]``
        token ids, rows that ended early (eos) padded with the pad id. Arguments as ``generate_stream``."""
        ids, _ = check_prompt(input_ids, attention_mask)
        new = list(self.generate_stream(
            input_ids, attention_mask, task=task, tasks=tasks, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            seed=seed,
        ))
        return np.concatenate([ids, np.stack(new, axis=1)], axis=1) if new else ids

    def generate_stream(
        self,
        input_ids,
        attention_mask=None,
        *,
        task: str | None = None,
        tasks: Sequence[str] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield each step's next token for every row (``[batch]`` int64) of left-padded prompts, with one
        ``task`` or ``tasks`` (one per row). Greedy unless ``do_sample`` (temperature, top_k, top_p; a
        ``seed`` makes draws repeatable). eos and pad ids default to the graph's genai_config.json."""
        self._open()
        self.require_cache()
        _check_choice(task, tasks, None)
        ids, mask = check_prompt(input_ids, attention_mask)
        check_length(ids, max_new_tokens, self.contract.dim_limits.get("total_sequence"))
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        tokens = self._token_ids.overridden(eos_token_id, pad_token_id)
        hot = self._hot.session_for(task) if tasks is None else None  # a hot task generates at merged speed too
        task_feeds = {} if hot else self._store.feeds(task, tasks, len(ids))
        positions = {"position_ids": ids} if self.cache.position_ids else {}
        check_feeds({"input_ids": ids, "attention_mask": mask, **positions, **self.cache.empty(len(ids))},
                    self._inputs, self._task_inputs, self.contract)
        session = hot.session if hot else self._session
        if self.contract.kv_shared_buffer:  # the fused graph: the positions this call needs, at least its minimum
            capacity = max(ids.shape[1] + max_new_tokens, self.contract.kv_shared_buffer)
            step = self.cache.shared_step(session, task_feeds, len(ids), capacity)
        else:
            step = cache_step(session, self.cache, task_feeds, on_device=self.device == "cuda")
        # sliding-window caches (a least buffer above 1) refuse a prefill with padded rows
        prefill_all = (self.contract.kv_shared_buffer or 1) == 1
        return stream(step, self.cache, ids, mask, max_new_tokens, sampling, tokens, prefill_all)

    def require_cache(self) -> None:
        """FeedError unless the graph takes a KV cache (``vera-export --kv-cache``): generation needs one."""
        if self.cache is None:
            raise FeedError(
                f"{self.model_path.name} has no KV cache: generation needs a graph exported with"
                " `vera-export ADAPTER_DIR --kv-cache --out FILE.onnx`."
            )

    def token_ids(self) -> TokenIds:
        """eos and pad ids from the genai_config.json exported beside the graph (none when absent)."""
        return self._token_ids

    def _run_bound(self, feeds, task_feeds, names, keep_on_device):
        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in task_feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cuda" if keep_on_device else "cpu")
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {n: v if keep_on_device else v.numpy() for n, v in zip(names, values, strict=True)}

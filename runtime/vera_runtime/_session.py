"""VeraSession: one ONNX Runtime session, many tasks, switched per call or per batch row."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ._contract import Contract
from ._device import create_session
from ._errors import FeedError, GraphError
from ._feeds import InputInfo, check_feeds
from ._generate import CacheLayout, Sampling, TokenIds, cache_step, check_length, check_prompt, stream
from ._hot import HotTemplate
from ._io import file_problem
from ._loaders import load_any_task
from ._publish import finish_publish
from ._taskfile import check_task_name, task_files_beside

_ROW_CACHE = 32  # device copies of recent per-row task stacks, on CUDA
_HOT_AFTER = 8  # consecutive single-task calls before a task is specialised: alternating tasks don't thrash
_INHERITED_CONFIG = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


@dataclasses.dataclass(frozen=True)
class _HotSession:
    """A session of the hot template with one task's tensors as constant initializers: ONNX
    Runtime folds W + ΔW at creation, so runs cost what a merged graph costs."""

    task: _LoadedTask
    session: ort.InferenceSession
    values: list[ort.OrtValue]  # ORT does not own external initializers: they live as long as the session


@dataclasses.dataclass(frozen=True)
class _LoadedTask:
    name: str
    path: Path
    feeds: dict[str, np.ndarray]  # float32 [1, n], contiguous: fed as they are on the CPU
    on_device: dict[str, ort.OrtValue] | None  # the same, copied once to the GPU


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
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "auto",
        *,
        threads: int | None = None,
        session_options: ort.SessionOptions | None = None,
        hot_tasks: int | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        finish_publish(self.model_path)  # an export killed while renaming its files: finish it (checked) first
        if problem := file_problem(self.model_path):
            raise FileNotFoundError(f"graph file {self.model_path} {problem}.")
        options = session_options or ort.SessionOptions()
        options.log_severity_level = max(options.log_severity_level, 3)  # one warning per λ default otherwise
        if threads:
            options.intra_op_num_threads = threads
        self._options = options
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
        self._tasks: dict[str, _LoadedTask] = {}
        self._rows: collections.OrderedDict[tuple[str, ...], dict[str, ort.OrtValue]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._template = HotTemplate(self.model_path, self.contract.hot_template_sha256)
        self.hot_template = self._template.path
        if hot_tasks is None:
            hot_tasks = 1 if self._template.exists() else 0
        self.hot_tasks = hot_tasks
        self._hot: collections.OrderedDict[str, _HotSession] = collections.OrderedDict()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._streak: tuple[str | None, int] = (None, 0)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vera-hot")

    # -- tasks ---------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """Names of the loaded tasks."""
        return tuple(self._tasks)

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

    def load_task(self, name: str, path: str | os.PathLike) -> None:
        """Load (or replace) task ``name`` from a task file, an .onnx_adapter or a PEFT adapter file.

        The file is read and checked completely before anything changes: a failure raises
        TaskFileError and leaves the session and every loaded task as they were.
        """
        self._install([self._read(name, path)])

    def load_tasks_beside(self) -> list[str]:
        """Load every task file of this graph found beside it (``<stem>.<task>.task.safetensors``).

        All or nothing: every file is read and checked before any task is added or replaced."""
        beside = task_files_beside(self.model_path)
        self._install([self._read(name, path) for name, path in beside.items()])
        return list(beside)

    def _read(self, name: str, path: str | os.PathLike) -> _LoadedTask:
        check_task_name(name)
        task = load_any_task(path, self.contract)
        feeds = {key: np.ascontiguousarray(task.tensors[key], dtype=np.float32)[None] for key in self._task_inputs}
        on_device = None
        if self.device == "cuda":
            on_device = {key: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) for key, value in feeds.items()}
        return _LoadedTask(name, Path(path), feeds, on_device)

    def _install(self, tasks: list[_LoadedTask]) -> None:
        with self._lock:
            for loaded in tasks:
                self._tasks[loaded.name] = loaded
                self._forget_rows(loaded.name)
                self._hot.pop(loaded.name, None)

    def unload_task(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise FeedError(f"task '{name}' is not loaded; loaded tasks: {sorted(self._tasks)}.")
            del self._tasks[name]
            self._forget_rows(name)
            self._hot.pop(name, None)

    def _forget_rows(self, name: str) -> None:
        for key in [key for key in self._rows if name in key]:
            del self._rows[key]

    def _get(self, name: str) -> _LoadedTask:
        task = self._tasks.get(name)
        if task is None:
            raise FeedError(f"task '{name}' is not loaded; loaded tasks: {sorted(self._tasks)}. Use load_task().")
        return task

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
        _check_choice(task, tasks, outputs)
        batch = check_feeds(feeds, self._inputs, self._task_inputs, self.contract)
        names = list(outputs or self.output_names)
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise FeedError(f"the graph has no output {unknown}; its outputs are {self.output_names}.")
        with self._lock:  # a consistent view of the tasks; the run itself is outside the lock
            hot = self._hot_for(task, tasks)
            lambdas = {} if hot else self._lambdas(task, tasks, batch)
        if hot is not None:
            return dict(zip(names, hot.session.run(names, dict(feeds)), strict=True))
        if self.device == "cuda":
            return self._run_bound(feeds, lambdas, names, keep_on_device)
        return dict(zip(names, self._session.run(names, {**feeds, **lambdas}), strict=True))

    def _lambdas(self, task: str | None, tasks: Sequence[str] | None, batch: int) -> dict:
        if tasks is not None:
            tasks = tuple(tasks)
            if len(tasks) != batch:
                raise FeedError(f"tasks= gives {len(tasks)} names for a batch of {batch} rows: give one per row.")
            if len(set(tasks)) == 1:
                task = tasks[0]
            else:
                return self._row_lambdas(tasks)
        if task is None and self.contract.task_defaults:
            return {}
        if task is None and self.default_task not in self._tasks:
            raise FeedError(
                f"{self.model_path.name} holds no task values (a graph converted --to web): load its task files"
                f" first, e.g. load_tasks_beside(), or pass task=NAME; its default task is '{self.default_task}'."
            )
        loaded = self._get(task or self.default_task)
        return loaded.on_device if loaded.on_device is not None else loaded.feeds

    # -- hot tasks -----------------------------------------------------------------------

    @property
    def hot(self) -> tuple[str, ...]:
        """Tasks served from a specialised session right now."""
        return tuple(self._hot)

    def specialize(self, name: str) -> concurrent.futures.Future:
        """Build ``name``'s hot session in the background; the returned future completes when it serves."""
        if not self._template.exists():
            raise FileNotFoundError(
                f"no hot template {self.hot_template}: export with `vera-export ... --hot-template`."
            )
        if problem := self._template.problem():
            raise GraphError(problem)
        with self._lock:
            return self._schedule(self._get(name))

    def _schedule(self, task: _LoadedTask) -> concurrent.futures.Future:
        """Queue ``task``'s hot session unless it is queued already (call with the lock held)."""
        if task.name not in self._pending:
            self._pending[task.name] = self._executor.submit(self._build_hot, task)
        return self._pending[task.name]

    def _hot_for(self, task: str | None, tasks: Sequence[str] | None) -> _HotSession | None:
        """The hot session for a single-task run, scheduling one when the task has none yet."""
        if task is None or tasks is not None or not self.hot_tasks or self.device == "cuda":
            return None
        hot = self._hot.get(task)
        if hot is not None and hot.task is self._tasks.get(task):
            self._hot.move_to_end(task)
            return hot
        streak = self._streak[1] + 1 if self._streak[0] == task else 1
        self._streak = (task, streak)
        if streak >= _HOT_AFTER and task in self._tasks and self._template.exists() and not self._template.refused():
            self._schedule(self._tasks[task])
        return None

    def _build_hot(self, task: _LoadedTask) -> None:
        try:
            if self._template.problem():  # checked (and warned about) once; never built from
                return
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = self._options.intra_op_num_threads
            for key in _INHERITED_CONFIG:  # what the caller set on their options applies here too
                with contextlib.suppress(Exception):  # ORT raises when the key was never set
                    options.add_session_config_entry(key, self._options.get_session_config_entry(key))
            values = [ort.OrtValue.ortvalue_from_numpy(array) for array in task.feeds.values()]
            # Replaced before ORT optimises (unlike add_initializer): W + ΔW folds into one constant.
            options.add_external_initializers(list(task.feeds), values)
            session = ort.InferenceSession(str(self.hot_template), options, providers=["CPUExecutionProvider"])
            with self._lock:
                if self._tasks.get(task.name) is task:  # not unloaded or replaced meanwhile
                    self._hot[task.name] = _HotSession(task, session, values)
                    while len(self._hot) > max(self.hot_tasks, 1):
                        self._hot.popitem(last=False)
        finally:
            with self._lock:
                self._pending.pop(task.name, None)

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
        self.require_cache()
        _check_choice(task, tasks, None)
        ids, mask = check_prompt(input_ids, attention_mask)
        check_length(ids, max_new_tokens, self.contract.dim_limits.get("total_sequence"))
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        tokens = self._token_ids.overridden(eos_token_id, pad_token_id)
        with self._lock:  # a task served hot (--hot-template) generates at merged-graph speed too
            hot = self._hot_for(task, tasks)
            lambdas = {} if hot else self._lambdas(task, tasks, len(ids))
        check_feeds({"input_ids": ids, "attention_mask": mask, "position_ids": ids, **self.cache.empty(len(ids))},
                    self._inputs, self._task_inputs, self.contract)
        session = hot.session if hot else self._session
        step = cache_step(session, self.cache, lambdas, on_device=self.device == "cuda")
        return stream(step, self.cache, ids, mask, max_new_tokens, sampling, tokens)

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

    def _row_lambdas(self, tasks: tuple[str, ...]) -> dict:
        if self.device == "cuda" and tasks in self._rows:
            self._rows.move_to_end(tasks)
            return self._rows[tasks]
        loaded = [self._get(name) for name in tasks]
        stacked = {key: np.concatenate([t.feeds[key] for t in loaded]) for key in self._task_inputs}
        if self.device != "cuda":
            return stacked
        # one host->device copy per new combination of rows, then reused
        self._rows[tasks] = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in stacked.items()}
        if len(self._rows) > _ROW_CACHE:
            self._rows.popitem(last=False)
        return self._rows[tasks]

    def _run_bound(self, feeds, lambdas, names, keep_on_device):
        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in lambdas.items():
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cuda" if keep_on_device else "cpu")
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {n: v if keep_on_device else v.numpy() for n, v in zip(names, values, strict=True)}

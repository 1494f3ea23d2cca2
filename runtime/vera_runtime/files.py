"""Reading and writing a graph's files safely, for the exporter and the runtime alike (public):

- atomic writes (``atomic_path``, ``atomic_write_bytes``): a reader never sees half a file;
- a set of files published as one (``publish``; ``finish_publish`` completes an interrupted one, and
  ``pending_journal`` only looks), through a journal that names the graph's own files and nothing else;
- ``refuse_overwriting``: an output that is one of the command's inputs (by name or link) is refused;
- untrusted files read within bounds: ``file_problem`` (missing, a folder, a FIFO, a link loop),
  ``loads_bounded`` (JSON without NaN or deep nesting), ``load_file_bounded`` (the same from a regular file
  of bounded size), ``read_adapter_config`` (PEFT's JSON), ``load_any_task`` (a task of a graph from a native
  task file, an ``.onnx_adapter`` or a PEFT adapter file, checked as ``VeraSession.load_task`` checks it),
  ``read_labels`` / ``check_labels`` (a classifier's label names per task, ``<stem>.labels.json``),
  ``read_task_fingerprint`` (a task file's header only), ``adapter_size_limit``, ``template_digest``
  (what binds a hot template to its graph), ``MergePlan`` / ``quantize_int4`` (a merged int4 hot template's
  weights for one task, quantized as onnxruntime-genai's builder quantizes), ``replace_initializers`` (how a
  hot session is given them);
- ``printable``: a string from a file or a request as a terminal or a message may show it.
"""

from ._errors import printable
from ._hot import replace_initializers, template_digest
from ._io import (
    atomic_path,
    atomic_write_bytes,
    file_problem,
    refuse_overwriting,
    remove_stale_staging,
    same_file,
    signals_deferred,
)
from ._json import load_file_bounded, loads_bounded
from ._jsonio import read_adapter_config
from ._labels import LabelsError, check_labels, read_labels
from ._loaders import load_any_task
from ._merge import MergePlan, quantize_int4
from ._publish import finish_publish, pending_journal, publish
from ._taskfile import adapter_size_limit, read_task_fingerprint

__all__ = [
    "LabelsError", "MergePlan", "adapter_size_limit", "check_labels", "atomic_path", "atomic_write_bytes",
    "file_problem", "finish_publish", "load_any_task", "load_file_bounded", "loads_bounded", "pending_journal",
    "printable", "publish", "read_adapter_config", "read_labels", "read_task_fingerprint", "refuse_overwriting",
    "quantize_int4", "remove_stale_staging", "replace_initializers", "same_file", "signals_deferred", "template_digest",
]

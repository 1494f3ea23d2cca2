"""Where a vera-export graph's files live and what everything is called: the names the exporter writes
and the runtime reads (docs/contract.md). The exporter, vera_models and the benchmarks import these,
never vera_runtime's private modules.

- Task inputs: ``<layer>.vera_lambda_d`` / ``.vera_lambda_b`` (λ) and ``<head>.weight`` / ``.bias``.
- Beside ``<stem>.onnx``: ``<stem>.<task>.task.safetensors`` and ``.onnx_adapter`` (task names match
  ``[A-Za-z0-9_-]{1,64}``), the hot template ``<stem>.hot.onnx`` (for fused int4 graphs with its merge
  file ``<stem>.hot.merge.safetensors``), and for KV-cache graphs
  ``genai_config.json`` with the tokenizer files (``COMPANION_FILES``).
- While a command writes: staged ``.<name>.<pid>.<hex>.vera-tmp`` files, and ``.<graph>.vera-publish``,
  the journal of a publish that was interrupted.
- KV-cache graphs: ``past_key_values.<i>.key`` / ``.value`` in, ``present.<i>.…`` out (``CacheLayout``);
  position ids follow the mask (``positions``); masks hold 0 and 1 (``MASKS``).
- Metadata keys: ``KEY_*`` (``vera.*``).
"""

from ._contract import (
    KEY_BASE_DIGEST,
    KEY_DEFAULT_TASK,
    KEY_DIM_LIMITS,
    KEY_FINGERPRINT,
    KEY_HEADS,
    KEY_HOT_TEMPLATE,
    KEY_INPUT_HIGHS,
    KEY_KV_SHARED,
    KEY_LAYERS,
    KEY_R,
    KEY_RECIPE,
    KEY_SEED,
    KEY_TASK_DEFAULTS,
    KEY_VERSION,
    KEY_WEIGHTS,
    LAMBDA_B,
    LAMBDA_D,
)
from ._feeds import MASKS
from ._generate import GENAI_CONFIG, PAST, PRESENT, CacheLayout, positions
from ._hot import HOT_SUFFIX, hot_template_path
from ._io import STAGING_SUFFIX, staged_for, staging_path
from ._labels import LABELS_SUFFIX, labels_path
from ._merge import MERGE_KEY as KEY_MERGE
from ._merge import MERGE_SUFFIX, merge_path
from ._publish import COMPANION_FILES, JOURNAL_SUFFIX, journal_path, own_names
from ._taskfile import (
    ADAPTER_SUFFIX,
    KEY_DIGEST,
    TASK_SUFFIX,
    adapter_model_version,
    check_task_name,
    is_task_name,
    task_file_paths,
    task_files_beside,
)

__all__ = [
    "ADAPTER_SUFFIX", "COMPANION_FILES", "CacheLayout", "GENAI_CONFIG", "HOT_SUFFIX", "JOURNAL_SUFFIX",
    "KEY_BASE_DIGEST", "KEY_DEFAULT_TASK", "KEY_DIGEST", "KEY_DIM_LIMITS", "KEY_FINGERPRINT", "KEY_HEADS",
    "KEY_HOT_TEMPLATE", "KEY_INPUT_HIGHS", "KEY_KV_SHARED", "KEY_LAYERS", "KEY_MERGE", "KEY_R", "KEY_RECIPE",
    "KEY_SEED", "KEY_TASK_DEFAULTS", "KEY_VERSION", "KEY_WEIGHTS", "LABELS_SUFFIX", "LAMBDA_B", "LAMBDA_D", "MASKS",
    "MERGE_SUFFIX", "PAST", "PRESENT", "STAGING_SUFFIX", "TASK_SUFFIX", "adapter_model_version", "check_task_name",
    "hot_template_path", "is_task_name", "journal_path", "labels_path", "merge_path", "own_names", "positions",
    "staged_for", "staging_path", "task_file_paths", "task_files_beside",
]

"""Run onnxruntime-genai's model builder on the base model, in the Python that has it.

onnxruntime-genai pins its own CPU onnxruntime, so it usually lives in an environment of its own; the
builder runs there as a subprocess (``--builder-python``, else ``$VERA_GENAI_PYTHON``, else this Python).
Its graph is the anchor the VeRA branches are grafted onto, and node names are part of that graph: the
version is pinned, and another one is refused before anything runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from vera_runtime.files import printable

from ._errors import VeraExportError

BUILDER_VERSION = "0.18.0"
PRECISIONS = ("fp32", "int4")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_INSTALL = f"pip install onnxruntime-genai=={BUILDER_VERSION} torch transformers onnx-ir onnxscript"


def builder_python(given: str | os.PathLike | None) -> str:
    """The Python to run the builder with, checked to hold the pinned onnxruntime-genai."""
    python = str(given or os.environ.get("VERA_GENAI_PYTHON") or sys.executable)
    # found, not imported: importing the builder loads torch and transformers (seconds), which it does itself
    probe = ("import importlib.metadata as m, importlib.util as u, sys; missing = [n for n in ('onnxruntime_genai',"
             " 'torch', 'transformers', 'onnx_ir', 'onnxscript') if u.find_spec(n) is None];"
             " sys.exit(f'missing {missing}') if missing else print(m.version('onnxruntime-genai'))")
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as exc:
        raise VeraExportError(f"cannot run the builder's Python {python}: {exc.strerror or exc}.") from exc
    version = printable(done.stdout.strip(), 40)
    if done.returncode != 0:
        raise VeraExportError(
            f"{python} cannot import onnxruntime-genai's model builder ({printable(done.stderr.strip(), 200)}):"
            f" make an environment with `{_INSTALL}` and pass its python with --builder-python (or set"
            " VERA_GENAI_PYTHON)."
        )
    if version != BUILDER_VERSION:
        raise VeraExportError(
            f"{python} has onnxruntime-genai {version}; the fused export grafts onto the graph of"
            f" {BUILDER_VERSION}'s builder (its node names are the anchor): `{_INSTALL}`."
        )
    return python


def check_base(base: Path) -> None:
    """The builder reads the tokenizer beside the weights, and fails late without one."""
    if not any((base / name).is_file() for name in _TOKENIZER_FILES):
        raise VeraExportError(
            f"base model folder {base} has no tokenizer ({', '.join(_TOKENIZER_FILES)}): onnxruntime-genai's builder"
            " needs one; save the base model's tokenizer into it (tokenizer.save_pretrained)."
        )


class Build:
    """The builder making the base model's decoder for the CPU provider in ``out``, in a process of its own
    (started at once: the caller loads PEFT meanwhile); ``result()`` waits for its ``model.onnx``."""

    def __init__(self, python: str, base: Path, out: Path, precision: str, cache: Path) -> None:
        command = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out), "-p",
                   precision, "-e", "cpu", "-c", str(cache)]
        self.base, self.graph = base, out / "model.onnx"
        self._log = tempfile.TemporaryFile()  # a pipe could fill up and stall it while nobody reads
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def result(self) -> Path:
        code = self._process.wait()
        self._log.seek(0)
        output = self._log.read().decode(errors="replace")
        self._log.close()
        if code != 0 or not self.graph.is_file():
            tail = printable(" | ".join(line.strip() for line in output.strip().splitlines()[-3:]), 600)
            raise VeraExportError(
                f"onnxruntime-genai's builder failed on {self.base} (exit {code}): {tail}. It builds Llama,"
                " Mistral, Qwen2/3, Phi-3, Gemma 1/2/3 and other families it lists; export others without --fused."
            )
        return self.graph

    def stop(self) -> None:
        """End the builder early (the export failed elsewhere)."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._log.close()

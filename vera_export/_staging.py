"""All or nothing for every file one command writes: a graph, its task files, its hot template.

Each file is staged under a hidden temporary name beside its final path; ``publish`` renames the
whole set into place (see ``vera_runtime._publish``) and removes what is left of the graph's old
set. Any exception, SIGINT or SIGTERM before that removes everything staged; files staged by an
export killed earlier (SIGKILL) are removed by the next one into the folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from vera_runtime import TASK_SUFFIX
from vera_runtime.files import finish_publish, publish, refuse_overwriting, remove_stale_staging, signals_deferred
from vera_runtime.layout import COMPANION_FILES, MERGE_SUFFIX, own_names, staged_for, staging_path

from ._errors import VeraExportError


class Interrupted(VeraExportError):
    """SIGTERM arrived during an export: everything staged was removed."""


def _on_sigterm(signum, frame) -> None:
    raise Interrupted("vera-export was terminated (SIGTERM); nothing was written.")


def old_set(graph: Path) -> list[Path]:
    """What an export to ``graph`` replaces: the graph's own files beside it (its external data, hot template
    and task files) but the genai and tokenizer files, which only KV-cache exports write."""
    return sorted(path for path in graph.parent.iterdir()
                  if own_names(graph, path.name) and path.name not in COMPANION_FILES)


class Staging:
    """Stage files beside ``graph``; ``publish()`` puts them all in place, else none of them."""

    def __init__(self, graph: str | os.PathLike, replaces_set: bool, inputs: tuple[Path, ...] = ()) -> None:
        self.graph = Path(graph)
        self.replaces_set = replaces_set  # a full export: files of the graph's old set not rewritten go
        self.inputs = input_files(inputs)  # files the command reads: never replaced or removed by it
        self._staged: dict[Path, Path] = {}  # final path -> staged path
        self._scratch: list[Path] = []
        self._sigterm = None

    def __enter__(self) -> Staging:
        try:
            finish_publish(self.graph)  # an earlier export killed between renames: complete its set first
            remove_stale_staging(self.graph.parent)
        except OSError as exc:
            raise VeraExportError(f"cannot prepare {self.graph.parent}: {exc}") from exc
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore_sigterm()
        for staged in self._staged.values():
            staged.unlink(missing_ok=True)
        for scratch in self._scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    def _restore_sigterm(self) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def path(self, final: Path) -> Path:
        """Where to write the file that will become ``final``."""
        if final in self._staged:
            raise VeraExportError(f"{final} would be written twice by one command: give each task its own name.")
        self._staged[final] = staging_path(final)
        return self._staged[final]

    def scratch(self) -> Path:
        """A staged folder for writers that name their own files (ONNX external data)."""
        folder = staging_path(self.graph.with_name(f"{self.graph.name}.scratch"))
        folder.mkdir()
        self._scratch.append(folder)
        return folder

    def publish(self) -> None:
        for final in self._staged:  # what would fail half-way through the renames fails before them
            if final.is_dir() and not final.is_symlink():
                raise VeraExportError(
                    f"cannot write {final}: a directory is in the way; move it, or choose another --out."
                )
        remove = [p for p in old_set(self.graph) if p not in self._staged] if self.replaces_set else []
        refuse_overwriting([*self._staged, *remove], self.inputs, VeraExportError)
        with signals_deferred():  # a SIGTERM now waits for the set, then ends the process as usual
            publish(self.graph, {staged: final for final, staged in self._staged.items()}, remove)
            self._staged.clear()
            self._restore_sigterm()


def unstaged(path: str | os.PathLike) -> str:
    """The final name of a staged file (``.m.onnx.<pid>.<hex>.vera-tmp`` -> ``m.onnx``), for messages."""
    name = Path(path).name
    return staged_for(name) or name


_WRITTEN_BY_EXPORTS = (".onnx", ".onnx.data", ".ort", ".onnx_adapter", TASK_SUFFIX, MERGE_SUFFIX, "genai_config.json")


def input_files(paths) -> tuple[Path, ...]:
    """The files a command reads: each file given, and the files directly inside each folder given (a
    base or adapter folder) but those an export writes, so that a graph can be exported again beside them."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and not p.name.endswith(_WRITTEN_BY_EXPORTS)))
        else:
            files.append(path)
    return tuple(files)


def check_writable(out: Path, inputs=()) -> None:
    """Fail before the slow trace, with a probe file: permission bits don't tell (e.g. for root). An
    output that is one of the command's ``inputs`` (same file, or a link to it) is refused."""
    refuse_overwriting([out], input_files(inputs), VeraExportError)
    if out.is_dir():
        raise VeraExportError(f"output path {out} is a directory: give a file name such as {out / 'model.onnx'}.")
    if not out.parent.is_dir():
        raise VeraExportError(f"cannot write {out}: directory {out.parent} does not exist; create it first.")
    try:
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise VeraExportError(f"cannot write {out}: {exc.strerror or exc}; choose another --out.") from exc


@contextlib.contextmanager
def writing(out: Path, stage: Staging | None, replaces_set: bool, inputs: tuple[Path, ...] = ()) -> Iterator[Staging]:
    """The caller's staging, or one of our own that publishes when the block succeeds; OS errors
    become one message naming the path that failed."""
    try:
        if stage is not None:
            yield stage
            return
        with Staging(out, replaces_set, inputs) as own:
            yield own
            own.publish()
    except OSError as exc:
        failed = out.parent / unstaged(exc.filename) if exc.filename else out
        raise VeraExportError(
            f"cannot write {failed}: {exc.strerror or exc}; free space or choose another --out."
        ) from exc

"""Atomic file writes: a reader never sees a half-written file, nor half of a set of files.

A single file is written under a temporary name beside it and renamed over it. A set of files (a
graph and its task files) is staged the same way, then published by a journal: the list of renames
is written first, then carried out; a process killed half-way leaves the journal, and whoever opens
the graph next (an export, a ``VeraSession``) finishes it, so the folder ends with the whole new set.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

STAGING_SUFFIX = ".vera-tmp"
JOURNAL_SUFFIX = ".vera-publish"
_STAGED = re.compile(rf"^\..+\.(?P<pid>\d+)\.[0-9a-f]{{8}}{re.escape(STAGING_SUFFIX)}$")
# vera-export 0.1.0 staged with mkstemp: '.m.onnx.k2j4_x9a.tmp', without a pid; removed once older than this process
_LEGACY = re.compile(r"^\..+\.(onnx|onnx_adapter|safetensors|data)\.[a-z0-9_]{8}\.tmp$")
_STARTED = time.time()


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


MODE = _default_mode()  # mkstemp creates 0600 files; a model or task file should read like any other


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file ("does not exist", "is a directory", ...), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return "is a symbolic link loop" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device)"
    return None


def staging_path(final: str | os.PathLike) -> Path:
    """A hidden name beside ``final`` that says which process staged it: ``.m.onnx.<pid>.<hex>.vera-tmp``."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{STAGING_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    target = Path(path)
    tmp_path = staging_path(target)
    try:
        yield tmp_path
        os.chmod(tmp_path, MODE)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_staging(folder: str | os.PathLike) -> list[Path]:
    """Remove files and folders staged by processes that no longer run (an export killed earlier)."""
    removed = []
    for path in Path(folder).iterdir():
        match = _STAGED.match(path.name)
        legacy = _LEGACY.match(path.name) and path.is_file() and path.stat().st_mtime < _STARTED
        if legacy or (match and not _alive(int(match["pid"]))):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def journal_path(graph: str | os.PathLike) -> Path:
    graph = Path(graph)
    return graph.with_name(f".{graph.name}{JOURNAL_SUFFIX}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends: a publish is never cut short by them."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _carry_out(plan: dict) -> None:
    for tmp, final in plan["renames"]:
        if os.path.lexists(tmp):
            os.replace(tmp, final)
    for path in plan["remove"]:
        Path(path).unlink(missing_ok=True)


def publish(graph: str | os.PathLike, renames: dict[Path, Path], remove: list[Path], pause=None) -> None:
    """Rename every staged file (``{staged: final}``) into place and remove ``remove``, as one set.

    ``pause`` (tests only) is called after the first rename, to kill a publish half-way."""
    journal = journal_path(graph)
    plan = {"renames": [[str(t), str(f)] for t, f in renames.items()], "remove": [str(p) for p in remove]}
    for staged in renames:
        os.chmod(staged, MODE)
    with atomic_path(journal) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(plan, handle)
            handle.flush()
            os.fsync(handle.fileno())
    with signals_deferred():
        first, *rest = plan["renames"] or [None]
        if first:
            os.replace(*first)
            if pause:
                pause()
        _carry_out({"renames": rest, "remove": plan["remove"]})
        journal.unlink()


def finish_publish(graph: str | os.PathLike) -> bool:
    """Finish a publish that a killed process left half-done; True if there was one."""
    journal = journal_path(graph)
    if not journal.is_file():
        return False
    try:
        plan = json.loads(journal.read_text(encoding="utf-8"))
        _carry_out(plan)
        journal.unlink()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OSError(
            f"{journal} records an export that was interrupted while its files were renamed, and it cannot be"
            f" finished ({exc}): export the model again into {journal.parent}."
        ) from None
    return True

"""Atomic file writes: a reader never sees a half-written file.

A single file is written under a temporary name beside it and renamed over it. A set of files (a
graph and its task files) is staged the same way, then published as one (``_publish``).
"""

from __future__ import annotations

import contextlib
import errno
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
_STAGED = re.compile(rf"^\.(?P<final>.+)\.(?P<pid>\d+)\.[0-9a-f]{{8}}{re.escape(STAGING_SUFFIX)}$")
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


def staged_for(name: str) -> str | None:
    """The final name a staged file was staged for (``.m.onnx.<pid>.<hex>.vera-tmp`` -> ``m.onnx``), or None."""
    match = _STAGED.match(name)
    return match["final"] if match else None


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


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths reach one file (the same name, a symbolic link to it, or a hard link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet), or cannot be reached
        return False


def refuse_overwriting(outputs, inputs, error=ValueError) -> None:
    """Raise ``error`` when an output path would replace one of the command's input files."""
    for out in outputs:
        for source in inputs:
            if same_file(out, source):
                raise error(f"{out} is {source}, an input of this command: writing it would destroy the input;"
                            " choose another output path.")

"""``TaskBank``: many tasks of one graph in one memory-mapped, append-only file.

A task is one row: its task tensors, float32, concatenated in the graph's task-input order. The file is a
header (the graph's contract) followed by records, each an add (name, row, SHA-256 of name and row) or a
removal (name), closed by an end mark written once the rest is on disk (docs/contract.md). So:

- an add never rewrites the file; a writer killed mid-add leaves a record without its end mark, which
  readers skip and the next writer cuts off: the bank is as before, or has the task;
- readers map the file: memory grows with the rows a run touches, not with the bank; a name is found in
  a dict (built by one pass over the record headers, then kept up to date by reading only what was
  appended); a row's digest is checked the first time it is used;
- other processes see changes without reopening: a lookup of an unknown name, ``len`` and ``names`` read
  what was appended at once; a lookup of a known name does within ``REFRESH_S`` (so a removal takes that);
- ``compact()`` rewrites the live rows to a new file and renames it over the bank; readers notice the
  new file and map it.
Writers take an exclusive ``flock`` on the file for the length of an add, a removal or a compaction.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ._contract import Contract
from ._errors import VeraError
from ._io import atomic_path
from ._json import loads_bounded
from ._taskfile import check_task_name, is_task_name

MAGIC = b"VERABANK"
VERSION = 1
_PAGE = 4096  # the header is padded to whole pages: rows start page-aligned
_RECORD = struct.Struct("<4sBB2xQ136s")  # mark, kind, name length, row bytes, name (`[namespace/]task`)
_RECORD_MARK, _END_MARK = b"VREC", b"VEND"
_ADD, _REMOVE = 1, 2
_DIGEST_BYTES = 32
_MAX_HEADER = 64 << 20
REFRESH_S = 0.5  # how stale a reader's view of the file may be
_VIEWS = 4096  # tasks whose per-input views are kept (a dict of views each: small)


class BankError(VeraError, ValueError):
    """A bank file that is not a bank, belongs to another graph, or holds a damaged row."""


def _header(contract: Contract) -> bytes:
    """The bank's graph: its contract (the same metadata the graph holds), padded to whole pages."""
    text = json.dumps(contract.to_metadata(), sort_keys=True).encode()
    head = MAGIC + struct.pack("<IQ", VERSION, len(text)) + text
    return head.ljust(-(-len(head) // _PAGE) * _PAGE, b"\0")


def _read_header(file, source: str) -> tuple[Contract, int]:
    """The contract a bank is for, and where its records start."""
    head = file.read(20)
    if len(head) < 20 or head[:8] != MAGIC:
        raise BankError(f"{source} is not a task bank (made by TaskBank.create or `vera-run bank create`).")
    version, size = struct.unpack("<IQ", head[8:])
    if version != VERSION:
        raise BankError(f"{source} is a task bank of version {version}; this runtime reads version {VERSION}.")
    if size > _MAX_HEADER:
        raise BankError(f"{source} declares a {size:,}-byte header: it is damaged.")
    text = file.read(size)
    try:
        contract = Contract.from_metadata(loads_bounded(text), source)  # a bank may come from someone else
    except (ValueError, TypeError) as exc:
        raise BankError(f"{source} has a damaged header ({exc}).") from exc
    return contract, -(-(20 + size) // _PAGE) * _PAGE


def check_bank_name(name: str) -> str:
    """A task's name in a bank: a task name, or ``namespace/task`` (a tenant's), each part a task name."""
    parts = name.split("/", 1) if isinstance(name, str) else [name]
    for part in parts:
        check_task_name(part)
    return name


def _is_bank_name(name: str) -> bool:
    return all(is_task_name(part) for part in name.split("/", 1))


def _digest(name: bytes, row) -> bytes:
    digest = hashlib.sha256(name + b"\0")
    digest.update(row)
    return digest.digest()


class TaskBank:
    """Tasks of one graph by name, in one file at ``path`` (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._file = None
        self._open()

    @classmethod
    def create(cls, path: str | os.PathLike, graph: Contract | object) -> TaskBank:
        """A new, empty bank for ``graph`` (a ``Contract``, or anything with a ``.contract``, e.g. a VeraSession)."""
        contract = graph if isinstance(graph, Contract) else graph.contract
        path = Path(path)
        if path.exists():
            raise BankError(f"{path} exists: give a new path for the bank (TaskBank(path) opens it).")
        with atomic_path(path) as tmp:
            tmp.write_bytes(_header(contract))
        return cls(path)

    # -- reading -------------------------------------------------------------------------------

    def _open(self) -> None:
        file = open(self.path, "rb")  # noqa: SIM115 - kept open for the mapping's lifetime
        try:
            self.contract, self._start = _read_header(file, str(self.path))
        except BaseException:
            file.close()
            raise
        self._shapes = self.contract.task_shapes()
        self._floats = sum(int(np.prod(shape)) for shape in self._shapes.values())
        if self._file is not None:
            self._file.close()
        self._file, self._inode = file, os.fstat(file.fileno()).st_ino
        self._map, self._scanned, self._index, self._checked = None, self._start, {}, set()
        self._views: collections.OrderedDict[str, tuple[int, dict]] = collections.OrderedDict()
        self._refreshed = 0.0
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        """Read what was appended (or the new file a compaction renamed in) since the last look."""
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        try:
            if os.stat(self.path).st_ino != self._inode:
                return self._open()
        except FileNotFoundError:
            pass
        size = os.fstat(self._file.fileno()).st_size
        if size > (len(self._map) if self._map is not None else 0):
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._scanned = self._scan(self._scanned, size)

    def _records(self, start: int, size: int) -> Iterator[tuple[int, str, int, int]]:
        """(kind, name, row offset, end) of every complete record from ``start``; stops at a torn tail.
        Read with pread, not through the mapping: touching every record's pages would bring the whole bank
        into this process's memory (the kernel maps pages around each one touched)."""
        row_bytes, at, fd = self._floats * 4, start, self._file.fileno()
        head = os.pread(fd, _RECORD.size, at)
        while len(head) == _RECORD.size:
            mark, kind, length, payload, raw = _RECORD.unpack(head)
            end = at + _RECORD.size + payload + _DIGEST_BYTES + len(_END_MARK)
            if (mark != _RECORD_MARK or kind not in (_ADD, _REMOVE) or payload != (row_bytes if kind == _ADD else 0)
                    or end > size or not 0 < length <= _RECORD.size - 16):
                return
            tail = os.pread(fd, len(_END_MARK) + _RECORD.size, end - len(_END_MARK))  # its end mark, the next head
            if tail[:len(_END_MARK)] != _END_MARK:
                return
            name = raw[:length].decode("utf-8", "replace")
            if _is_bank_name(name):  # a forged name is never indexed, listed or printed; the scan goes on
                yield kind, name, at + _RECORD.size, end
            at, head = end, tail[len(_END_MARK):]

    def _scan(self, start: int, size: int) -> int:
        scanned = start
        for kind, name, row, end in self._records(start, size):
            if kind == _ADD:
                self._index[name] = row
            else:
                self._index.pop(name, None)
            self._checked.discard(name)
            scanned = end
        return scanned

    def check_contract(self, contract: Contract) -> None:
        if contract.fingerprint != self.contract.fingerprint or contract.task_shapes() != self._shapes:
            raise BankError(
                f"{self.path} is a bank for another graph (fingerprint {self.contract.fingerprint[:12]}, this graph"
                f" has {contract.fingerprint[:12]}): make a bank for this graph with TaskBank.create."
            )

    def __len__(self) -> int:
        with self._lock:
            self._refresh(force=True)  # listings see every add and removal at once; lookups below within REFRESH_S
            return len(self._index)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            if name not in self._index:
                self._refresh(force=True)
            else:
                self._refresh()
            return name in self._index

    def names(self, prefix: str = "") -> list[str]:
        with self._lock:
            self._refresh(force=True)
            return sorted(name for name in self._index if name.startswith(prefix))

    def row(self, name: str) -> np.ndarray | None:
        """Task ``name``'s row (float32, read-only, mapped), its digest checked on first use; None if absent."""
        with self._lock:
            if name not in self:
                return None
            offset = self._index[name]
            size = self._floats * 4
            if name not in self._checked:
                view = memoryview(self._map)
                try:
                    stored = view[offset + size:offset + size + _DIGEST_BYTES]
                    if _digest(name.encode(), view[offset:offset + size]) != stored:
                        raise BankError(f"task '{name}' in {self.path} is damaged (its SHA-256 differs): add it again.")
                finally:
                    view.release()
                self._checked.add(name)
            return np.frombuffer(self._map, np.float32, self._floats, offset)

    def tensors(self, name: str) -> dict[str, np.ndarray] | None:
        """Task ``name`` as views of its row by task input name (shapes without the task dimension). The same
        object while the task is unchanged (a few thousand recent ones are kept): callers may cache on it."""
        with self._lock:
            row = self.row(name)
            if row is None:
                return None
            offset = self._index[name]
            cached = self._views.get(name)
            if cached is not None and cached[0] == offset:
                self._views.move_to_end(name)
                return cached[1]
            tensors, at = {}, 0
            for input_name, shape in self._shapes.items():
                count = int(np.prod(shape))
                tensors[input_name] = row[at:at + count].reshape(shape)
                at += count
            self._views[name] = (offset, tensors)
            if len(self._views) > _VIEWS:
                self._views.popitem(last=False)
            return tensors

    # -- writing -------------------------------------------------------------------------------

    def add(self, name: str, source: str | os.PathLike | Mapping[str, np.ndarray]) -> None:
        """Add (or replace) task ``name`` (``task`` or ``namespace/task``) from a task file (native,
        .onnx_adapter or PEFT) or a mapping of the names a native task file uses to arrays of its shapes;
        checked as ``load_task`` checks a file. Nothing is written unless it passes."""
        check_bank_name(name)
        row = self._checked_row(source)
        self._append(_ADD, name, row.tobytes())

    def add_many(self, items: Iterable[tuple[str, str | os.PathLike | Mapping[str, np.ndarray]]]) -> int:
        """``add`` for many tasks at once (a bulk import): every one checked first, then appended under one
        lock with one sync. Each record is whole or absent, as with ``add``. Returns how many were added."""
        records = [(_ADD, check_bank_name(name), self._checked_row(source).tobytes()) for name, source in items]
        self._append_all(records)
        return len(records)

    def remove(self, name: str) -> None:
        if name not in self:
            raise BankError(f"no task '{name}' in {self.path}.")
        self._append(_REMOVE, name, b"")

    def _checked_row(self, source) -> np.ndarray:
        from ._loaders import task_tensors

        tensors = task_tensors(source, self.contract)
        return np.concatenate([np.ascontiguousarray(tensors[k], np.float32).ravel() for k in self._shapes])

    def _append(self, kind: int, name: str, row: bytes) -> None:
        self._append_all([(kind, name, row)])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[BinaryIO]:
        """The bank file opened for writing under an exclusive flock. A compaction by another process may
        rename a new file in between our open and our lock: then the locked file is no longer the bank, and
        a write to it would be lost, so it is opened again."""
        with self._lock:
            while True:
                with open(self.path, "r+b") as file:
                    fcntl.flock(file, fcntl.LOCK_EX)
                    try:
                        if os.fstat(file.fileno()).st_ino == os.stat(self.path).st_ino:
                            yield file
                            return
                    finally:
                        fcntl.flock(file, fcntl.LOCK_UN)

    def _append_all(self, records: list[tuple[int, str, bytes]]) -> None:
        """Write the records after the last complete one with a blank where each end mark goes, sync, then put
        the end marks in, in order, and sync again: a crash leaves every record whole (marked) or skipped."""
        with self._locked() as file:
            self._truncate_torn_tail(file)
            at, marks = file.seek(0, os.SEEK_END), []
            for kind, name, row in records:
                raw = name.encode()
                record = _RECORD.pack(_RECORD_MARK, kind, len(raw), len(row), raw) + row + _digest(raw, row)
                file.write(record + b"\0" * len(_END_MARK))
                at += len(record)
                marks.append(at)
                at += len(_END_MARK)
            file.flush()
            os.fsync(file.fileno())
            for mark in marks:
                file.seek(mark)
                file.write(_END_MARK)
            file.flush()
            os.fsync(file.fileno())
        self._refresh(force=True)

    def _truncate_torn_tail(self, file) -> None:
        """Cut off a record an earlier writer left without its end mark (killed mid-add)."""
        self._refresh(force=True)
        size = os.fstat(file.fileno()).st_size
        if self._scanned < size:
            file.truncate(self._scanned)

    def compact(self) -> int:
        """Rewrite the bank with its live tasks only; returns the bytes reclaimed."""
        with self._locked() as file:
            self._refresh(force=True)
            before = os.fstat(file.fileno()).st_size
            with atomic_path(self.path) as tmp, open(tmp, "wb") as out:
                out.write(_header(self.contract))
                size = self._floats * 4
                for name, offset in self._index.items():
                    raw = name.encode()
                    out.write(_RECORD.pack(_RECORD_MARK, _ADD, len(raw), size, raw))
                    out.write(self._map[offset:offset + size + _DIGEST_BYTES] + _END_MARK)
                out.flush()
                os.fsync(out.fileno())
                after = out.tell()
        self._open()
        return before - after

    def prefetch(self) -> None:
        """Ask the kernel to read the bank into its page cache, in the background (not into this process's
        memory): the first use of a task then costs no disk read. For a server whose machine holds the bank."""
        with self._lock:
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        with self._lock:
            self._map = None
            if self._file is not None:
                self._file.close()
                self._file = None

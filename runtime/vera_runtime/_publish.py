"""Publishing a set of staged files as one: a graph, its external data, hot template and task files.

The set is staged under hidden names beside the graph (``_io.staging_path``), then published by a
journal: the list of renames is written first, then carried out; a process killed half-way leaves the
journal, and whoever opens the graph next (an export, a ``VeraSession``) finishes it.

A journal is a file in a folder that someone else may have made, so it cannot be trusted. It therefore
holds file *names*, never paths, and is checked whole before anything is done: every name it renames
to or removes is one of the graph's own files (``own_names``), every file it renames from is the staged
form of that very name, a regular file, not a link. The worst a forged journal can do is what an export
into that folder does anyway: put the graph's own files in place or remove them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ._errors import VeraError
from ._hot import hot_template_path
from ._io import MODE, atomic_path, signals_deferred, staged_for
from ._json import JsonError, load_file_bounded
from ._labels import labels_path
from ._merge import merge_path
from ._taskfile import ADAPTER_SUFFIX, TASK_SUFFIX, is_task_name

JOURNAL_SUFFIX = ".vera-publish"
JOURNAL_VERSION = 2  # 1 (vera-export 0.1.0) held paths: refused, the export is simply run again
_JOURNAL_BYTES = 1 << 20  # ~5,000 names: far more than any graph's set
# Files an export writes beside a KV-cache graph, for onnxruntime-genai and the tokenizer (vera_export._genai).
COMPANION_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


class JournalError(VeraError, OSError):
    """A publish journal that cannot be carried out safely; nothing was touched."""


def journal_path(graph: str | os.PathLike) -> Path:
    graph = Path(graph)
    return graph.with_name(f".{graph.name}{JOURNAL_SUFFIX}")


def own_names(graph: Path, name: str) -> bool:
    """Whether ``name`` is one of the files an export of ``graph`` writes beside it."""
    hot = hot_template_path(graph)
    if name in {graph.name, f"{graph.name}.data", hot.name, f"{hot.name}.data", merge_path(hot).name,
                labels_path(graph).name, *COMPANION_FILES}:
        return True
    stem = graph.with_suffix("").name
    return any(name.startswith(f"{stem}.") and name.endswith(suffix) and is_task_name(name[len(stem) + 1:-len(suffix)])
               for suffix in (TASK_SUFFIX, ADAPTER_SUFFIX))


def publish(graph: str | os.PathLike, renames: dict[Path, Path], remove: list[Path]) -> None:
    """Rename every staged file (``{staged: final}``) into place and remove ``remove``, as one set.

    Every path is in ``graph``'s folder and names one of its own files (ValueError otherwise: a bug,
    caught before anything moves)."""
    graph = Path(graph)
    plan = {"version": JOURNAL_VERSION, "renames": [[Path(t).name, Path(f).name] for t, f in renames.items()],
            "remove": [Path(p).name for p in remove]}
    for path in [*renames, *renames.values(), *remove]:
        if Path(path).parent != graph.parent:
            raise ValueError(f"{path} is not in {graph.parent}: a publish stays in the graph's folder")
    _check_plan(plan, graph)
    for staged in renames:
        os.chmod(staged, MODE)
    journal = journal_path(graph)
    with atomic_path(journal) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(plan, handle)
            handle.flush()
            os.fsync(handle.fileno())
    with signals_deferred():
        _carry_out(graph.parent, plan["renames"], plan["remove"])
        journal.unlink()


def finish_publish(graph: str | os.PathLike) -> bool:
    """Finish a publish that a killed process left half-done; True if there was one.

    The journal is checked whole first: JournalError (nothing touched) for anything an export
    into this folder would not do."""
    graph = Path(graph)
    journal = journal_path(graph)
    if not os.path.lexists(journal):
        return False
    plan = read_journal(graph)
    try:
        _carry_out(graph.parent, plan["renames"], plan["remove"])
        journal.unlink()
    except OSError as exc:
        raise JournalError(f"{journal}: the interrupted publish it records could not be finished"
                           f" ({exc.strerror or exc}); export the model again into {graph.parent}.") from exc
    return True


def pending_journal(graph: str | os.PathLike) -> Path | None:
    """The journal of an interrupted publish beside ``graph``, if any (nothing is read or changed)."""
    journal = journal_path(graph)
    return journal if os.path.lexists(journal) else None


def read_journal(graph: Path) -> dict:
    """The journal beside ``graph``, checked whole: JournalError naming it and the problem otherwise."""
    journal = journal_path(graph)
    try:
        plan = load_file_bounded(journal, _JOURNAL_BYTES, max_depth=3, follow_links=False)
        _check_plan(plan, graph)
    except (OSError, ValueError, JsonError) as exc:
        raise JournalError(
            f"{journal} is not a publish journal this version of vera-export wrote for {graph.name} ({exc});"
            f" nothing was changed. If you made this folder, delete the journal and export the model again."
        ) from exc
    return plan


def _check_plan(plan, graph: Path) -> None:
    """ValueError unless ``plan`` renames staged files onto, and removes, only ``graph``'s own files."""
    if not isinstance(plan, dict) or set(plan) != {"version", "renames", "remove"}:
        raise ValueError("it is not an object with exactly 'version', 'renames' and 'remove'")
    if plan["version"] != JOURNAL_VERSION:
        raise ValueError(f"its version is {plan['version']!r:.20}, not {JOURNAL_VERSION}")
    renames, remove = plan["renames"], plan["remove"]
    if not isinstance(renames, list) or not isinstance(remove, list):
        raise ValueError("'renames' and 'remove' must be lists")
    for entry in renames:
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(n, str) for n in entry)):
            raise ValueError(f"rename {entry!r:.80} is not a pair of names")
        staged, final = entry
        _check_name(final, graph)
        if staged_for(staged) != final:
            raise ValueError(f"{staged!r:.80} is not a staged file of {final!r:.80}")
        _check_kind(graph.parent / staged, regular=True)
        _check_kind(graph.parent / final, regular=False)
    for name in remove:
        if not isinstance(name, str):
            raise ValueError(f"{name!r:.80} is not a file name")
        _check_name(name, graph)
        _check_kind(graph.parent / name, regular=False)


def _check_name(name: str, graph: Path) -> None:
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or not own_names(graph, name):
        raise ValueError(f"{name!r:.80} is not one of {graph.name}'s own files")


def _check_kind(path: Path, regular: bool) -> None:
    """A file we move must be a regular file (not a link to elsewhere); what we replace, not a folder."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if regular and not stat.S_ISREG(mode):
        raise ValueError(f"{path.name!r:.80} is not a regular file")
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path.name!r:.80} is a directory")


def _rename(folder: Path, staged: str, final: str) -> None:
    if os.path.lexists(folder / staged):
        os.replace(folder / staged, folder / final)


def _carry_out(folder: Path, renames: list, remove: list) -> None:
    for staged, final in renames:
        _rename(folder, staged, final)
    for name in remove:
        (folder / name).unlink(missing_ok=True)

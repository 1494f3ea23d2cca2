"""Load ``model.pt`` safely, and the project's own checkpoint format.

``torch.load`` runs with ``weights_only=True`` and an allowlist of classes the project trusts;
anything else needs the caller's explicit opt-in, because unpickling it runs code from the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vera_runtime.files import atomic_path, file_problem

from ._defaults import TRUST_FLAG
from ._errors import UntrustedFileError, VeraExportError
from ._graphfile import refuse_graph_as_model
from ._layer import PROJECTION_ATTR, VeraConfig, VeraLinear, VeraProjection, apply_vera

FORMAT = "vera-export-checkpoint"
VERSION = 1


ARCHITECTURES_GROUP = "vera_export.architectures"


def architectures() -> dict[str, type]:
    """Model classes registered under the entry-point group ``vera_export.architectures`` (vera_models
    registers its reference models; a package of yours may register its own), by architecture name.
    Each has ``architecture``, ``config_class`` (a dataclass) and ``pickle_classes()``."""
    return {entry.name: entry.load() for entry in importlib.metadata.entry_points(group=ARCHITECTURES_GROUP)}


def _trusted_classes() -> list:
    torch_classes = [
        nn.Linear, nn.Embedding, nn.LayerNorm, nn.ModuleList, nn.ModuleDict, nn.Sequential,
        nn.Dropout, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Identity,
    ]
    ours = [VeraConfig, VeraLinear, VeraProjection]
    registered = [cls for model in architectures().values() for cls in model.pickle_classes()]
    return torch_classes + ours + registered


def save_checkpoint(model: nn.Module, path: str | os.PathLike, task_name: str = "default") -> Path:
    """Save a reference model (from ``vera_models``) as plain tensors and settings: no pickled code."""
    projection = getattr(model, PROJECTION_ATTR, None)
    if projection is None or not hasattr(model, "architecture") or not dataclasses.is_dataclass(model.config):
        raise VeraExportError(
            f"{type(model).__name__} is not a vera_models reference model with VeRA applied:"
            " save other models with torch.save(model, path)."
        )
    vera = dataclasses.asdict(projection.config)
    if not isinstance(vera["target_modules"], str):
        vera["target_modules"] = list(vera["target_modules"])
    checkpoint = {
        "format": FORMAT, "version": VERSION, "architecture": model.architecture,
        "config": dataclasses.asdict(model.config), "vera": vera, "task": task_name,
        "state_dict": model.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    task_name: str | None


def load_model(path: str | os.PathLike, *, trust_pickle: bool = False) -> LoadedModel:
    """Load a pickled VeRA module (``torch.save(model)``) or a vera-export checkpoint."""
    path = Path(path)
    if problem := file_problem(path):
        raise VeraExportError(f"model file {path} {problem}.")
    if path.stat().st_size == 0:
        raise VeraExportError(f"model file {path} is empty: save the model again with torch.save(model, path).")
    refuse_graph_as_model(path)
    _check_storages(path)
    obj = _unpickle(path, trust_pickle)
    if isinstance(obj, nn.Module):
        _check_materialised(obj, path)
        return LoadedModel(obj.eval(), None)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_checkpoint(obj, path)
    raise VeraExportError(
        f"{path} holds a {type(obj).__name__}, not a model: save the whole module with"
        " torch.save(model, path), or use vera_export.save_checkpoint."
    )


class _NoInit(TorchFunctionMode):
    """Skip weight initialisation: a skeleton's values are never read, and initialising meta tensors
    makes torch import ~800 modules (74 MB) for nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", "") == "torch.nn.init" or getattr(func, "__name__", "") in _INIT_OPS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


_INIT_OPS = ("normal_", "uniform_", "trunc_normal_")


@contextlib.contextmanager
def _skeleton() -> Iterator[None]:
    """Modules built here (by a config, or by a constructor a pickle calls) hold no memory."""
    with torch.device("meta"), _NoInit():
        yield


def _check_storages(path: Path) -> None:
    """torch.save stores tensors uncompressed; a compressed entry could unpack to any size before any check."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise VeraExportError(
                    f"{path} holds a compressed entry '{info.filename}' ({info.compress_size:,} bytes that unpack to"
                    f" {info.file_size:,}): torch.save never compresses, and unpacking could take any amount of"
                    " memory. Save the model again with torch.save."
                )


def _check_materialised(model: nn.Module, path: Path) -> None:
    """Tensors restored from the file are on the CPU; a constructor the pickle calls builds them on
    the meta device (see _unpickle): such a module declares weights the file does not hold."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise VeraExportError(
                f"{path} builds '{name}' {list(tensor.shape)} by calling a constructor instead of storing it:"
                " the file declares weights it does not hold. Save the model again with torch.save(model, path)."
            )


def _unpickle(path: Path, trust_pickle: bool):
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        # Constructors an allowlisted pickle calls (nn.Linear(20000, 20000)) allocate nothing on the
        # meta device; tensors stored in the file are still restored on the CPU.
        with torch.serialization.safe_globals(_trusted_classes()), _skeleton():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if blocked and not trust_pickle:
            raise UntrustedFileError(
                f"{path} needs class {blocked[1]}, which vera-export does not trust: unpickling it"
                f" runs code from the file. If you trust {path.name}, rerun with {TRUST_FLAG}."
            ) from exc
        raise _unreadable(path, exc) from exc
    except (AttributeError, ModuleNotFoundError) as exc:
        raise VeraExportError(
            f"{path} needs code that cannot be imported here ({exc}): make the model's module importable"
            " (pip install it, or put its folder on the path: PYTHONPATH=FOLDER vera-export ...)."
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> VeraExportError:
    reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return VeraExportError(
        f"{path} is not a readable PyTorch file (truncated, corrupt, or not saved by torch.save?): {reason}"
    )


def _from_checkpoint(checkpoint: dict, path: Path) -> LoadedModel:
    if checkpoint.get("version") != VERSION:
        raise VeraExportError(
            f"{path} is checkpoint version {checkpoint.get('version')}; this vera-export reads {VERSION}:"
            " upgrade vera-export."
        )
    try:
        with _skeleton():  # sizes first: a config may declare far more than the file holds
            _check_declared(_build(checkpoint), checkpoint["state_dict"], path)
        model = _build(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise VeraExportError(f"{path} is a damaged vera-export checkpoint: {exc}") from exc
    return LoadedModel(model.eval(), checkpoint.get("task"))


def _build(checkpoint: dict) -> nn.Module:
    known = architectures()
    if checkpoint["architecture"] not in known:
        raise ValueError(f"architecture {checkpoint['architecture']!r} is not registered here (known: {sorted(known)})")
    model_class = known[checkpoint["architecture"]]
    with torch.random.fork_rng(devices=[]):  # initial values are overwritten: leave the caller's RNG as it was
        model = model_class(model_class.config_class(**checkpoint["config"])).eval()
    apply_vera(model, VeraConfig(**checkpoint["vera"]))
    return model


def _check_declared(skeleton: nn.Module, state_dict, path: Path) -> None:
    """Every tensor the config declares must be in the file, at that shape, before anything is allocated."""
    if not isinstance(state_dict, dict):
        raise VeraExportError(f"{path} has no state_dict mapping: re-save it with vera_export.save_checkpoint.")
    for name, tensor in skeleton.state_dict().items():
        held = state_dict.get(name)
        if not isinstance(held, torch.Tensor) or held.shape != tensor.shape:
            holds = list(held.shape) if isinstance(held, torch.Tensor) else "nothing"
            raise VeraExportError(
                f"{path} declares '{name}' {list(tensor.shape)} in its config, but the file holds {holds}:"
                " the checkpoint is damaged or was edited. Save it again with vera_export.save_checkpoint."
            )

"""Find the VeRA layers of a model, ours or PEFT's, and check they can share one graph."""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from vera_runtime.layout import LAMBDA_B, LAMBDA_D

from ._errors import VeraExportError
from ._layer import VeraLinear


@dataclasses.dataclass(frozen=True)
class AdaptedLayer:
    """One VeRA layer as the exporter sees it, whatever library built it."""

    name: str  # module path from the exported root: the prefix of its graph inputs
    module: nn.Module
    base: nn.Module
    in_features: int
    out_features: int
    lambda_d: nn.Parameter
    lambda_b: nn.Parameter
    vera_a: torch.Tensor
    vera_b: torch.Tensor
    seed: int | None

    def lambdas(self) -> dict[str, nn.Parameter]:
        """This layer's λ parameters by graph input name (see docs/contract.md)."""
        return {f"{self.name}.{LAMBDA_D}": self.lambda_d, f"{self.name}.{LAMBDA_B}": self.lambda_b}


@dataclasses.dataclass(frozen=True)
class AdaptedHead:
    """A linear layer trained per task (in PEFT's ``modules_to_save``): its weights are task inputs."""

    name: str  # as PEFT saves it: <wrapper path>[.<path inside the head>]; keys <name>.weight, <name>.bias
    linear: nn.Linear  # in the active adapter's copy of the head; the tracer replaces its forward

    def params(self) -> dict[str, nn.Parameter]:
        params = {f"{self.name}.weight": self.linear.weight}
        if self.linear.bias is not None:
            params[f"{self.name}.bias"] = self.linear.bias
        return params


@dataclasses.dataclass(frozen=True)
class AdaptedModel:
    layers: tuple[AdaptedLayer, ...]
    vera_a: torch.Tensor
    vera_b: torch.Tensor
    seed: int | None
    task_name: str
    heads: tuple[AdaptedHead, ...] = ()

    @property
    def r(self) -> int:
        return self.vera_a.shape[0]

    def task_params(self) -> dict[str, nn.Parameter]:
        """Every per-task parameter (λ, then heads) by graph input name, in graph input order."""
        params = {name: param for layer in self.layers for name, param in layer.lambdas().items()}
        for head in self.heads:
            params.update(head.params())
        return params


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _check_base(name: str, base: nn.Module) -> None:
    if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
        raise VeraExportError(
            f"VeRA layer '{name}' wraps a {type(base).__name__}; only nn.Linear and transformers'"
            " Conv1D can be exported: leave that layer out of target_modules."
        )


def _our_layer(name: str, module: VeraLinear) -> AdaptedLayer:
    projection = module.projection
    return AdaptedLayer(
        name, module, module.base_layer, module.in_features, module.out_features,
        module.vera_lambda_d, module.vera_lambda_b, projection.vera_A, projection.vera_B,
        projection.seed,
    )


def _peft_layer(name: str, module: nn.Module, root: nn.Module) -> AdaptedLayer | None:
    """The layer as the active adapter sees it; None where that adapter does not adapt it (an adapter
    targeting other modules: PEFT's forward runs such a layer as its base layer, and so does the graph)."""
    if getattr(module, "merged", False):
        raise VeraExportError(f"PEFT layer '{name}' is merged: call model.unmerge_adapter() before exporting.")
    if getattr(module, "disable_adapters", False):
        raise VeraExportError(f"PEFT layer '{name}' has adapters disabled: enable them before exporting.")
    active = list(module.active_adapters)
    if len(active) != 1:
        raise VeraExportError(
            f"PEFT layer '{name}' has {len(active)} active adapters {active}: activate exactly one"
            " with model.set_adapter(NAME); the others become task files."
        )
    adapter = active[0]
    if adapter not in module.vera_lambda_d:
        return None
    config = getattr(root, "peft_config", {}).get(adapter)
    seed = getattr(config, "projection_prng_key", None)
    return AdaptedLayer(
        name, module, module.get_base_layer(), module.in_features, module.out_features,
        module.vera_lambda_d[adapter], module.vera_lambda_b[adapter],
        module.vera_A[adapter], module.vera_B[adapter], seed,
    )


def _find_heads(model: nn.Module) -> tuple[AdaptedHead, ...]:
    """The linear layers of PEFT's modules_to_save wrappers (e.g. a classifier trained with the adapter)."""
    if "peft" not in sys.modules:
        return ()
    from peft.utils.other import ModulesToSaveWrapper

    heads = []
    for name, wrapper in model.named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            heads.extend(_head_linears(name, _active_copy(name, wrapper)))
    return tuple(heads)


def _active_copy(name: str, wrapper: nn.Module) -> nn.Module:
    active = list(wrapper.active_adapters)
    if len(active) != 1 or active[0] not in wrapper.modules_to_save:
        raise VeraExportError(
            f"modules_to_save '{name}' has no copy for the active adapter {active}: activate exactly one"
            " adapter with model.set_adapter(NAME)."
        )
    return wrapper.modules_to_save[active[0]]


def _head_linears(name: str, head: nn.Module) -> list[AdaptedHead]:
    """Every nn.Linear of a head; any other parameter cannot be a task input, so it is refused."""
    linears = []
    for path, module in head.named_modules():
        own = list(module.named_parameters(recurse=False))
        if type(module) is nn.Linear:
            linears.append(AdaptedHead(f"{name}.{path}" if path else name, module))
        elif own:
            raise VeraExportError(
                f"modules_to_save '{name}' ({type(head).__name__}) has parameter"
                f" '{'.'.join(filter(None, (path, own[0][0])))}' in a {type(module).__name__}: only nn.Linear"
                " layers, with parameter-free operations around them, can become per-task graph inputs."
                f" Leave '{name.rpartition('.')[2]}' out of modules_to_save, or export one graph per task."
            )
    return linears


def _peft_kinds() -> tuple[type, type] | None:
    """PEFT's layer base classes, if PEFT is loaded: a PEFT model cannot exist without it, and
    importing it (with transformers) would cost seconds for every other model."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.tuners.vera.layer import VeraLayer

    return VeraLayer, BaseTunerLayer


def _find_layers(model: nn.Module) -> list[AdaptedLayer]:
    peft_kinds = _peft_kinds()
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, VeraLinear):
            layers.append(_our_layer(name, module))
        elif peft_kinds and isinstance(module, peft_kinds[0]):
            if (layer := _peft_layer(name, module, model)) is not None:
                layers.append(layer)
        elif peft_kinds and isinstance(module, peft_kinds[1]):
            tuner = type(module).__module__.split(".")[-2]  # peft.tuners.<tuner>.layer
            raise VeraExportError(
                f"layer '{name}' is a PEFT {tuner} layer, not VeRA: vera-export exports only VeRA"
                " adapters (peft.VeraConfig)."
            )
    return layers


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x is y or (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y))


def _check_shared(layers: list[AdaptedLayer]) -> None:
    first = layers[0]
    for layer in layers[1:]:
        if layer.lambda_d.shape != first.lambda_d.shape:
            raise VeraExportError(
                f"layers '{first.name}' (r={first.lambda_d.shape[0]}) and '{layer.name}'"
                f" (r={layer.lambda_d.shape[0]}) have inconsistent r: one graph needs one r for"
                " all layers; adapt the model again with a single VeraConfig."
            )
        if layer.seed != first.seed or not (_same(layer.vera_a, first.vera_a) and _same(layer.vera_b, first.vera_b)):
            raise VeraExportError(
                f"layers '{first.name}' (seed {first.seed}) and '{layer.name}' (seed {layer.seed})"
                " use different A/B projections: one graph shares one A and one B; adapt the"
                " model again with a single projection_prng_key."
            )


def find_vera_layers(model: nn.Module, task_name: str | None = None) -> AdaptedModel:
    """Return every VeRA layer of ``model``, checked to share one r, one seed and one A/B."""
    layers = _find_layers(model)
    if not layers:
        raise VeraExportError(
            f"{type(model).__name__} has no VeRA layer: adapt it with vera_export.apply_vera or"
            " peft.get_peft_model(model, peft.VeraConfig(...)) before exporting."
        )
    for layer in layers:
        _check_base(layer.name, layer.base)
    _check_shared(layers)
    first = layers[0]
    if any(layer.in_features > first.vera_a.shape[1] or layer.out_features > first.vera_b.shape[0] for layer in layers):
        raise VeraExportError("a VeRA layer is wider than the shared A/B: the checkpoint is inconsistent.")
    default_name = task_name or _peft_adapter_name(first) or "default"
    return AdaptedModel(tuple(layers), first.vera_a, first.vera_b, first.seed, default_name, _find_heads(model))


def _peft_adapter_name(layer: AdaptedLayer) -> str | None:
    if isinstance(layer.module, VeraLinear):
        return None
    return list(layer.module.active_adapters)[0]

"""The layers fisher-monitor measures: every module that owns trainable parameters.

A *layer* is all trainable parameters of one module (weight and bias together, flattened
in ``named_parameters`` order), named by the module's qualified name in the caller's
network. Two kinds of wrapper are looked through, so that names and numbers are those of
the plain network:

- ``torch.compile``'d modules (``OptimizedModule``): the layers of ``_orig_mod``, named as if
  the module had not been compiled (``net.0``, not ``net._orig_mod.0``);
- modules with ``torch.nn.utils.parametrize`` parametrizations (``weight_norm``,
  ``spectral_norm``, ``orthogonal``): the parameters the optimizer trains (``original``,
  ``original0``/``original1``) belong to the parametrized module's layer.

A parameter held by several modules (tied weights: a language model's output layer
sharing the input embedding's matrix) is one coordinate block: it belongs to the layer of
the first module that holds it (in ``named_modules`` order), and its per-sample gradient
is the sum over every use, as autograd defines its gradient. The other holders list it
in :attr:`LayerInfo.shared_with`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from fisher_monitor.keys import ALL

#: Name of the layer holding parameters owned by the measured network itself.
ROOT = "(root)"


@dataclass(frozen=True)
class LayerInfo:
    """A measured layer: all trainable parameters of one module.

    Attributes:
        name: Qualified module name in the caller's network (``"encoder.fc1"``);
            ``"(root)"`` for parameters owned by the network itself.
        module_type: Class name of the module, e.g. ``"Linear"``.
        parameter_names: Qualified names of its trainable parameters, in
            ``named_parameters`` order (the order of the block's coordinates), with
            ``torch.compile`` wrappers removed from the names.
        shapes: Their shapes.
        dimension: Number of parameters ``D``.
        shared_with: Other modules that hold one of these parameters (tied weights), by
            their qualified names; empty for a layer of its own.
    """

    name: str
    module_type: str
    parameter_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dimension: int
    shared_with: tuple[str, ...] = ()


def is_lazy(parameter: Tensor) -> bool:
    """Whether a parameter of a lazy module has not been initialised yet."""
    return isinstance(parameter, nn.parameter.UninitializedParameter)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    return "_orig_mod" in module._modules and type(module).__name__ == "OptimizedModule"


def unwrap(module: nn.Module) -> nn.Module:
    """The module a chain of ``torch.compile`` wrappers stands for."""
    while is_compiled(module):
        module = module._modules["_orig_mod"]  # type: ignore[assignment]
    return module


def is_parametrized(module: nn.Module) -> bool:
    """Whether ``module`` carries ``torch.nn.utils.parametrize`` parametrizations."""
    parametrizations = getattr(module, "parametrizations", None)
    return isinstance(parametrizations, nn.ModuleDict) and len(parametrizations) > 0


def named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with ``torch.compile`` wrappers looked through.

    Args:
        model: The network.
        prefix: Name of ``model`` itself.

    Yields:
        ``(qualified name, module)`` in ``named_modules`` order, each module once.
    """
    seen: set[int] = set()

    def walk(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        module = unwrap(module)
        if id(module) in seen:
            return
        seen.add(id(module))
        yield name, module
        for child_name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{name}.{child_name}" if name else child_name)

    yield from walk(model, prefix)


def _layer_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters a module's layer holds (local names)."""
    own = list(module._parameters.items())
    if is_parametrized(module):
        own += list(module.parametrizations.named_parameters(prefix="parametrizations"))
    return [
        (name, p)
        for name, p in own
        if p is not None and p.requires_grad and not is_lazy(p) and p.numel() > 0
    ]


def _inside_parametrization(name: str) -> bool:
    return ".parametrizations." in f".{name}." and not name.endswith("parametrizations")


def find_layers(model: nn.Module) -> list[tuple[LayerInfo, nn.Module]]:
    """List the modules that own trainable parameters, with their qualified names.

    Args:
        model: The caller's network.

    Returns:
        ``(info, module)`` pairs in ``named_modules`` order (compiled modules unwrapped).

    Raises:
        ValueError: If a module is named ``all``, or the network has no trainable
            parameters.
    """
    found: list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]] = []
    owner: dict[int, int] = {}  # parameter → index of its layer in ``found``
    shared: dict[int, list[str]] = {}
    for name, module in named_modules(model):
        if _inside_parametrization(name):
            continue  # their parameters belong to the parametrized module's layer
        own = []
        for local, p in _layer_parameters(module):
            if id(p) in owner:  # tied: the first holder's layer measures it
                shared.setdefault(owner[id(p)], []).append(name or ROOT)
            else:
                own.append((local, p))
        if not own:
            continue
        if (name or ROOT) == ALL:
            raise ValueError(
                "A module of the network is named 'all', the key fisher-monitor uses for the "
                "whole network. Rename that attribute (e.g. 'all_layers')."
            )
        for _, p in own:
            owner[id(p)] = len(found)
        found.append((name, module, own))
    if not found:
        raise ValueError("The network has no trainable parameters: there is nothing to measure.")
    return [
        (
            LayerInfo(
                name=name or ROOT,
                module_type=_module_type(module),
                parameter_names=tuple(f"{name}.{n}" if name else n for n, _ in params),
                shapes=tuple(tuple(p.shape) for _, p in params),
                dimension=sum(p.numel() for _, p in params),
                shared_with=tuple(dict.fromkeys(shared.get(index, []))),
            ),
            module,
        )
        for index, (name, module, params) in enumerate(found)
    ]


def layer_parameters(module: nn.Module, info: LayerInfo | None = None) -> list[nn.Parameter]:
    """The trainable parameters of a layer's module, in the layer's coordinate order.

    Args:
        module: The layer's module.
        info: The layer, to leave out parameters the module shares with an earlier layer
            (tied weights); ``None`` for all of the module's trainable parameters.
    """
    params = _layer_parameters(module)
    if info is None:
        return [p for _, p in params]
    prefix = info.name + "." if info.name != ROOT else ""
    names = set(info.parameter_names)
    return [p for local, p in params if prefix + local in names]


def _module_type(module: nn.Module) -> str:
    """Class name, without the ``Parametrized`` prefix parametrize adds."""
    name = type(module).__name__
    if is_parametrized(module) and name.startswith("Parametrized"):
        return name[len("Parametrized") :]
    return name


def measured_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every measured parameter under the name :class:`LayerInfo` uses for it.

    Names have ``torch.compile`` wrappers removed (``net.0.weight``), so they differ from
    ``model.named_parameters()`` for compiled submodules; use this mapping to pair a
    measurement's layers with the parameter objects (e.g. an optimizer's).
    """
    return {
        name: parameter
        for info, module in find_layers(model)
        for name, parameter in zip(
            info.parameter_names, layer_parameters(module, info), strict=True
        )
    }


__all__ = [
    "ROOT",
    "LayerInfo",
    "find_layers",
    "is_compiled",
    "is_lazy",
    "is_parametrized",
    "layer_parameters",
    "measured_parameters",
    "named_modules",
    "unwrap",
]

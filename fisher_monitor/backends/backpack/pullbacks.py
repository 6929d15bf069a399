"""``torch.func`` pull-backs through single modules BackPACK has no extension for.

Single-input modules without a BackPACK extension (``LayerNorm``, ``GroupNorm``, ``GELU``,
``SiLU``, …) get :class:`TorchFuncModuleExtension`: inside the same backward pass,
``torch.func`` pulls the columns back through that one module, per sample (its input
Jacobian for the layers below, its parameter Jacobian for its own layer), on a hook-free
twin of the module (:func:`attach_twin`), while BackPACK handles everything else.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict

import torch
from backpack import disable
from backpack.extensions.module_extension import ModuleExtension
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from fisher_monitor.backends.backpack.captures import MaterializedCapture

_TWIN_ATTRIBUTE = "_fisher_monitor_twin"


_PULLBACKS_ATTRIBUTE = "_fisher_monitor_pullbacks"


def takes_one_input(module: nn.Module) -> bool:
    """Whether a module's ``forward`` has exactly one required positional argument."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    required = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    return len(required) == 1 and not variadic


def attach_twin(module: nn.Module) -> None:
    """Give ``module`` a hook-free twin sharing its parameters and buffers.

    ``torch.func`` runs the twin: the module itself carries BackPACK's hooks, which would
    record inputs and wrap outputs during the backward pass. The twin is stored outside
    the module's children (it is not part of the network).
    """
    twin = copy.copy(module)
    twin._parameters = OrderedDict(module._parameters)
    twin._buffers = OrderedDict(module._buffers)
    for key, value in list(twin.__dict__.items()):
        if "hooks" in key and isinstance(value, dict):
            twin.__dict__[key] = type(value)()
    twin.__dict__.pop(_TWIN_ATTRIBUTE, None)
    module.__dict__[_TWIN_ATTRIBUTE] = twin


def _twin(module: nn.Module) -> nn.Module:
    twin = module.__dict__.get(_TWIN_ATTRIBUTE)
    if twin is None:
        raise RuntimeError(f"{type(module).__name__} was not prepared for torch.func pull-backs.")
    twin.training = module.training
    return twin


def _per_sample(function, inputs: Tensor, columns: Tensor):
    """``vmap`` of ``function(x_n, c_n)`` over samples (``c``: ``(R, N, ...)``), else a loop."""
    try:
        return vmap(function, in_dims=(0, 1), out_dims=1, randomness="different")(inputs, columns)
    except RuntimeError as error:  # data-dependent control flow and the like
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error):
            raise
    results = [function(inputs[n], columns[:, n]) for n in range(inputs.shape[0])]
    if isinstance(results[0], dict):
        return {k: torch.stack([r[k] for r in results], dim=1) for k in results[0]}
    return torch.stack(results, dim=1)


def input_pullback(module: nn.Module, columns: Tensor) -> Tensor:
    """``(R, N, *input)``: each sample's input Jacobian transposed, applied to its columns."""
    twin = _twin(module)

    def one(x: Tensor, c: Tensor) -> Tensor:
        _, pullback = vjp(lambda z: twin(z.unsqueeze(0)).squeeze(0), x)
        return vmap(lambda column: pullback(column)[0])(c)

    with disable(), torch.enable_grad():
        return _per_sample(one, module.input0.detach(), columns)


def parameter_pullbacks(module: nn.Module, columns: Tensor) -> dict[str, Tensor]:
    """Per trainable parameter, ``(R, N, *shape)``: ``J_θ(n)ᵀ c_{r,n}`` per sample."""
    twin = _twin(module)
    trainable = {n: p.detach() for n, p in twin.named_parameters(recurse=False) if p.requires_grad}
    fixed = {n: p.detach() for n, p in twin.named_parameters(recurse=False) if not p.requires_grad}
    fixed.update(dict(twin.named_buffers(recurse=False)))

    def one(x: Tensor, c: Tensor) -> dict[str, Tensor]:
        def output(params):
            return functional_call(twin, {**params, **fixed}, (x.unsqueeze(0),)).squeeze(0)

        _, pullback = vjp(output, trainable)
        return vmap(lambda column: pullback(column)[0])(c)

    with disable(), torch.enable_grad():
        return _per_sample(one, module.input0.detach(), columns)


def clear_pullbacks(module: nn.Module) -> None:
    """Drop the parameter pull-backs a failed pass left on ``module``."""
    module.__dict__.pop(_PULLBACKS_ATTRIBUTE, None)


class TorchFuncModuleExtension(ModuleExtension):
    """The ``SqrtGGN`` step of a module type BackPACK has no extension for, by ``torch.func``.

    Pulls the columns back through the module per sample (as the ``torch.func`` backend
    does for the whole network), so only this module leaves BackPACK's structured path;
    its own parameters receive :class:`MaterializedCapture` s. The module must take one
    tensor and return one tensor, and have a twin (:func:`attach_twin`).

    Args:
        parameters: Names of the parameters modules of this type may have.
    """

    def __init__(self, parameters: list[str]):
        for name in parameters:
            setattr(self, name, self._parameter_step(name))
        super().__init__(params=parameters)

    def backpropagate(self, ext, module, g_inp, g_out, backproped):  # noqa: D102
        return input_pullback(module, backproped)

    @staticmethod
    def _parameter_step(name: str):
        def step(ext, module, g_inp, g_out, backproped):
            cache = module.__dict__.get(_PULLBACKS_ATTRIBUTE)
            if cache is None:
                cache = parameter_pullbacks(module, backproped)
                module.__dict__[_PULLBACKS_ATTRIBUTE] = cache
            columns = cache.pop(name)
            if not cache:
                del module.__dict__[_PULLBACKS_ATTRIBUTE]
            return MaterializedCapture(columns.detach())

        return step


__all__ = [
    "TorchFuncModuleExtension",
    "attach_twin",
    "clear_pullbacks",
    "input_pullback",
    "parameter_pullbacks",
    "takes_one_input",
]

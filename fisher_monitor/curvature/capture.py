"""A BackPACK extension that backpropagates our loss side and captures per-layer factors.

BackPACK's ``SqrtGGN`` extension backpropagates a matrix of columns from the loss through
the network, module by module. :class:`FactorCapture` reuses that backpropagation with two
changes: the loss module starts it with *our* loss side (float64 closed forms from
:mod:`fisher_monitor.likelihoods`, cast to the network's type: the Fisher's square-root
columns, plus the observed residual for the Monte-Carlo Fisher), and the per-parameter
step keeps compact factors instead of materialising ``R·N × D`` per parameter: for
``Linear`` and ``ConvNd`` layers the layer's input and the backpropagated columns at its
output (from which every Gram matrix, diagonal and Kronecker factor follows cheaply); for
any other parametrised layer BackPACK supports, BackPACK's own parameter Jacobian applied
to the columns.

Adaptive average pooling (``AdaptiveAvgPool1d/2d/3d``, e.g. the global pooling before a
ResNet's classifier) has no ``SqrtGGN`` extension in BackPACK; :class:`FactorCapture`
registers one whose transposed Jacobian is the exact separable averaging operator, in the
type of the backpropagated columns.

Other single-input modules without a BackPACK extension (``LayerNorm``, ``GroupNorm``,
``GELU``, ``SiLU``, …) get :class:`TorchFuncModuleExtension`: inside the same backward
pass, ``torch.func`` pulls the columns back through that one module, per sample (its
input Jacobian for the layers below, its parameter Jacobian for its own layer), on a
hook-free twin of the module, while BackPACK handles everything else.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from dataclasses import dataclass

import torch
from backpack import disable
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.module_extension import ModuleExtension
from backpack.extensions.secondorder.hbp import LossHessianStrategy
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGN
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from backpack.utils.conv import unfold_input
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

SAVEFIELD = "fisher_monitor_factors"
_CAPTURE_ATTRIBUTE = "_fisher_monitor_capture"
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class StructuredCapture:
    """What a ``Linear``/``ConvNd`` layer leaves behind in the backward pass.

    Attributes:
        inputs: ``(N, T, I)`` layer inputs (unfolded for convolutions), no bias column.
        columns: ``(R, N, T, O)`` backpropagated loss-side columns at the output.
        positions: Whether the layer has positions (``T > 1`` or a weight-sharing layer).
    """

    inputs: Tensor
    columns: Tensor
    positions: bool


@dataclass
class MaterializedCapture:
    """BackPACK's per-parameter factors for a layer type without structured handling.

    Attributes:
        columns: ``(R, N, *shape)`` the loss-side columns pulled back to the parameter.
    """

    columns: Tensor


def supports_structured(module: nn.Module) -> bool:
    """Whether ``module`` is captured as inputs × output gradients.

    Args:
        module: A parametrised module.

    Returns:
        ``True`` for ``Linear`` and ungrouped ``Conv1d/2d/3d`` with zero padding.
    """
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, _CONV_TYPES):
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


def _structured_capture(module: nn.Module, backproped: Tensor) -> StructuredCapture:
    inputs = module.input0
    n, columns = inputs.shape[0], backproped.shape[0]
    if isinstance(module, nn.Linear):
        out_features = backproped.shape[-1]
        return StructuredCapture(
            inputs=inputs.reshape(n, -1, inputs.shape[-1]),
            columns=backproped.reshape(columns, n, -1, out_features),
            positions=inputs.dim() > 2,
        )
    # ConvNd: unfold to (N, C_in·k, T) and move the positions before the features
    out_channels = backproped.shape[2]
    unfolded = unfold_input(module, inputs).transpose(1, 2)
    return StructuredCapture(
        inputs=unfolded,
        columns=backproped.reshape(columns, n, out_channels, -1).transpose(2, 3),
        positions=True,
    )


def pooling_matrix(size_in: int, size_out: int, dtype: torch.dtype, device) -> Tensor:
    """The ``(size_out, size_in)`` matrix of adaptive average pooling along one axis.

    Output position ``i`` averages the inputs ``⌊i·L/l⌋ … ⌈(i+1)·L/l⌉ − 1`` (PyTorch's
    definition, for any ``L = size_in`` and ``l = size_out``, divisible or not).
    """
    matrix = torch.zeros(size_out, size_in, dtype=dtype, device=device)
    for i in range(size_out):
        start = (i * size_in) // size_out
        stop = -(-((i + 1) * size_in) // size_out)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


class AdaptiveAvgPoolDerivatives(BaseDerivatives):
    """Jacobians of ``AdaptiveAvgPool{1,2,3}d`` on batched ``(N, C, *spatial)`` inputs.

    Adaptive average pooling is linear and separable: along each spatial axis it applies
    :func:`pooling_matrix` ``P_k``, so ``Jᵀ M = M ×_1 P_1ᵀ ×_2 P_2ᵀ …`` exactly (for a
    1 × 1 output: the column spread evenly over the ``H·W`` positions). The matrices take
    the type and device of the backpropagated columns, so float64 networks work under a
    float32 default dtype.

    Args:
        dimensions: Number of spatial axes (1, 2 or 3).
    """

    def __init__(self, dimensions: int):
        self.dimensions = dimensions

    def hessian_is_zero(self, module: nn.Module) -> bool:  # noqa: D102 - linear map
        return True

    def _matrices(self, module: nn.Module, like: Tensor) -> list[Tensor]:
        spatial_in = module.input0.shape[-self.dimensions :]
        spatial_out = module.output.shape[-self.dimensions :]
        if module.input0.dim() != self.dimensions + 2:
            raise NotImplementedError(
                f"{type(module).__name__} is measured on batched (N, C, ...) inputs only, "
                f"got an input of shape {tuple(module.input0.shape)}."
            )
        return [
            pooling_matrix(int(a), int(b), like.dtype, like.device)
            for a, b in zip(spatial_in, spatial_out, strict=True)
        ]

    def _apply(self, mat: Tensor, matrices: list[Tensor]) -> Tensor:
        first = mat.dim() - self.dimensions
        for offset, matrix in enumerate(matrices):
            axis = first + offset
            mat = (mat.movedim(axis, -1) @ matrix).movedim(-1, axis)
        return mat

    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None) -> Tensor:
        return self._apply(mat, self._matrices(module, mat))

    def _jac_mat_prod(self, module, g_inp, g_out, mat) -> Tensor:
        return self._apply(mat, [m.T for m in self._matrices(module, mat)])


#: Module types BackPACK has no ``SqrtGGN`` extension for, registered by FactorCapture.
EXTRA_MODULE_EXTENSIONS = {
    nn.AdaptiveAvgPool1d: lambda: SqrtGGNBaseModule(AdaptiveAvgPoolDerivatives(1)),
    nn.AdaptiveAvgPool2d: lambda: SqrtGGNBaseModule(AdaptiveAvgPoolDerivatives(2)),
    nn.AdaptiveAvgPool3d: lambda: SqrtGGNBaseModule(AdaptiveAvgPoolDerivatives(3)),
}


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


class FactorCapture(SqrtGGN):
    """Backpropagate our loss side with BackPACK and keep compact per-layer factors.

    Set :attr:`loss_columns` (``(R, N, *output_shape)``, see
    :meth:`fisher_monitor.likelihoods.LossSide.for_backpack`) before the backward pass.
    For ``Linear``/``ConvNd`` layers the capture is stored on the module as a
    :class:`StructuredCapture` (attribute ``_fisher_monitor_capture``); for other
    parametrised layers each trainable parameter receives a :class:`MaterializedCapture`
    under ``param.fisher_monitor_factors``. The caller reads and deletes both in
    BackPACK's ``extension_hook``, which runs right after each module.

    Args:
        torch_func_types: Module types to handle with :class:`TorchFuncModuleExtension`,
            with the parameter names their instances have.
    """

    def __init__(self, torch_func_types: dict[type[nn.Module], list[str]] | None = None):
        super().__init__(LossHessianStrategy.EXACT, SAVEFIELD, None)
        registry = getattr(self, "_BackpropExtension__module_extensions", None)
        if registry is None:  # pragma: no cover - guards against BackPACK internals moving
            raise RuntimeError(
                "fisher-monitor cannot read BackPACK's extension registry; this BackPACK "
                "version is not supported. Install backpack-for-pytorch>=1.6,<2."
            )
        for module_class, make in EXTRA_MODULE_EXTENSIONS.items():
            if module_class not in registry:
                registry[module_class] = make()
        self.supported_modules: tuple[type[nn.Module], ...] = tuple(registry)
        self.loss_columns: Tensor | None = None
        for module_class, module_extension in registry.items():
            if module_class.__module__.endswith(".loss"):
                module_extension.backpropagate = self._start_backpropagation
            for param in getattr(module_extension, "_ModuleExtension__params", []):
                # an instance attribute shadows the stock per-parameter method
                setattr(
                    module_extension, param, _param_function(module_extension.derivatives, param)
                )
        for module_class, parameters in (torch_func_types or {}).items():
            registry[module_class] = TorchFuncModuleExtension(parameters)

    def _start_backpropagation(self, ext, module, g_inp, g_out, backproped) -> Tensor:
        if self.loss_columns is None:
            raise RuntimeError("FactorCapture.loss_columns was not set before backward().")
        return self.loss_columns


def _param_function(derivatives, param_str: str):
    """Per-parameter step of :class:`FactorCapture` for one module type and parameter."""

    def capture(ext, module, g_inp, g_out, backproped):
        if supports_structured(module):
            if not hasattr(module, _CAPTURE_ATTRIBUTE):
                setattr(module, _CAPTURE_ATTRIBUTE, _structured_capture(module, backproped))
            return None
        columns = derivatives.param_mjp(
            param_str, module, g_inp, g_out, backproped, sum_batch=False
        )
        return MaterializedCapture(columns.detach())

    return capture


def pop_structured(module: nn.Module) -> StructuredCapture | None:
    """Remove and return the structured capture stored on ``module``, if any."""
    return module.__dict__.pop(_CAPTURE_ATTRIBUTE, None)


def pop_materialized(param: Tensor) -> MaterializedCapture | None:
    """Remove and return the materialised capture stored on ``param``, if any."""
    return param.__dict__.pop(SAVEFIELD, None)


def clear_captures(module: nn.Module) -> None:
    """Drop every capture left on a module and its parameters (after a failed pass)."""
    for sub in module.modules():
        sub.__dict__.pop(_CAPTURE_ATTRIBUTE, None)
        sub.__dict__.pop(_PULLBACKS_ATTRIBUTE, None)
        for param in sub.parameters(recurse=False):
            param.__dict__.pop(SAVEFIELD, None)


def detach_capture(capture: StructuredCapture) -> StructuredCapture:
    """Detach the tensors of a capture from the autograd graph."""
    return StructuredCapture(capture.inputs.detach(), capture.columns.detach(), capture.positions)


__all__ = [
    "EXTRA_MODULE_EXTENSIONS",
    "TorchFuncModuleExtension",
    "attach_twin",
    "input_pullback",
    "parameter_pullbacks",
    "takes_one_input",
    "AdaptiveAvgPoolDerivatives",
    "FactorCapture",
    "MaterializedCapture",
    "StructuredCapture",
    "clear_captures",
    "detach_capture",
    "pop_materialized",
    "pop_structured",
    "pooling_matrix",
    "supports_structured",
]

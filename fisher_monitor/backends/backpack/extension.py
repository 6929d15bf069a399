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

Adaptive average pooling gets the extension of
:mod:`~fisher_monitor.backends.backpack.pooling`, other single-input modules without an
extension the ``torch.func`` pull-backs of :mod:`~fisher_monitor.backends.backpack.pullbacks`.
"""

from __future__ import annotations

from backpack.extensions.secondorder.hbp import LossHessianStrategy
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGN
from backpack.utils.conv import unfold_input
from torch import Tensor, nn

from fisher_monitor.backends.backpack.captures import (
    SAVEFIELD,
    MaterializedCapture,
    StructuredCapture,
    clear_module_captures,
    store_structured,
)
from fisher_monitor.backends.backpack.pooling import EXTRA_MODULE_EXTENSIONS
from fisher_monitor.backends.backpack.pullbacks import TorchFuncModuleExtension, clear_pullbacks

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
            store_structured(module, lambda: _structured_capture(module, backproped))
            return None
        columns = derivatives.param_mjp(
            param_str, module, g_inp, g_out, backproped, sum_batch=False
        )
        return MaterializedCapture(columns.detach())

    return capture


def clear_captures(module: nn.Module) -> None:
    """Drop every capture left on a module and its parameters (after a failed pass)."""
    for sub in module.modules():
        clear_module_captures(sub)
        clear_pullbacks(sub)


__all__ = ["FactorCapture", "clear_captures", "supports_structured"]

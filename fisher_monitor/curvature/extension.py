"""A BackPACK extension that captures per-layer factors of F and EF in one backward pass.

BackPACK's ``SqrtGGNExact`` / ``SqrtGGNMC`` backpropagate a square root of the loss
Hessian (exact, or from sampled labels) through the network. Their stock per-parameter
step multiplies it with the parameter Jacobian, materialising ``C·N × D`` per parameter.
:class:`FactorCapture` reuses their backpropagation unchanged and replaces only that last
step: for ``Linear`` and ``ConvNd`` layers it keeps the layer's input, output gradient and
the backpropagated square root at the output (from which every Gram matrix, diagonal and
Kronecker factor follows cheaply); for any other parametrised layer BackPACK supports it
keeps BackPACK's own per-sample gradients and square-root factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from backpack.extensions.secondorder.hbp import LossHessianStrategy
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGN
from backpack.utils.conv import unfold_input
from torch import Tensor, nn

from fisher_monitor.curvature.losses import complement_basis

SAVEFIELD = "fisher_monitor_factors"
_CAPTURE_ATTRIBUTE = "_fisher_monitor_capture"
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class StructuredCapture:
    """What a ``Linear``/``ConvNd`` layer leaves behind in the backward pass.

    Attributes:
        inputs: ``(N, T, I)`` layer inputs (unfolded for convolutions), no bias column.
        output_grads: ``(N, T, O)`` gradient of the loss (as reduced) w.r.t. the output.
        sqrt: ``(R_n, N, T, O)`` backpropagated loss-Hessian square root at the output.
        positions: Whether the layer has positions (``T > 1`` or a weight-sharing layer).
    """

    inputs: Tensor
    output_grads: Tensor
    sqrt: Tensor
    positions: bool


@dataclass
class MaterializedCapture:
    """BackPACK's per-parameter factors for a layer type without structured handling.

    Attributes:
        per_sample: ``(N, *shape)`` gradient of the loss (as reduced), per sample.
        sqrt: ``(R_n, N, *shape)`` square-root factor columns.
    """

    per_sample: Tensor
    sqrt: Tensor


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


def _structured_capture(module: nn.Module, g_out: tuple[Tensor], backproped: Tensor):
    inputs = module.input0
    output_grads = g_out[0]
    if isinstance(module, nn.Linear):
        n, out_features = output_grads.shape[0], output_grads.shape[-1]
        positions = inputs.dim() > 2
        return StructuredCapture(
            inputs=inputs.reshape(n, -1, inputs.shape[-1]),
            output_grads=output_grads.reshape(n, -1, out_features),
            sqrt=backproped.reshape(backproped.shape[0], n, -1, out_features),
            positions=positions,
        )
    # ConvNd: unfold to (N, C_in·k, T) and move the positions before the features
    n, out_channels = output_grads.shape[:2]
    unfolded = unfold_input(module, inputs).transpose(1, 2)
    return StructuredCapture(
        inputs=unfolded,
        output_grads=output_grads.reshape(n, out_channels, -1).transpose(1, 2),
        sqrt=backproped.reshape(backproped.shape[0], n, out_channels, -1).transpose(2, 3),
        positions=True,
    )


class FactorCapture(SqrtGGN):
    """Backpropagate BackPACK's GGN square root and keep compact per-layer factors.

    For ``Linear``/``ConvNd`` layers the capture is stored on the module as a
    :class:`StructuredCapture` (attribute ``_fisher_monitor_capture``); for other
    parametrised layers each trainable parameter receives a :class:`MaterializedCapture`
    under ``param.fisher_monitor_factors``. The caller reads and deletes both in
    BackPACK's ``extension_hook``, which runs right after each module.

    Args:
        exact: Use the exact loss-Hessian square root (``C`` columns per sample) rather
            than ``mc_samples`` sampled labels per sample.
        mc_samples: Number of sampled labels per sample when ``exact`` is ``False``.
    """

    def __init__(self, exact: bool, mc_samples: int = 1):
        strategy = LossHessianStrategy.EXACT if exact else LossHessianStrategy.SAMPLING
        self._mc_samples = mc_samples
        super().__init__(strategy, SAVEFIELD, None)
        registry = getattr(self, "_BackpropExtension__module_extensions", None)
        if registry is None:  # pragma: no cover - guards against BackPACK internals moving
            raise RuntimeError(
                "fisher-monitor cannot read BackPACK's extension registry; this BackPACK "
                "version is not supported. Install backpack-for-pytorch>=1.6,<2."
            )
        self.supported_modules: tuple[type[nn.Module], ...] = tuple(registry)
        if exact:
            _drop_null_direction(registry[nn.CrossEntropyLoss])
        for module_extension in registry.values():
            for param in getattr(module_extension, "_ModuleExtension__params", []):
                # an instance attribute shadows the stock per-parameter method
                setattr(
                    module_extension, param, _param_function(module_extension.derivatives, param)
                )

    def get_num_mc_samples(self) -> int:
        """Return the number of sampled labels per sample."""
        return self._mc_samples


def _drop_null_direction(loss_extension) -> None:
    """Backpropagate ``C − 1`` instead of ``C`` square-root columns for a softmax.

    The softmax Hessian ``diag(p) − ppᵀ`` has rank ``C − 1``: BackPACK's square root
    ``S = diag(√p)(I − √p√pᵀ)`` annihilates ``√p``. With ``Q`` an orthonormal basis of the
    complement of ``√p`` (see :func:`~fisher_monitor.curvature.losses.complement_basis`),
    ``SQ`` is a square root with one column fewer, ``(SQ)(SQ)ᵀ = SSᵀ``. Every
    backpropagated matrix, Gram matrix and Cholesky factorisation shrinks accordingly.
    """
    stock = loss_extension.backpropagate

    def backpropagate(ext, module, g_inp, g_out, backproped):
        sqrt = stock(ext, module, g_inp, g_out, backproped)
        if sqrt.dim() != 3 or sqrt.shape[0] < 2:  # extra output dimensions: keep all columns
            return sqrt
        tau = module.input0.detach().softmax(dim=1).sqrt().to(sqrt.dtype)  # (N, C)
        basis = complement_basis(tau).transpose(1, 2)  # (N, C − 1, C)
        return torch.einsum("vnc,njv->jnc", sqrt, basis)

    loss_extension.backpropagate = backpropagate


def _param_function(derivatives, param_str: str):
    """Per-parameter step of :class:`FactorCapture` for one module type and parameter."""

    def capture(ext, module, g_inp, g_out, backproped):
        if supports_structured(module):
            if not hasattr(module, _CAPTURE_ATTRIBUTE):
                captured = _structured_capture(module, g_out, backproped)
                setattr(module, _CAPTURE_ATTRIBUTE, captured)
            return None
        per_sample = derivatives.param_mjp(
            param_str, module, g_inp, g_out, g_out[0].unsqueeze(0), sum_batch=False
        )[0]
        sqrt = derivatives.param_mjp(param_str, module, g_inp, g_out, backproped, sum_batch=False)
        return MaterializedCapture(per_sample.detach(), sqrt.detach())

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
        for param in sub.parameters(recurse=False):
            param.__dict__.pop(SAVEFIELD, None)


def detach_capture(capture: StructuredCapture) -> StructuredCapture:
    """Detach the tensors of a capture from the autograd graph."""
    return StructuredCapture(
        capture.inputs.detach(),
        capture.output_grads.detach(),
        capture.sqrt.detach(),
        capture.positions,
    )


__all__ = [
    "FactorCapture",
    "MaterializedCapture",
    "StructuredCapture",
    "clear_captures",
    "detach_capture",
    "pop_materialized",
    "pop_structured",
    "supports_structured",
]

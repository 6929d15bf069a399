"""A hook-free copy of the caller's network (the "shadow copy"), the base of every backend.

The caller's model is never extended. The copy consists of new module objects (so
BackPACK's hooks and stored inputs live on the copy) whose parameters are new
``Parameter`` objects sharing storage with the caller's (so the copy always sees the
current weights at no memory cost, and gradients land on the copy's own ``.grad``).
Buffers are cloned and re-synchronised before each pass, so running statistics of the
caller's ``BatchNorm`` layers are never updated by a measurement. ``torch.compile``
wrappers are replaced by copies of the modules they wrap; parametrized modules are copied
with their parametrizations (their trainable parameters are the ``original`` tensors).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from fisher_monitor.backends.pass_context import OutputAdapter
from fisher_monitor.layers import LayerInfo, find_layers, is_compiled, named_modules
from fisher_monitor.likelihoods import Likelihood
from fisher_monitor.validation import format_names

# every batch normalisation, SyncBatchNorm included (it derives from _BatchNorm only)
_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def weight_recomputing_hooks(module: nn.Module) -> list:
    """Forward pre-hooks that recompute a weight from other parameters (reparametrisations).

    Pruning (``torch.nn.utils.prune``) and the classic ``weight_norm`` / ``spectral_norm``
    write ``module.weight`` from ``weight_orig`` (and a mask) or ``weight_g``/``weight_v`` before
    every forward; the copy needs them to compute the same function.
    """
    from torch.nn.utils import prune

    kinds: tuple[type, ...] = (prune.BasePruningMethod,)
    try:
        from torch.nn.utils.spectral_norm import SpectralNorm
        from torch.nn.utils.weight_norm import WeightNorm

        kinds += (WeightNorm, SpectralNorm)
    except ImportError:  # pragma: no cover - removed in some future release
        pass
    return [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, kinds)]


def _new_like(module: nn.Module) -> nn.Module:
    """A shallow copy that bypasses ``__getstate__`` (parametrized modules refuse pickling)."""
    new = type(module).__new__(type(module))
    new.__dict__.update(module.__dict__)
    return new


def _shadow(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    """Copy module objects, share parameter storage, clone buffers, drop most hooks."""
    if id(module) in memo:
        return memo[id(module)]  # type: ignore[return-value]
    if is_compiled(module):
        copied = _shadow(module._modules["_orig_mod"], memo)  # type: ignore[arg-type]
        memo[id(module)] = copied
        return copied
    new = _new_like(module)
    memo[id(module)] = new
    new._parameters = OrderedDict(
        (k, None if p is None else memo[id(p)]) for k, p in module._parameters.items()
    )
    buffers = OrderedDict()
    for key, buffer in module._buffers.items():
        if buffer is not None and id(buffer) not in memo:
            clone = buffer.detach().clone()  # a buffer shared by modules stays shared
            memo[id(buffer)] = clone.float() if clone.dtype in _LOW_PRECISION else clone
        buffers[key] = None if buffer is None else memo[id(buffer)]
    new._buffers = buffers
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._modules = OrderedDict(
        (k, None if m is None else _shadow(m, memo)) for k, m in module._modules.items()
    )
    # the copy carries none of the caller's hooks (they could have side effects, and BackPACK
    # needs to own the copy's backward hooks), except those that recompute a weight
    recompute = weight_recomputing_hooks(module)
    for key, value in list(new.__dict__.items()):
        if "hooks" in key and isinstance(value, dict):
            new.__dict__[key] = type(value)()
    for hook in recompute:
        new.register_forward_pre_hook(hook)
    # tensors kept as plain attributes (e.g. a weight computed by such a hook) must not
    # lead a backward pass into the caller's graph
    for key, value in list(new.__dict__.items()):
        if (
            isinstance(value, Tensor)
            and not isinstance(value, nn.Parameter)
            and value.requires_grad
        ):
            new.__dict__[key] = value.detach()
    if getattr(new, "inplace", False) is True:
        new.inplace = False  # BackPACK's hooks and torch.func both need out-of-place ops
    return new


def copy_model(model: nn.Module) -> tuple[nn.Module, dict[int, object]]:
    """Return a hook-free copy of ``model`` whose parameters share the caller's storage.

    Half-precision (float16/bfloat16) parameters and buffers get float32 copies instead (the
    curvature computations need the precision; :meth:`ModelCopy.sync` refreshes them),
    and modules that work in place (``ReLU(inplace=True)`` and the like) work out of place
    in the copy.

    Args:
        model: The caller's network.

    Returns:
        The copy, and the map from ``id`` of each source module, parameter and buffer to
        its counterpart in the copy.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        if id(p) not in memo:
            data = p.detach()
            if data.dtype in _LOW_PRECISION:
                data = data.float()
            memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
    return _shadow(model, memo), memo


class ModelCopy:
    """A shadow copy of the caller's network; the base of every backend.

    Keeps the layers and the correspondence between the caller's modules and the copy's,
    and re-synchronises buffers, train/eval modes and half-precision parameter copies
    before every pass.

    Args:
        model: The caller's network (left untouched).
        likelihood: The likelihood of the loss.
        outputs: The loss's input from the network's raw output (``None``:
            :func:`~fisher_monitor.backends.pass_context.select_logits`).

    Attributes:
        preparation_notes: What the user should know about how the network is measured
            (repeated in every measurement's notes).
    """

    backend = "none"

    def __init__(
        self, model: nn.Module, likelihood: Likelihood, outputs: OutputAdapter | None = None
    ):
        self.source = model
        self.likelihood = likelihood
        self.outputs = outputs
        self.preparation_notes: list[str] = []
        self.layers = find_layers(model)
        self._source_params = list(model.parameters())
        devices = sorted({str(p.device) for p in self._source_params})
        if len(devices) > 1:
            raise NotImplementedError(
                f"The network's parameters are on several devices ({', '.join(devices)}). "
                "Model-parallel networks are not supported: measure a sub-network that lives "
                "on one device (FisherMonitor(network=...))."
            )
        self.copy_root, memo = copy_model(model)
        self._module_pairs = [
            (name, module, memo[id(module)]) for name, module in named_modules(model)
        ]
        self._copy_of_module = {id(source): copy for _, source, copy in self._module_pairs}
        self._copy_params = [memo[id(p)] for p in self._source_params]
        self._low_precision = [
            (source, target)
            for source, target in zip(self._source_params, self._copy_params, strict=True)
            if source.dtype in _LOW_PRECISION
        ]
        if self._low_precision:
            kinds = sorted({str(p.dtype).replace("torch.", "") for p, _ in self._low_precision})
            self.preparation_notes.append(
                f"parameters in {', '.join(kinds)} measured through float32 copies"
            )
        self.layer_of_copy_param: dict[int, LayerInfo] = {}
        for info, _ in self.layers:
            for name in info.parameter_names:
                parameter = self.copy_root.get_parameter(name)
                self.layer_of_copy_param[id(parameter)] = info

    def copy_of(self, module: nn.Module) -> nn.Module:
        """The copy's counterpart of one of the caller's modules."""
        return self._copy_of_module[id(module)]  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """Device of the network's first parameter."""
        return self._source_params[0].device

    @property
    def parameter_dtype(self) -> torch.dtype:
        """Floating-point type the copy computes in."""
        return self._copy_params[0].dtype

    def is_stale(self) -> bool:
        """Whether the caller's parameters were replaced or moved since preparation.

        A stale network must be prepared again (e.g. after ``model.to(device)``).
        """
        current = list(self.source.parameters())
        if len(current) != len(self._source_params):
            return True
        shared = {id(target) for _, target in self._low_precision}
        return any(
            a is not b
            or a.requires_grad != c.requires_grad
            or a.device != c.device
            or (id(c) not in shared and a.data_ptr() != c.data_ptr())
            for a, b, c in zip(current, self._source_params, self._copy_params, strict=True)
        )

    def sync(self) -> list[str]:
        """Copy buffers, half-precision parameters and train/eval modes from the caller's model.

        ``BatchNorm`` layers in train mode are measured in eval mode (their running
        statistics), since per-sample gradients through batch statistics are not defined.

        Returns:
            Notes for this measurement (the BatchNorm layers measured in eval mode).
        """
        with torch.no_grad():
            for source, target in self._low_precision:
                target.copy_(source.detach())
            for _, source, copy in self._module_pairs:
                for key, buffer in source._buffers.items():
                    if buffer is not None and copy._buffers.get(key) is not None:
                        copy._buffers[key].copy_(buffer.detach())
        notes = []
        for name, source, copy in self._module_pairs:
            copy.training = source.training
            if isinstance(source, _BATCHNORM_TYPES) and source.training:
                copy.training = False
                notes.append(name)
        if not notes:
            return []
        return [
            f"BatchNorm in train mode measured in eval mode (running statistics; per-sample "
            f"gradients through batch statistics are not defined): {format_names(notes)}"
        ]

    def close(self) -> None:
        """Release what the backend attached to the copy."""


__all__ = ["ModelCopy", "copy_model", "weight_recomputing_hooks"]

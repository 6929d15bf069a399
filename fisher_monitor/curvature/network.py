"""The network fisher-monitor measures: layers, a hook-free shadow copy, one backward pass.

The caller's model is never extended. :class:`PreparedNetwork` builds a *shadow copy*:
new module objects (so BackPACK's hooks and stored inputs live on the copy) whose
parameters are new ``Parameter`` objects sharing storage with the caller's (so the copy
always sees the current weights at no memory cost, and gradients land on the copy's own
``.grad``). Buffers are cloned and re-synchronised before each pass, so running
statistics of the caller's ``BatchNorm`` layers are never updated by a measurement.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from backpack import backpack, extend, memory_cleanup
from backpack.context import CTX
from backpack.custom_module.graph_utils import convert_module_to_backpack
from torch import Tensor, nn

from fisher_monitor.curvature.extension import (
    FactorCapture,
    MaterializedCapture,
    StructuredCapture,
    clear_captures,
    detach_capture,
    pop_materialized,
    pop_structured,
)
from fisher_monitor.curvature.factors import (
    LayerFactors,
    MaterializedFactors,
    OuterProductFactors,
    WeightSharingFactors,
    augment,
)
from fisher_monitor.curvature.losses import LossSpec

#: PyTorch ≥ 2.13 warns about full backward hooks on modules whose inputs need no grad;
#: BackPACK relies on exactly that case, so the warning is silenced around our passes only.
_BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed"

# every batch normalisation, SyncBatchNorm included (it derives from _BatchNorm only)
_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class LayerInfo:
    """A measured layer: all trainable parameters of one module.

    Attributes:
        name: Qualified module name in the caller's network (``"encoder.fc1"``);
            ``"(root)"`` for parameters owned by the network itself.
        module_type: Class name of the module, e.g. ``"Linear"``.
        parameter_names: Qualified names of its trainable parameters, in
            ``named_parameters`` order (the order of the block's coordinates).
        shapes: Their shapes.
        dimension: Number of parameters ``D``.
    """

    name: str
    module_type: str
    parameter_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dimension: int


def find_layers(model: nn.Module) -> list[tuple[LayerInfo, nn.Module]]:
    """List the modules that own trainable parameters, with their qualified names.

    Args:
        model: The caller's network.

    Returns:
        ``(info, module)`` pairs in ``named_modules`` order.

    Raises:
        ValueError: If a parameter is shared by several modules (tied weights), or the
            network has no trainable parameters.
    """
    layers = []
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        params = [
            (n, p)
            for n, p in module.named_parameters(recurse=False)
            if p.requires_grad and not is_lazy(p) and p.numel() > 0
        ]
        if not params:
            continue
        layer_name = name or "(root)"
        if layer_name == "all":
            raise ValueError(
                "A module of the network is named 'all', the key fisher-monitor uses for the "
                "whole network. Rename that attribute (e.g. 'all_layers')."
            )
        for local, p in params:
            if id(p) in owner:
                raise ValueError(
                    f"Parameter {name + '.' + local if name else local!r} is shared with layer "
                    f"{owner[id(p)]!r} (tied weights). Per-layer blocks of tied parameters are "
                    "not defined; untie them or freeze one copy (requires_grad=False)."
                )
            owner[id(p)] = layer_name
        info = LayerInfo(
            name=layer_name,
            module_type=type(module).__name__,
            parameter_names=tuple(f"{name}.{n}" if name else n for n, _ in params),
            shapes=tuple(tuple(p.shape) for _, p in params),
            dimension=sum(p.numel() for _, p in params),
        )
        layers.append((info, module))
    if not layers:
        raise ValueError("The network has no trainable parameters: there is nothing to measure.")
    return layers


def is_lazy(parameter: Tensor) -> bool:
    """Whether a parameter of a lazy module has not been initialised yet."""
    return isinstance(parameter, nn.parameter.UninitializedParameter)


def _weight_recomputing_hooks(module: nn.Module) -> list:
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


def _shadow(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    """Copy module objects, share parameter storage, clone buffers, drop most hooks."""
    if id(module) in memo:
        return memo[id(module)]  # type: ignore[return-value]
    new = copy.copy(module)
    memo[id(module)] = new
    new._parameters = OrderedDict(
        (k, None if p is None else memo[id(p)]) for k, p in module._parameters.items()
    )
    buffers = OrderedDict()
    for key, buffer in module._buffers.items():
        if buffer is not None and id(buffer) not in memo:
            memo[id(buffer)] = buffer.detach().clone()  # a buffer shared by modules stays shared
        buffers[key] = None if buffer is None else memo[id(buffer)]
    new._buffers = buffers
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._modules = OrderedDict(
        (k, None if m is None else _shadow(m, memo)) for k, m in module._modules.items()
    )
    # the copy carries none of the caller's hooks (they could have side effects, and BackPACK
    # needs to own the copy's backward hooks), except those that recompute a weight
    recompute = _weight_recomputing_hooks(module)
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
    return new


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def shadow_copy(model: nn.Module) -> nn.Module:
    """Return a hook-free copy of ``model`` whose parameters share the caller's storage.

    Half-precision (float16/bfloat16) parameters and buffers get float32 copies instead (the
    curvature computations need the precision; :meth:`ShadowNetwork.sync` refreshes them),
    and modules that work in place (``ReLU(inplace=True)`` and the like) work out of place
    in the copy, which BackPACK's hooks and ``torch.func`` both need.

    Args:
        model: The caller's network.

    Returns:
        The shadow copy.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        if id(p) not in memo:
            data = p.detach()
            if data.dtype in _LOW_PRECISION:
                data = data.float()
            memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
    copy_root = _shadow(model, memo)
    for module in copy_root.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.dtype in _LOW_PRECISION:
                module._buffers[name] = buffer.float()
    return copy_root


def _is_plain_tree(model: nn.Module) -> bool:
    """Whether every module with children is an ``nn.Sequential`` (no custom forward)."""
    return all(isinstance(m, nn.Sequential) or not list(m.children()) for m in model.modules())


@dataclass
class PassResult:
    """What one forward/backward pass reports besides the per-layer factors.

    Attributes:
        loss: Value of the loss as the caller's loss module reduces it.
        batch_size: ``N``.
        measured: Names of layers whose factors were delivered.
    """

    loss: float
    batch_size: int
    measured: list[str]


class ShadowNetwork:
    """A shadow copy of the caller's network, shared by both backends.

    Keeps the layers, the correspondence between the caller's modules and the copy's,
    and re-synchronises buffers, train/eval modes and half-precision parameter copies
    before every pass.

    Args:
        model: The caller's network (left untouched).
        loss: Validated loss specification.
    """

    backend = "none"

    def __init__(self, model: nn.Module, loss: LossSpec):
        self.source = model
        self.loss = loss
        self.notes: list[str] = []
        self.layers = find_layers(model)
        self._source_params = [p for p in model.parameters()]
        devices = sorted({str(p.device) for p in self._source_params})
        if len(devices) > 1:
            raise NotImplementedError(
                f"The network's parameters are on several devices ({', '.join(devices)}). "
                "Model-parallel networks are not supported: measure a sub-network that lives "
                "on one device (FisherMonitor(network=...))."
            )
        copy_root = shadow_copy(model)
        self._copy_root = copy_root
        self._copy_modules = dict(
            zip(
                [m for _, m in model.named_modules()],
                [m for _, m in copy_root.named_modules()],
                strict=True,
            )
        )
        self._copy_params = [p for p in copy_root.parameters()]
        self._copy_buffers = [b for b in copy_root.buffers()]
        self._low_precision = [
            (source, target)
            for source, target in zip(self._source_params, self._copy_params, strict=True)
            if source.dtype in _LOW_PRECISION
        ]
        if self._low_precision:
            kinds = sorted({str(p.dtype).replace("torch.", "") for p, _ in self._low_precision})
            self.notes.append(f"parameters in {', '.join(kinds)} measured through float32 copies")
        self._layer_of_copy_param = {}
        for info, module in self.layers:
            for p in self._copy_modules[module].parameters(recurse=False):
                if p.requires_grad:
                    self._layer_of_copy_param[id(p)] = info
        self._batchnorm_in_eval: list[str] = []

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

    def sync(self) -> None:
        """Copy buffers, half-precision parameters and train/eval modes from the caller's model.

        ``BatchNorm`` layers in train mode are measured in eval mode (their running
        statistics), since per-sample gradients through batch statistics are not defined;
        :attr:`batchnorm_in_eval` lists them.
        """
        with torch.no_grad():
            for source, target in self._low_precision:
                target.copy_(source.detach())
        for source, target in zip(self.source.buffers(), self._copy_buffers, strict=True):
            target.copy_(source.detach())
        for source, target in self._copy_modules.items():
            target.training = source.training
        self._batchnorm_in_eval = []
        for name, module in self.source.named_modules():
            if isinstance(module, _BATCHNORM_TYPES) and module.training:
                self._copy_modules[module].training = False
                self._batchnorm_in_eval.append(name)

    @property
    def batchnorm_in_eval(self) -> list[str]:
        """BatchNorm layers in train mode that the last pass measured in eval mode."""
        return list(self._batchnorm_in_eval)

    def close(self) -> None:
        """Release what the backend attached to the copy."""


class PreparedNetwork(ShadowNetwork):
    """A BackPACK-extended shadow copy of the caller's network, ready for repeated passes.

    Args:
        model: The caller's network (left untouched).
        loss: Validated loss specification.
        use_converter: ``"auto"`` converts with BackPACK's graph converter when the network
            is not a plain tree of ``nn.Sequential`` containers; ``True``/``False`` force it.

    Raises:
        NotImplementedError: If the network holds a module BackPACK cannot handle; the
            message names the module and lists what is supported.
    """

    backend = "backpack"

    def __init__(self, model: nn.Module, loss: LossSpec, use_converter: bool | str = "auto"):
        super().__init__(model, loss)
        copy_root = self._copy_root
        names_of_copy = {id(m): (n or "(root)") for n, m in copy_root.named_modules()}
        reparametrised = [
            f"{names_of_copy[id(m)]!r} ({type(m).__name__})"
            for m in copy_root.modules()
            if _weight_recomputing_hooks(m)
            or (hasattr(m, "parametrizations") and len(m.parametrizations) > 0)
        ]
        if reparametrised:
            raise NotImplementedError(
                "fisher-monitor's BackPACK backend cannot handle reparametrised weights "
                f"(pruning, weight or spectral normalisation, parametrizations) in "
                f"{', '.join(reparametrised)}: BackPACK sees the computed weight, not the "
                "parameters the optimizer trains. The torch.func backend measures them."
            )
        convert = not _is_plain_tree(model) if use_converter == "auto" else bool(use_converter)
        handles_before = len(CTX.hook_handles)
        if convert:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    network = convert_module_to_backpack(copy_root, False)
                except Exception as error:  # noqa: BLE001 - torch.fx raises many kinds
                    first_line = str(error).strip().splitlines()[0] if str(error) else ""
                    raise NotImplementedError(
                        f"fisher-monitor's BackPACK backend cannot trace the forward pass of "
                        f"{type(model).__name__} with torch.fx ({type(error).__name__}: "
                        f"{first_line[:200]}). Measure a sub-network whose forward is traceable "
                        "(e.g. FisherMonitor(network='net')), or write data-dependent control "
                        "flow as modules."
                    ) from error
            for warning in caught:
                message = str(warning.message)
                if "may break second-order extensions" in message:
                    operation = message.split("op=")[-1].split(". If you")[0]
                    raise NotImplementedError(
                        f"fisher-monitor's BackPACK backend cannot follow the forward pass of "
                        f"{type(model).__name__}: it contains an operation that is not a module "
                        f"({operation}). BackPACK needs every operation between parametrised "
                        "layers to be a supported module: replace the call by its module (e.g. "
                        "`F.relu` by `nn.ReLU`), or measure a sub-network."
                    )
            self.notes.append("network converted with BackPACK's graph converter")
        else:
            network = copy_root
        self._check_supported(network, names_of_copy)
        self.network = extend(network)
        self.loss_module = extend(loss.make_module())
        self._handles = CTX.hook_handles[handles_before:]
        self._layer_modules = self._map_layer_modules(network)

    def _check_supported(self, network: nn.Module, names_of_copy: dict[int, str]) -> None:
        supported = FactorCapture(exact=True).supported_modules
        offending = []
        for name, module in network.named_modules():
            if list(module.children()) or isinstance(module, nn.Sequential):
                continue
            if isinstance(module, supported) and type(module) in supported:
                continue
            if type(module).__name__ in ("Identity",):
                continue
            offending.append(f"{names_of_copy.get(id(module), name)!r} ({type(module).__name__})")
        if offending:
            allowed = sorted(
                {
                    cls.__name__
                    for cls in supported
                    if cls.__module__.startswith("torch.nn.modules")
                    and not cls.__module__.endswith(".loss")
                }
            )
            raise NotImplementedError(
                "fisher-monitor's BackPACK backend cannot handle module(s) "
                f"{', '.join(offending)}. Supported module types: {', '.join(allowed)}."
            )

    def _map_layer_modules(self, network: nn.Module) -> dict[int, LayerInfo]:
        """Map modules of the (possibly converted) network to the caller's layers."""
        mapping: dict[int, LayerInfo] = {}
        seen: dict[str, int] = {}
        for module in network.modules():
            infos = {
                self._layer_of_copy_param[id(p)].name: self._layer_of_copy_param[id(p)]
                for p in module.parameters(recurse=False)
                if id(p) in self._layer_of_copy_param
            }
            if not infos:
                continue
            if len(infos) > 1:
                raise NotImplementedError(
                    f"Parameters of layers {sorted(infos)} ended up in one module after "
                    "conversion; fisher-monitor cannot measure them separately."
                )
            (info,) = infos.values()
            if info.name in seen:
                raise NotImplementedError(
                    f"Layer {info.name!r} is applied more than once in the forward pass "
                    "(weight sharing across calls). Its per-sample gradients sum over the calls, "
                    "which the BackPACK backend does not support."
                )
            seen[info.name] = id(module)
            mapping[id(module)] = info
        return mapping

    def run(
        self,
        inputs,
        targets: Tensor,
        exact: bool,
        mc_samples: int,
        seed: int,
        on_layer: Callable[[LayerInfo, LayerFactors], None],
        dtype: torch.dtype = torch.float64,
    ) -> PassResult:
        """One forward and backward pass; ``on_layer`` receives each layer's factors.

        Layers are delivered during the backward pass, output layer first, and their
        BackPACK quantities are freed right after ``on_layer`` returns, so peak memory is
        one layer's factors.

        Args:
            inputs: Input batch (tensor, or tuple/list of tensors passed as arguments).
            targets: Targets for the loss.
            exact: Exact Fisher, or ``mc_samples`` sampled labels per sample.
            mc_samples: Number of sampled labels per sample for the MC Fisher.
            seed: Seed of the generator used for label sampling and dropout (the global
                RNG state is restored afterwards).
            on_layer: Called with each layer's info and factors.
            dtype: Floating-point type for the factors handed to ``on_layer``.

        Returns:
            Loss value, batch size and the measured layers.
        """
        extension = FactorCapture(exact=exact, mc_samples=mc_samples)
        measured: list[str] = []
        batch_size = targets.shape[0]
        coefficients = None  # β of U = VB, computed lazily (exact Fisher only)

        def hook(module: nn.Module) -> None:
            info = self._layer_modules.get(id(module))
            if info is None:
                return
            factors = self._capture_factors(module, batch_size, dtype)
            factors.sqrt_coefficients = coefficients
            measured.append(info.name)
            on_layer(info, factors)

        args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        try:
            with forked_rng(self.device, seed), warnings.catch_warnings(), full_precision(self):
                warnings.filterwarnings("ignore", message=_BACKWARD_HOOK_WARNING)
                with torch.enable_grad():
                    outputs = self.network(*args)
                    check_outputs(outputs)
                    self.loss.check_batch(outputs, targets)
                    loss = self.loss_module(outputs, targets)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"The probe loss is {loss.item()!r}; skipping the measurement."
                        )
                    if exact:
                        coefficients = lazy(self.loss.sqrt_coefficients, outputs.detach(), targets)
                    with backpack(extension, extension_hook=hook):
                        loss.backward()
        finally:
            for module in self.network.modules():
                memory_cleanup(module)
            clear_captures(self.network)
            for p in self._copy_params:
                p.grad = None
        return PassResult(loss=float(loss.detach()), batch_size=batch_size, measured=measured)

    def _capture_factors(
        self, module: nn.Module, batch_size: int, dtype: torch.dtype
    ) -> LayerFactors:
        scale_u = self.loss.per_sample_scale(batch_size)
        scale_v = self.loss.sqrt_scale(batch_size)
        structured: StructuredCapture | None = pop_structured(module)
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if structured is not None:
            for p in params:
                pop_materialized(p)
            captured = detach_capture(structured)
            has_weight = any(p is getattr(module, "weight", None) for p in params)
            has_bias = any(p is getattr(module, "bias", None) for p in params)
            inputs = augment(captured.inputs, has_weight, has_bias)
            weight_columns = captured.inputs.shape[-1] if has_weight else 0
            output_grads = captured.output_grads * scale_u
            sqrt = captured.sqrt * scale_v
            if captured.positions:
                return WeightSharingFactors(
                    inputs, output_grads, sqrt, weight_columns, has_bias, dtype
                )
            return OuterProductFactors(
                inputs[:, 0], output_grads[:, 0], sqrt[:, :, 0], weight_columns, has_bias, dtype
            )
        per_sample, sqrt = [], []
        for p in params:
            capture: MaterializedCapture | None = pop_materialized(p)
            if capture is None:
                raise RuntimeError(f"BackPACK delivered no factors for a {type(module).__name__}.")
            per_sample.append(capture.per_sample.flatten(start_dim=1) * scale_u)
            sqrt.append(capture.sqrt.flatten(start_dim=2) * scale_v)
        return MaterializedFactors(
            torch.cat(per_sample, dim=1), torch.cat(sqrt, dim=2).flatten(end_dim=1), dtype
        )

    def close(self) -> None:
        """Remove BackPACK's hooks from the shadow copy."""
        for handle in self._handles:
            handle.remove()
        remaining = set(map(id, self._handles))
        CTX.hook_handles = [h for h in CTX.hook_handles if id(h) not in remaining]
        self._handles = []


def check_outputs(outputs) -> None:
    """Raise a clear error unless the network returned one tensor (the loss input)."""
    if not isinstance(outputs, Tensor):
        raise TypeError(
            "The measured network must return one tensor, the input of the loss, got a "
            f"{type(outputs).__name__}. Measure the sub-network that produces the logits "
            "(FisherMonitor(network='...') or measure(model.net, ...))."
        )


def lazy(function: Callable, *args) -> Callable[[], object]:
    """A zero-argument function that calls ``function(*args)`` once, when first needed."""
    cache: list = []

    def value():
        if not cache:
            cache.append(function(*args))
        return cache[0]

    return value


@contextmanager
def full_precision(network: ShadowNetwork) -> Iterator[None]:
    """Disable autocast for a pass (mixed precision would round the curvature) and say so."""
    device_type = network.device.type
    if torch.is_autocast_enabled(device_type):
        note = "autocast (mixed precision) was active: measured in full precision"
        if note not in network.notes:
            network.notes.append(note)
    with torch.autocast(device_type=device_type, enabled=False):
        yield


@contextmanager
def forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run with the global RNG (CPU and the network's CUDA device) seeded, then restore it."""
    cuda = device.type == "cuda"
    index = (
        (device.index if device.index is not None else torch.cuda.current_device()) if cuda else 0
    )
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def seed_from(generator: torch.Generator | None) -> int:
    """Draw a seed from ``generator``, or from the OS when there is none.

    The global RNG is never consumed.
    """
    if generator is None:
        return int.from_bytes(os.urandom(7), "little")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


__all__ = [
    "LayerInfo",
    "check_outputs",
    "is_lazy",
    "lazy",
    "PassResult",
    "PreparedNetwork",
    "ShadowNetwork",
    "find_layers",
    "forked_rng",
    "full_precision",
    "seed_from",
    "shadow_copy",
]

"""The BackPACK backend: one backward pass with :class:`FactorCapture` per measurement.

Networks that are not plain ``nn.Sequential`` trees go through BackPACK's graph converter
(``torch.fx``): residual additions become ``SumModule`` s, ``torch.flatten`` calls
``Flatten`` modules, in-place activations out-of-place ones. Modules BackPACK supports
(with adaptive average pooling added, see :mod:`~fisher_monitor.backends.backpack.pooling`) are
handled by BackPACK; any other single-input module (``LayerNorm``, ``GELU``, ``GroupNorm``,
…) is pulled back by ``torch.func`` inside the same pass, so only that module leaves the
structured path (a hybrid; the notes name those modules). A network that cannot be
converted (an operation that is not a module, e.g. ``F.gelu`` or a product of two
tensors, or a multi-input module such as attention) is measured with ``torch.func`` as a
whole: BackPACK's backward pass runs module by module, and an operation outside a module
has no place to receive the columns.
"""

from __future__ import annotations

import warnings

import torch
from backpack import backpack, extend, memory_cleanup
from backpack.context import CTX
from backpack.custom_module.graph_utils import convert_module_to_backpack
from torch import Tensor, nn

from fisher_monitor.backends.backpack.captures import (
    MaterializedCapture,
    StructuredCapture,
    detach_capture,
    pop_materialized,
    pop_structured,
)
from fisher_monitor.backends.backpack.extension import (
    FactorCapture,
    clear_captures,
    supports_structured,
)
from fisher_monitor.backends.backpack.pullbacks import attach_twin, takes_one_input
from fisher_monitor.backends.base import Backend, LayerCallback, UnsupportedNetworkError
from fisher_monitor.backends.model_copy import weight_recomputing_hooks
from fisher_monitor.backends.pass_context import (
    OutputAdapter,
    PassResult,
    check_loss,
    check_outputs,
    forked_rng,
    full_precision,
    select_logits,
)
from fisher_monitor.batching import ModelInputs, model_inputs
from fisher_monitor.factors import (
    ColumnSplit,
    LayerFactors,
    MaterializedFactors,
    OuterProductFactors,
    WeightSharingFactors,
    augment,
)
from fisher_monitor.layers import LayerInfo, is_parametrized, layer_parameters
from fisher_monitor.likelihoods import Likelihood, loss_side
from fisher_monitor.likelihoods.base import SATURATED_NOTE

#: PyTorch ≥ 2.13 warns about full backward hooks on modules whose inputs need no grad;
#: BackPACK relies on exactly that case, so the warning is silenced around our passes only.
_BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed"
_FIX_SUBNETWORK = (
    "Measure a sub-network BackPACK supports (FisherMonitor(network='...')), or use "
    "backend='functorch' (backend='auto' does so by itself)."
)


#: Modules that draw random numbers in train mode (a torch.func pull-back would redraw them)
#: or take several inputs under a one-input signature: never pulled back by torch.func.
_NOT_TORCH_FUNC = (nn.modules.dropout._DropoutNd, nn.RReLU, nn.RNNBase)


def _is_plain_tree(model: nn.Module) -> bool:
    """Whether every module with children is an ``nn.Sequential`` (no custom forward)."""
    return all(isinstance(m, nn.Sequential) or not list(m.children()) for m in model.modules())


class BackpackNetwork(Backend):
    """A BackPACK-extended shadow copy of the caller's network, ready for repeated passes.

    Args:
        model: The caller's network (left untouched).
        likelihood: The likelihood of the loss.
        use_converter: ``"auto"`` converts with BackPACK's graph converter when the network
            is not a plain tree of ``nn.Sequential`` containers; ``True``/``False`` force it.

    Raises:
        UnsupportedNetworkError: If the network holds a module BackPACK cannot handle; the
            error lists the modules and what is supported.
    """

    backend = "backpack"

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood,
        outputs: OutputAdapter | None = None,
        use_converter: bool | str = "auto",
    ):
        super().__init__(model, likelihood, outputs)
        copy_root = self.copy_root
        names_of_copy = {id(m): (n or "(root)") for n, m in copy_root.named_modules()}
        self._check_reparametrised(names_of_copy)
        self._check_untied()
        convert = not _is_plain_tree(copy_root) if use_converter == "auto" else bool(use_converter)
        handles_before = len(CTX.hook_handles)
        network = self._convert(copy_root, type(model).__name__) if convert else copy_root
        self._torch_func_types = self._check_supported(network, names_of_copy)
        self.network = extend(network)
        self.loss_module = extend(likelihood.make_module())
        self._handles = CTX.hook_handles[handles_before:]
        self._layer_modules = self._map_layer_modules(network)

    def _check_reparametrised(self, names_of_copy: dict[int, str]) -> None:
        reparametrised = [
            f"{names_of_copy[id(m)]!r} ({type(m).__name__})"
            for m in self.copy_root.modules()
            if weight_recomputing_hooks(m) or is_parametrized(m)
        ]
        if reparametrised:
            raise UnsupportedNetworkError(
                "backpack",
                "cannot handle reparametrised weights (pruning, weight or spectral "
                f"normalisation, parametrizations) in {', '.join(reparametrised)}",
                reparametrised,
                "BackPACK sees the computed weight, not the parameters the optimizer trains; "
                "the torch.func backend measures them.",
            )

    def _check_untied(self) -> None:
        tied = [f"{info.name!r} (with {', '.join(info.shared_with)})" for info, _ in self.layers]
        tied = [
            label for (info, _), label in zip(self.layers, tied, strict=True) if info.shared_with
        ]
        if tied:
            raise UnsupportedNetworkError(
                "backpack",
                f"cannot measure tied weights: {', '.join(tied)}",
                [],
                "Their per-sample gradients sum over the modules using them; backend='auto' "
                "measures them with plain autograd.",
            )

    def _convert(self, copy_root: nn.Module, name: str) -> nn.Module:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                network = convert_module_to_backpack(copy_root, False)
            except Exception as error:  # noqa: BLE001 - torch.fx raises many kinds
                first_line = str(error).strip().splitlines()[0] if str(error) else ""
                raise UnsupportedNetworkError(
                    "backpack",
                    f"cannot trace the forward pass of {name} with torch.fx "
                    f"({type(error).__name__}: {first_line[:200]})",
                    [],
                    "Measure a sub-network whose forward is traceable (e.g. "
                    "FisherMonitor(network='net')), or write data-dependent control flow as "
                    "modules.",
                ) from error
        for warning in caught:
            message = str(warning.message)
            if "may break second-order extensions" in message:
                operation = message.split("op=")[-1].split(". If you")[0]
                raise UnsupportedNetworkError(
                    "backpack",
                    f"cannot follow the forward pass of {name}: it contains an operation that "
                    f"is not a module ({operation})",
                    [],
                    "BackPACK needs every operation between parametrised layers to be a "
                    "supported module: replace the call by its module (e.g. `F.relu` by "
                    "`nn.ReLU`), or measure a sub-network.",
                )
        self.preparation_notes.append("network converted with BackPACK's graph converter")
        return network

    def _check_supported(
        self, network: nn.Module, names_of_copy: dict[int, str]
    ) -> dict[type[nn.Module], list[str]]:
        """Check every module; prepare the ones BackPACK lacks for ``torch.func`` pull-backs.

        Returns:
            The module types to pull back with ``torch.func``, with their parameter names.

        Raises:
            UnsupportedNetworkError: For a module neither BackPACK nor a one-module
                ``torch.func`` pull-back can handle.
        """
        supported = FactorCapture().supported_modules
        offending, hybrid = [], []
        torch_func_types: dict[type[nn.Module], list[str]] = {}
        for name, module in network.named_modules():
            if list(module.children()) or isinstance(module, nn.Sequential):
                continue
            if isinstance(module, supported) and type(module) in supported:
                continue
            label = f"{names_of_copy.get(id(module), name)!r} ({type(module).__name__})"
            if isinstance(module, _NOT_TORCH_FUNC) or not takes_one_input(module):
                offending.append(label)
                continue
            hybrid.append(label)
            parameters = torch_func_types.setdefault(type(module), [])
            for key, parameter in module._parameters.items():
                if parameter is not None and key not in parameters:
                    parameters.append(key)
            attach_twin(module)
        if offending:
            allowed = sorted(
                {
                    cls.__name__
                    for cls in supported
                    if cls.__module__.startswith("torch.nn.modules")
                    and not cls.__module__.endswith(".loss")
                }
            )
            raise UnsupportedNetworkError(
                "backpack",
                f"cannot handle module(s) {', '.join(offending)}",
                offending,
                f"Supported module types: {', '.join(allowed)}, and any module with one "
                "input and one output that draws no random numbers (pulled back by "
                "torch.func within the BackPACK pass).",
            )
        if hybrid:
            self.preparation_notes.append(
                "pulled back with torch.func within the BackPACK pass (no BackPACK "
                f"extension for them): {', '.join(hybrid)}"
            )
        return torch_func_types

    def _map_layer_modules(self, network: nn.Module) -> dict[int, LayerInfo]:
        """Map modules of the (possibly converted) network to the caller's layers."""
        mapping: dict[int, LayerInfo] = {}
        seen: dict[str, int] = {}
        for module in network.modules():
            infos = {
                self.layer_of_copy_param[id(p)].name: self.layer_of_copy_param[id(p)]
                for p in module.parameters(recurse=False)
                if id(p) in self.layer_of_copy_param
            }
            if not infos:
                continue
            if len(infos) > 1:
                raise UnsupportedNetworkError(
                    "backpack",
                    f"found the parameters of layers {sorted(infos)} in one module after "
                    "conversion",
                    [],
                    "Measure them with backend='functorch'.",
                )
            (info,) = infos.values()
            if info.name in seen:
                raise UnsupportedNetworkError(
                    "backpack",
                    f"cannot measure layer {info.name!r}, whose parameters are used by several "
                    "modules or calls (tied weights, weight sharing across calls)",
                    [],
                    "Its per-sample gradients sum over the uses; backend='auto' measures them "
                    "with plain autograd.",
                )
            seen[info.name] = id(module)
            mapping[id(module)] = info
        return mapping

    def run(  # noqa: D102 - see Backend.run
        self,
        inputs,
        targets: Tensor,
        exact: bool,
        mc_samples: int,
        seed: int,
        on_layer: LayerCallback,
        dtype: torch.dtype = torch.float64,
        likelihood: Likelihood | None = None,
    ) -> PassResult:
        likelihood = self.likelihood if likelihood is None else likelihood
        inputs = model_inputs(inputs)
        extension = FactorCapture(self._torch_func_types)
        measured: list[str] = []
        notes: list[str] = []
        split: list[ColumnSplit] = []
        methods: dict[str, str] = {}

        def hook(module: nn.Module) -> None:
            info = self._layer_modules.get(id(module))
            if info is None:
                return
            factors = self._factors(module, split[0], dtype)
            methods[info.name] = (
                factors.method
                if type(module) not in self._torch_func_types
                else "per-sample pull-backs of its module (torch.func)"
            )
            measured.append(info.name)
            on_layer(info, factors)

        try:
            with (
                forked_rng(self.device, seed),
                warnings.catch_warnings(),
                full_precision(self.device, notes),
            ):
                warnings.filterwarnings("ignore", message=_BACKWARD_HOOK_WARNING)
                with torch.enable_grad():
                    outputs = self._loss_input(inputs)
                    likelihood.check_batch(outputs, targets)
                    loss = self.loss_module(outputs, targets)
                    check_loss(loss)
                    noise = None if exact else likelihood.draw_noise(outputs, mc_samples)
                    side = loss_side(likelihood, outputs, targets, exact, noise)
                    if exact and side.coefficients is None:
                        notes.append(SATURATED_NOTE)
                    split.append(ColumnSplit(side.fisher_columns, side.coefficients))
                    extension.loss_columns = side.for_backpack(outputs.dtype)
                    with backpack(extension, extension_hook=hook):
                        loss.backward()
        finally:
            for module in self.network.modules():
                memory_cleanup(module)
            clear_captures(self.network)
            for p in self._copy_params:
                p.grad = None
        batch_size = targets.shape[0]
        return PassResult(float(loss.detach()), batch_size, measured, notes, methods)

    def _loss_input(self, inputs: ModelInputs) -> Tensor:
        """The network's output, which BackPACK's backward pass must start from unchanged.

        Raises:
            UnsupportedNetworkError: If the loss's input is not the network's output tensor
                (a ``ModelOutput``, a slice of it): BackPACK cannot follow the selection, and
                ``backend="auto"`` measures with the next backend.
        """
        raw = self.network(*inputs.args, **inputs.kwargs)
        selected = (self.outputs or select_logits)(raw)
        check_outputs(selected, raw)
        if selected is not raw:
            raise UnsupportedNetworkError(
                "backpack",
                f"cannot follow the loss's input out of the network's output (a "
                f"{type(raw).__name__}): BackPACK's backward pass starts from the network's "
                "output tensor itself",
                [],
                "backend='auto' measures such networks with another backend.",
            )
        return selected

    def _factors(self, module: nn.Module, split: ColumnSplit, dtype: torch.dtype) -> LayerFactors:
        structured: StructuredCapture | None = pop_structured(module)
        params = [p for p in layer_parameters(module)]
        if structured is not None:
            for p in params:
                pop_materialized(p)
            captured = detach_capture(structured)
            has_weight = any(p is getattr(module, "weight", None) for p in params)
            has_bias = any(p is getattr(module, "bias", None) for p in params)
            inputs = augment(captured.inputs, has_weight, has_bias)
            weight_columns = captured.inputs.shape[-1] if has_weight else 0
            sqrt = split.fisher(captured.columns)
            output_grads = split.per_sample(captured.columns)
            if captured.positions:
                factors: LayerFactors = WeightSharingFactors(
                    inputs, output_grads, sqrt, weight_columns, has_bias, dtype
                )
            else:
                factors = OuterProductFactors(
                    inputs[:, 0], output_grads[:, 0], sqrt[:, :, 0], weight_columns, has_bias, dtype
                )
        else:
            per_sample, sqrt = [], []
            for p in params:
                capture: MaterializedCapture | None = pop_materialized(p)
                if capture is None:
                    raise RuntimeError(
                        f"BackPACK delivered no factors for a {type(module).__name__}."
                    )
                columns = capture.columns.reshape(*capture.columns.shape[:2], -1)  # 0-d too
                per_sample.append(split.per_sample(columns))
                sqrt.append(split.fisher(columns))
            factors = MaterializedFactors(
                torch.cat(per_sample, dim=1), torch.cat(sqrt, dim=2).flatten(end_dim=1), dtype
            )
        factors.coefficients = split.coefficients
        return factors

    def factor_form(self, module: nn.Module, output: object) -> str:  # noqa: D102
        if not (supports_structured(module) and isinstance(output, Tensor)):
            return "materialised"
        if isinstance(module, nn.Linear) and output.dim() == 2:
            return "outer"
        return "shared"

    def close(self) -> None:
        """Remove BackPACK's hooks from the shadow copy."""
        for handle in self._handles:
            handle.remove()
        remaining = set(map(id, self._handles))
        CTX.hook_handles = [h for h in CTX.hook_handles if id(h) not in remaining]
        self._handles = []


__all__ = ["BackpackNetwork"]

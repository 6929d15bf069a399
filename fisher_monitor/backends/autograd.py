"""The autograd backend: module hooks and batched backward passes, no trace of the network.

BackPACK needs to follow the whole network module by module; a forward written with
functional code between the layers (``torch.relu``, ``x.flatten(1)``, slicing, attention
with ``F.scaled_dot_product_attention``, a Hugging Face ``ModelOutput``) defeats its graph
converter. This backend needs only plain autograd:

1. one forward pass of the shadow copy, with a forward hook on every module that holds a
   measured parameter recording each call's arguments and outputs;
2. the loss side's columns (:mod:`fisher_monitor.likelihoods`: the exact Fisher's square
   root, sampled labels or a sketch, ``(R, N, *output)``) backpropagated to every recorded
   output at once, ``torch.autograd.grad(..., is_grads_batched=True)`` (column by column
   where an operation has no batching rule). Samples do not interact (BatchNorm is
   measured in eval mode), so a layer output's row ``n`` receives sample ``n``'s columns;
3. per layer, the factors from what its module recorded: ``Linear``, ungrouped
   convolutions and Hugging Face's ``Conv1D`` get the compact outer-product and
   weight-sharing factors of :mod:`fisher_monitor.backends.structured` (with their
   Kronecker structure), any other module its parameters' per-sample pull-backs by
   ``torch.func`` (:mod:`~fisher_monitor.backends.module_pullback`);
4. a check: each layer's mean gradient from its factors must equal autograd's gradient.
   Where it does not — a parameter also used outside its module, such as a weight passed
   to ``F.linear`` or a class token added in the parent's ``forward`` — the layer is pulled
   back through the whole network with ``torch.func`` instead, and the notes say so.

A parameter held by several modules (tied weights) sums the pull-backs of every use.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fisher_monitor.backends.base import (
    BACKPROP_COPIES,
    Backend,
    LayerCallback,
    UnsupportedNetworkError,
)
from fisher_monitor.backends.module_pullback import flat_tensors, parameter_pullbacks
from fisher_monitor.backends.normalization import normalization_pullbacks
from fisher_monitor.backends.pass_context import (
    OutputAdapter,
    PassResult,
    call_network,
    check_loss,
    forked_rng,
    full_precision,
    select_logits,
)
from fisher_monitor.backends.structured import (
    has_compact_factors,
    has_structured_rule,
    structured_factors,
    structured_pullbacks,
)
from fisher_monitor.batching import ModelInputs, map_tensors, model_inputs
from fisher_monitor.factors import ColumnSplit, LayerFactors, MaterializedFactors, PassSize
from fisher_monitor.layers import LayerInfo
from fisher_monitor.likelihoods import Likelihood, loss_side
from fisher_monitor.likelihoods.base import SATURATED_NOTE

#: How far a layer's mean gradient from its factors may be from autograd's, relative to
#: ``‖g‖ + √tr EF``, before the layer counts as used outside its module (rounding is
#: ~1e-7 in float32).
GRADIENT_CHECK_TOLERANCE = 1e-4


@dataclass
class Call:
    """One call of a hooked module: its arguments and the outputs the columns reach.

    Attributes:
        module: The module.
        arguments: Its arguments (tensors detached).
        outputs: The output tensors that require gradients, as autograd knows them.
        positions: Their indices among the flattened output's tensors.
    """

    module: nn.Module
    arguments: ModelInputs
    outputs: list[Tensor]
    positions: list[int]
    pullbacks: dict[str, Tensor] | None = None

    def per_sample(self, batch: int) -> bool:
        """Whether every output has the batch dimension (not shared by all samples)."""
        return bool(self.outputs) and all(t.dim() > 0 and t.shape[0] == batch for t in self.outputs)

    def select(self, raw: object) -> list[Tensor]:
        """The same outputs of a re-run of the module (for its ``torch.func`` pull-back)."""
        tensors = flat_tensors(raw)
        return [tensors[i] for i in self.positions]


class AutogradNetwork(Backend):
    """A shadow copy measured with module hooks and batched autograd (module docstring).

    Args:
        model: The caller's network (left untouched).
        likelihood: The likelihood of the loss.
        outputs: The loss's input from the network's raw output.
    """

    backend = "autograd"

    def __init__(
        self, model: nn.Module, likelihood: Likelihood, outputs: OutputAdapter | None = None
    ):
        super().__init__(model, likelihood, outputs)
        self.network = self.copy_root
        self.loss_module = likelihood.make_module()
        self._recording: dict[int, list[Call]] | None = None
        self._holders = self._find_holders()
        self._handles = [
            module.register_forward_hook(self._record, with_kwargs=True)
            for module in {id(m): m for m, _ in self._holders.values()}.values()
        ]

    def _find_holders(self) -> dict[str, tuple[nn.Module, str]]:
        """The modules of the copy holding a measured parameter.

        Also fills ``_uses``: per qualified parameter name, its holders as
        ``(module, local name)`` pairs (several for tied weights).

        Returns:
            ``"{id(module)}:{local name}"`` → ``(module, qualified parameter name)``.
        """
        names = {id(p): n for n, p in self.copy_root.named_parameters()}
        self._names = names
        measured = {id(p) for p in self.copy_root.parameters() if id(p) in self.layer_of_copy_param}
        holders: dict[str, tuple[nn.Module, str]] = {}
        self._uses: dict[str, list[tuple[nn.Module, str]]] = defaultdict(list)
        for module in self.copy_root.modules():
            for local, parameter in module._parameters.items():
                if parameter is None or id(parameter) not in measured:
                    continue
                qualified = names[id(parameter)]
                holders[f"{id(module)}:{local}"] = (module, qualified)
                self._uses[qualified].append((module, local))
        if not holders:
            raise UnsupportedNetworkError("autograd", "found no module holding a parameter")
        return holders

    def _record(self, module: nn.Module, args, kwargs, output):
        """Forward hook: keep the call's arguments; hand on copies of its outputs.

        The returned copies keep later in-place operations from touching the tensors the
        columns are backpropagated to.
        """
        if self._recording is None:
            return None
        leaves, spec = tree_flatten(output)
        positions, kept = [], []
        tensor_index = 0
        for index, leaf in enumerate(leaves):
            if not isinstance(leaf, Tensor):
                continue
            if leaf.requires_grad and leaf.is_floating_point():
                positions.append(tensor_index)
                kept.append(leaf)
                leaves[index] = leaf.clone()
            tensor_index += 1
        arguments = map_tensors(ModelInputs(tuple(args), dict(kwargs)), lambda t: t.detach())
        self._recording.setdefault(id(module), []).append(Call(module, arguments, kept, positions))
        return tree_unflatten(leaves, spec)

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
        notes: list[str] = []
        self._recording = {}
        try:
            with forked_rng(self.device, seed), full_precision(self.device, notes):
                with torch.enable_grad():
                    outputs = call_network(self.network, inputs, self.outputs)
                    calls, self._recording = self._recording, None
                    likelihood.check_batch(outputs, targets)
                    loss = self.loss_module(outputs, targets)
                    check_loss(loss)
                    noise = None if exact else likelihood.draw_noise(outputs, mc_samples)
                    side = loss_side(likelihood, outputs, targets, exact, noise)
                    if exact and side.coefficients is None:
                        notes.append(SATURATED_NOTE)
                    columns = side.for_backpack(outputs.dtype)
                    pass_ = _Pass(self, inputs, outputs, columns, calls, likelihood, targets, dtype)
                    pass_.backpropagate()
                    split = ColumnSplit(side.fisher_columns, side.coefficients)
                    measured = pass_.deliver(split, on_layer, notes)
        finally:
            self._recording = None
            for p in self._copy_params:
                p.grad = None
        return PassResult(float(loss.detach()), targets.shape[0], measured, notes, pass_.methods)

    def pass_bytes(
        self, size: PassSize, activations: int, largest_activation: int, dimension: int
    ) -> int:
        """The columns at every recorded output at once, and their backward pass."""
        n, rn, s = size.samples, size.pass_columns, size.itemsize
        return rn * n * (activations + BACKPROP_COPIES * largest_activation) * s

    def factor_form(self, module: nn.Module, output: object) -> str:  # noqa: D102
        shared = any(
            len(self._uses[qualified]) > 1
            for local, p in module._parameters.items()
            if p is not None and (qualified := self._name_of(p)) is not None
        )
        if shared or not has_compact_factors(module) or not isinstance(output, Tensor):
            return "materialised"
        if isinstance(module, nn.Linear) and output.dim() == 2:
            return "outer"
        return "shared"

    def _name_of(self, parameter: Tensor) -> str | None:
        name = self._names.get(id(parameter))
        return name if name in self._uses else None

    def close(self) -> None:
        """Remove the forward hooks from the shadow copy."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Pass:
    """One measurement's backward passes and per-layer factors (see the module docstring)."""

    def __init__(self, network, inputs, outputs, columns, calls, likelihood, targets, dtype):
        self.network: AutogradNetwork = network
        self.inputs: ModelInputs = inputs
        self.outputs: Tensor = outputs
        self.columns: Tensor = columns
        self.calls: dict[int, list[Call]] = calls
        self.likelihood = likelihood
        self.targets = targets
        self.dtype = dtype
        self.batch = targets.shape[0]
        self.methods: dict[str, str] = {}
        self.grads: dict[int, Tensor | None] = {}  # id of a recorded output → its columns
        self.gradient: dict[str, Tensor | None] = {}  # parameter name → autograd's mean

    def backpropagate(self) -> None:
        """The columns at every recorded output, and autograd's mean gradient per parameter."""
        recorded = [t for calls in self.calls.values() for call in calls for t in call.outputs]
        if recorded:
            for tensor, grad in zip(recorded, self._batched_grad(recorded), strict=True):
                self.grads[id(tensor)] = grad
        names = list(self.network._uses)
        parameters = [self.network.copy_root.get_parameter(name) for name in names]
        residual = self.likelihood.residuals(self.outputs.detach().double(), self.targets)
        mean = (residual / self.batch).reshape(self.outputs.shape).to(self.outputs.dtype)
        found = torch.autograd.grad(
            self.outputs, parameters, mean, retain_graph=True, allow_unused=True
        )
        self.gradient = dict(zip(names, found, strict=True))

    def _batched_grad(self, recorded: list[Tensor]) -> list[Tensor | None]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # vmap's performance notes
                return list(
                    torch.autograd.grad(
                        self.outputs,
                        recorded,
                        self.columns,
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                )
        except RuntimeError as error:  # an operation without a batching rule: one by one
            if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error):
                raise
        per_column = [
            torch.autograd.grad(
                self.outputs, recorded, column, retain_graph=True, allow_unused=True
            )
            for column in self.columns
        ]
        return [
            None if parts[0] is None else torch.stack(parts)
            for parts in zip(*per_column, strict=True)
        ]

    def deliver(self, split: ColumnSplit, on_layer: LayerCallback, notes: list[str]) -> list[str]:
        """Build every layer's factors, output layer first, and hand them to ``on_layer``."""
        measured, through_network, pulled, tied = [], [], [], []
        for info, _ in reversed(self.network.layers):
            if all(self.gradient.get(name) is None for name in info.parameter_names):
                continue  # no gradient reaches this layer
            factors, how = self._layer(info, split)
            if how == "network":
                through_network.append(info.name)
                self.methods[info.name] = "pull-backs through the whole network (torch.func)"
            elif how == "module" and info.shared_with:
                tied.append(f"{info.name} (with {', '.join(info.shared_with)})")
                self.methods[info.name] = "per-sample pull-backs summed over its uses"
            elif how == "module":
                pulled.append(f"{info.name} ({info.module_type})")
                self.methods[info.name] = "per-sample pull-backs of its module"
            else:
                self.methods[info.name] = factors.method
            measured.append(info.name)
            on_layer(info, factors)
        if tied:
            notes.append(
                "tied weights, one layer each, per-sample gradients summed over every use "
                f"(exact, without Kronecker factors): {', '.join(tied)}"
            )
        if pulled:
            notes.append(
                "measured from per-sample pull-backs of their modules (torch.func, or closed "
                "forms for normalisations; exact, without Kronecker factors): "
                f"{', '.join(pulled)}"
            )
        if through_network:
            notes.append(
                "measured through the whole network with torch.func (a parameter is also "
                "used outside its module, e.g. through F.linear or added in the parent's "
                f"forward): {', '.join(through_network)}"
            )
        return measured

    def _layer(self, info: LayerInfo, split: ColumnSplit) -> tuple[LayerFactors, str]:
        """The layer's factors, and how they were formed (``structured``/``module``/…)."""
        structured = self._structured(info, split)
        if structured is not None and self._explains(info, structured):
            return structured, "structured"
        per_parameter = self._module_pullbacks(info) if structured is None else None
        if per_parameter is not None:
            factors = self._materialised(info, per_parameter, split)
            if self._explains(info, factors):
                return factors, "module"
        return self._materialised(info, self._network_pullbacks(info), split), "network"

    def _structured(self, info: LayerInfo, split: ColumnSplit) -> LayerFactors | None:
        """Compact factors when the layer is one module's parameters, called once."""
        uses = [self.network._uses[name] for name in info.parameter_names]
        modules = {id(module) for holders in uses for module, _ in holders}
        if len(modules) != 1 or any(len(holders) != 1 for holders in uses):
            return None
        module = uses[0][0][0]
        calls = self.calls.get(id(module), [])
        if not has_compact_factors(module) or len(calls) != 1 or len(calls[0].outputs) != 1:
            return None
        if not calls[0].per_sample(self.batch):
            return None
        grad = self.grads.get(id(calls[0].outputs[0]))
        if grad is None or not calls[0].arguments.args:
            return None
        trainable = [module._parameters[local] for holders in uses for _, local in holders]
        return structured_factors(
            module, calls[0].arguments.args[0], grad, split, trainable, self.dtype
        )

    def _module_pullbacks(self, info: LayerInfo) -> dict[str, Tensor] | None:
        """Per parameter, the per-sample pull-backs summed over every module call using it.

        ``None`` when a parameter of the layer is not used by any recorded call.
        """
        total: dict[str, Tensor] = {}
        for name in info.parameter_names:
            for module, local in self.network._uses[name]:
                for call in self.calls.get(id(module), []):
                    if not call.per_sample(self.batch):
                        return None  # e.g. a position embedding shared by every sample
                    found = self._call_pullbacks(call).get(local)
                    if found is not None:
                        total[name] = found if name not in total else total[name] + found
            if name not in total:
                return None
        return total

    def _call_pullbacks(self, call: Call) -> dict[str, Tensor]:
        """Pull-backs of one call, for every measured parameter its module holds (cached)."""
        if call.pullbacks is not None:
            return call.pullbacks
        columns = [self.grads.get(id(t)) for t in call.outputs]
        module = call.module
        local = {
            name: parameter
            for name, parameter in module._parameters.items()
            if parameter is not None and f"{id(module)}:{name}" in self.network._holders
        }
        if not columns or any(c is None for c in columns):
            found: dict[str, Tensor] = {}
        elif has_structured_rule(module) and len(columns) == 1 and call.arguments.args:
            found = structured_pullbacks(module, call.arguments.args[0], columns[0])
            found = {name: value for name, value in found.items() if name in local}
        else:
            found = self._closed_form(call, columns) or parameter_pullbacks(
                module,
                call.arguments,
                {name: p.detach() for name, p in local.items()},
                columns,
                self.batch,
                call.select,
            )
        call.pullbacks = found
        return found

    @staticmethod
    def _closed_form(call: Call, columns: list[Tensor]) -> dict[str, Tensor] | None:
        """A normalisation's pull-backs in closed form (``None`` for other modules)."""
        if len(columns) != 1 or len(call.arguments.args) != 1 or call.arguments.kwargs:
            return None
        (x,) = call.arguments.args
        if not isinstance(x, Tensor):
            return None
        return normalization_pullbacks(call.module, x, columns[0])

    def _network_pullbacks(self, info: LayerInfo) -> dict[str, Tensor]:
        """The layer's pull-backs through the whole network (parameters used anywhere)."""
        copy = self.network.copy_root
        trainable = {name: copy.get_parameter(name).detach() for name in info.parameter_names}
        select = self.network.outputs or select_logits

        def loss_input(raw: object) -> list[Tensor]:
            return [select(raw)]

        return parameter_pullbacks(
            copy, self.inputs, trainable, [self.columns], self.batch, loss_input
        )

    def _materialised(
        self, info: LayerInfo, per_parameter: dict[str, Tensor], split: ColumnSplit
    ) -> MaterializedFactors:
        """``MaterializedFactors`` from ``(R, N, *shape)`` pull-backs, parameters in order."""
        flat = torch.cat(
            [
                per_parameter[name].reshape(*per_parameter[name].shape[:2], -1)
                for name in info.parameter_names
            ],
            dim=2,
        )  # (R, N, D_b), the columns carry 1/√N
        sqrt = split.fisher(flat).reshape(-1, flat.shape[2])
        factors = MaterializedFactors(split.per_sample(flat), sqrt, self.dtype)
        factors.coefficients = split.coefficients
        return factors

    def _explains(self, info: LayerInfo, factors: LayerFactors) -> bool:
        """Whether the factors' mean gradient is autograd's (every use of the layer seen)."""
        expected = torch.cat(
            [
                (g if g is not None else torch.zeros(shape, device=self.outputs.device))
                .reshape(-1)
                .to(torch.float64)
                for g, shape in (
                    (self.gradient.get(name), shape)
                    for name, shape in zip(info.parameter_names, info.shapes, strict=True)
                )
            ]
        )
        mean = factors.mean_gradient().to(torch.float64)
        _, empirical = factors.cached_diagonals()
        scale = float(expected.norm()) + float(empirical.sum().clamp_min(0.0)) ** 0.5
        return float((mean - expected).norm()) <= GRADIENT_CHECK_TOLERANCE * scale + 1e-30


__all__ = ["GRADIENT_CHECK_TOLERANCE", "AutogradNetwork"]

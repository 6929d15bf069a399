"""Exact Fisher-vector products of one layer's block, without the Fisher's square-root factor.

For layer ``b`` with parameters ``θ_b`` (``D_b`` numbers) and the probe batch's outputs
``f_n``:

    F_b v = (1/N) Σ_n J_{b,n}ᵀ H_n J_{b,n} v

with ``J_{b,n} = ∂f_n/∂θ_b`` and ``H_n`` the loss-Hessian of sample ``n`` in output space
(:meth:`~fisher_monitor.likelihoods.Likelihood.hessian_product`: ``p ⊙ u − p(pᵀu)`` per
position for a softmax, ``cI`` for a Gaussian, ``σ(1 − σ)`` for a Bernoulli). One product is
a forward-mode pass (``torch.func.jvp`` of the network as a function of ``θ_b`` alone, on the
whole probe batch: ``J_b v`` for every sample at once, since samples do not interact), the
loss-Hessian in output space, and a reverse-mode pass (``torch.func.vjp``, its graph built
once per layer and reused). Where ``torch.func.linearize`` can trace the network, the
forward-mode pass replays only the tangent computations of that trace (several times
faster on small networks, whose products are dominated by per-operation overhead). No
column of the ``R = (C − 1)·T·N``-column factor is ever formed, so the cost does not grow
with the number of classes beyond the ``O(C)`` loss side. Several vectors are multiplied at
once under ``vmap`` (the primal forward is shared).

The network is a hook-free copy of the prepared one (BackPACK's hooks break
``torch.func``), evaluated in float64 — parameters, floating buffers and floating inputs
cast — because the solves built on these products amplify rounding by up to ``1/λ``.
A network that cannot run in float64 (a forward that creates tensors of a fixed type) runs
in its own precision, with a note. Random modules (dropout in train mode) draw the same
masks in every product: each runs under the measurement's seed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.func import functional_call, jvp, linearize, vjp, vmap

from fisher_monitor.backends import Backend
from fisher_monitor.backends.model_copy import copy_model
from fisher_monitor.backends.pass_context import check_outputs, forked_rng, select_logits
from fisher_monitor.batching import map_tensors, model_inputs
from fisher_monitor.krylov import Operator

#: Bytes the vectors of one ``vmap`` call may take (outputs and tangents of all lanes).
LANE_BYTES = 2**29
#: The note of a network whose products could not run in float64.
NATIVE_PRECISION_NOTE = (
    "exact-Fisher solves: the network cannot run in float64 ({error}), so its Fisher-vector "
    "products ran in {dtype}; the solves may then stop short of their tolerance"
)


class NetworkFunction:
    """The prepared network as a function of some of its parameters, in float64.

    Args:
        prepared: The prepared backend (its network is copied without hooks).
        inputs: The probe batch's inputs.
        seed: Seed of every forward pass (dropout masks are the same in every product).
    """

    def __init__(self, prepared: Backend, inputs, seed: int):
        self.network, _ = copy_model(prepared.copy_root)
        self.likelihood = prepared.likelihood
        self.select = prepared.outputs or select_logits
        self.device = prepared.device
        self.seed = seed
        self.notes: list[str] = []
        named = dict(self.network.named_parameters())
        self.canonical = {id(p): name for name, p in named.items()}
        self._source = (named, dict(self.network.named_buffers()), model_inputs(inputs))
        try:
            self._cast(torch.float64)
            with self.context(), torch.no_grad():
                self.outputs = self.forward({})
        except (RuntimeError, TypeError) as error:
            dtype = prepared.parameter_dtype
            self.notes.append(
                NATIVE_PRECISION_NOTE.format(error=_first_line(error), dtype=str(dtype)[6:])
            )
            self._cast(dtype)
            with self.context(), torch.no_grad():
                self.outputs = self.forward({})
        self.outputs64 = self.outputs.to(torch.float64)

    def _cast(self, dtype: torch.dtype) -> None:
        named, buffers, inputs = self._source
        self.dtype = dtype

        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype) if t.is_floating_point() else t

        self.params = {name: cast(p) for name, p in named.items()}
        self.buffers = {name: cast(b) for name, b in buffers.items()}
        self.inputs = map_tensors(inputs, cast)

    @contextmanager
    def context(self) -> Iterator[None]:
        """The measurement's RNG, full precision, no ``vmap`` warnings."""
        with forked_rng(self.device, self.seed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type=self.device.type, enabled=False):
                yield

    def forward(self, overrides: dict[str, Tensor]) -> Tensor:
        """The loss's input (the selected output) with some parameters replaced.

        Run it inside :meth:`context` (once around a whole batched product: entering it per
        call would cost more than a small network's forward).
        """
        state = {**self.params, **overrides, **self.buffers}
        raw = functional_call(self.network, state, self.inputs.args, self.inputs.kwargs)
        selected = self.select(raw)
        check_outputs(selected, raw)
        return selected

    def names_of(self, parameter_names: Sequence[str]) -> list[str]:
        """The copy's own names of a layer's parameters (a tied parameter has one)."""
        return [self.canonical[id(self.network.get_parameter(name))] for name in parameter_names]

    def operator(self, parameter_names: Sequence[str], lane_bytes: int = LANE_BYTES) -> Operator:
        """``V ↦ F_b V`` for the layer with these parameters (module docstring).

        Args:
            parameter_names: The layer's parameters, in the order of its coordinates.
            lane_bytes: Bytes one ``vmap`` call may use for its vectors.

        Returns:
            A function of ``(m, D_b)`` float64 vectors returning ``(m, D_b)`` float64.
        """
        names = self.names_of(parameter_names)
        primal = {name: self.params[name] for name in names}
        sizes = [t.numel() for t in primal.values()]
        shapes = [t.shape for t in primal.values()]
        with self.context():
            _, pullback = vjp(self.forward, primal)
            push = self._linearized(primal)
        outputs, samples = self.outputs64, self.outputs.shape[0]
        likelihood, dtype = self.likelihood, self.dtype

        def one(flat: Tensor) -> Tensor:
            parts = flat.to(dtype).split(sizes)
            tangent = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
            pushed = push(tangent)
            weighted = likelihood.hessian_product(outputs, pushed.to(torch.float64))
            pulled = pullback(weighted.to(pushed.dtype))[0]
            return torch.cat([pulled[n].reshape(-1) for n in names]).to(torch.float64)

        per_lane = 8 * (4 * outputs.numel() + 4 * sum(sizes))
        chunk = max(1, lane_bytes // per_lane)

        def apply(vectors: Tensor) -> Tensor:
            parts = []
            for block in vectors.split(chunk):
                with self.context():
                    parts.append(vmap(one, randomness="same")(block))
            return torch.cat(parts) / samples

        return apply

    def _linearized(self, primal: dict[str, Tensor]):
        """``tangent ↦ J_b tangent``: a ``linearize`` trace where possible, else ``jvp``."""
        try:
            _, push = linearize(self.forward, primal)
            return push
        except Exception:  # noqa: BLE001 - any tracing failure: the untraced route works
            return lambda tangent: jvp(self.forward, (primal,), (tangent,))[1]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__


def dense_layer_fisher(function: NetworkFunction, parameter_names: Sequence[str]) -> Tensor:
    """``F_b`` as a dense ``D_b × D_b`` matrix from ``D_b`` products (tests, tiny layers)."""
    size = sum(math.prod(function.params[n].shape) for n in function.names_of(parameter_names))
    eye = torch.eye(size, dtype=torch.float64, device=function.device)
    return function.operator(parameter_names)(eye)


__all__ = ["LANE_BYTES", "NetworkFunction", "dense_layer_fisher"]

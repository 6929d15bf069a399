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
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.func import functional_call, jvp, linearize, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fisher_monitor.backends import Backend
from fisher_monitor.backends.model_copy import copy_model
from fisher_monitor.backends.pass_context import check_outputs, forked_rng, select_logits
from fisher_monitor.batching import map_tensors, model_inputs
from fisher_monitor.engine.folded_head import FoldedHead, fold_head
from fisher_monitor.engine.softmax_head import SoftmaxHead, softmax_head
from fisher_monitor.krylov import Operator

#: Bytes the vectors of one ``vmap`` call may take (outputs and tangents of all lanes).
LANE_BYTES = 2**29
#: Relative difference up to which folded and plain products count as the same (float64;
#: 1e-4 for a network that runs in its own, lower precision).
FOLD_AGREEMENT = 1e-9
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
        fold: Fold the loss-Hessian through the network's last linear layer where that
            gives the same products (:mod:`~fisher_monitor.engine.folded_head`).
    """

    def __init__(self, prepared: Backend, inputs, seed: int, fold: bool = True):
        self.network, _ = copy_model(prepared.copy_root)
        self.fold = fold
        self._head: FoldedHead | None | bool = False
        self._softmax: SoftmaxHead | None | bool = False
        self._traceable = True
        self._random: bool | None = None
        self.likelihood = prepared.likelihood
        self.select = prepared.outputs or select_logits
        self.device = prepared.device
        self.seed = seed
        self.notes: list[str] = []
        #: Called after each batched product (the solves' deadline, which may raise).
        self.meter: Callable[[], None] | None = None
        named = dict(self.network.named_parameters())
        self.canonical = {id(p): name for name, p in named.items()}
        self.params_of = named  # the copy's parameter objects, by name
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
        """The measurement's RNG, full precision, no ``vmap`` warnings, plain attention.

        Attention runs by its plain arithmetic: the fused ``scaled_dot_product_attention``
        kernels have no forward-mode derivative, and the math backend computes the same
        function.
        """
        with forked_rng(self.device, self.seed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with (
                torch.autocast(device_type=self.device.type, enabled=False),
                sdpa_kernel([SDPBackend.MATH]),
            ):
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

    def step_seconds(self) -> float:
        """A plain training step's seconds, taken as three timed forward passes.

        The network's own precision, after a first pass that warms it up; a forward and a
        backward pass cost about three forward passes.
        """
        named, buffers, inputs = self._source
        state = {**named, **buffers}
        seconds = math.inf
        with self.context(), torch.no_grad():
            for _ in range(2):
                started = time.perf_counter()
                functional_call(self.network, state, inputs.args, inputs.kwargs)
                self.synchronize()
                seconds = time.perf_counter() - started
        return 3.0 * seconds

    def synchronize(self) -> None:
        """Wait for the device's queued work (timings on asynchronous devices)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def names_of(self, parameter_names: Sequence[str]) -> list[str]:
        """The copy's own names of a layer's parameters (a tied parameter has one)."""
        return [self.canonical[id(self.network.get_parameter(name))] for name in parameter_names]

    def operator(self, parameter_names: Sequence[str], lane_bytes: int = LANE_BYTES) -> Operator:
        """``V ↦ F_b V`` for the layer with these parameters (module docstring).

        Below a foldable head (:mod:`~fisher_monitor.engine.folded_head`) the products stop
        at the head's input, where they agree with the plain products on a random vector
        (checked once per layer); otherwise they run through the whole network.

        Args:
            parameter_names: The layer's parameters, in the order of its coordinates.
            lane_bytes: Bytes one ``vmap`` call may use for its vectors.

        Returns:
            A function of ``(m, D_b)`` float64 vectors returning ``(m, D_b)`` float64.
        """
        names = self.names_of(parameter_names)
        likelihood, outputs = self.likelihood, self.outputs64

        def hessian(u: Tensor) -> Tensor:
            return likelihood.hessian_product(outputs, u.to(torch.float64)).to(u.dtype)

        weigh = vmap(hessian, randomness="same")
        plain = self._operator(names, self.forward, weigh, outputs.numel(), lane_bytes)
        head = self.folded_head(lane_bytes)
        if head is None or any(id(self.params_of[n]) in head.parameters for n in names):
            return plain
        inputs = head.curvature[..., 0].numel()
        folded = self._operator(names, head.head_input, head.weigh_batch, inputs, lane_bytes)
        size = sum(self.params[n].numel() for n in names)
        probe = torch.randn(
            1, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        )
        probe = probe.to(self.device)
        expected, found = plain(probe), folded(probe)
        agreement = FOLD_AGREEMENT if self.dtype == torch.float64 else 1e-4
        if float((expected - found).norm()) <= agreement * float(expected.norm()):
            return folded
        return plain

    def folded_head(self, lane_bytes: int = LANE_BYTES) -> FoldedHead | None:
        """The network's folded head (built on first use), or ``None``."""
        if self._head is False:
            self._head = fold_head(self, lane_bytes) if self.fold else None
        return self._head  # type: ignore[return-value]

    def softmax_head(self, lane_bytes: int = LANE_BYTES) -> SoftmaxHead | None:
        """The head as a verified softmax head (exact solves, :mod:`~.softmax_head`) or ``None``."""
        if self._softmax is False:
            head = self.folded_head(lane_bytes)
            self._softmax = None
            if head is not None:
                module = head.module
                names = {
                    "weight": self.canonical.get(id(module.weight)),
                    "bias": self.canonical.get(id(module.bias))
                    if module.bias is not None
                    else None,
                }
                self._softmax = softmax_head(head, self.likelihood, names)
        return self._softmax  # type: ignore[return-value]

    def close(self) -> None:
        """Remove what was attached to the copy (the folded head's hooks)."""
        if self._head:
            self._head.close()  # type: ignore[union-attr]
        self._head = None

    def _operator(
        self, names, function, weigh, lane_elements: int, lane_bytes: int, trace: bool = True
    ) -> Operator:
        """``V ↦ (1/N) Jᵀ W J V`` for ``J`` the Jacobian of ``function`` in these parameters.

        ``weigh`` applies ``W`` to a batch of vectors of ``function``'s output shape (leading
        dimension: the vectors). It runs outside ``vmap``: a per-sample matrix product under
        ``vmap``'s batching rule is up to 60 times slower than the same product on the batch
        (the folded head's ``G``).
        """
        primal = {name: self.params[name] for name in names}
        sizes = [t.numel() for t in primal.values()]
        shapes = [t.shape for t in primal.values()]
        with self.context():
            _, pullback = vjp(function, primal)
            push = self._linearized(function, primal, trace)
        dtype, samples = self.dtype, self.outputs.shape[0]

        def forward(flat: Tensor) -> Tensor:
            parts = flat.to(dtype).split(sizes)
            tangent = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
            return push(tangent)

        def backward(weighted: Tensor) -> Tensor:
            pulled = pullback(weighted)[0]
            return torch.cat([pulled[n].reshape(-1) for n in names]).to(torch.float64)

        chunk = max(1, lane_bytes // (8 * (4 * lane_elements + 4 * sum(sizes))))

        def apply(vectors: Tensor) -> Tensor:
            parts = []
            for block in vectors.split(chunk):
                with self.context():
                    pushed = vmap(forward, randomness="same")(block)
                    weighted = weigh(pushed)
                    parts.append(vmap(backward, randomness="same")(weighted))
                if self.meter is not None:
                    self.meter()
            return torch.cat(parts) / samples

        return apply

    def draws_differently(self) -> bool:
        """Whether the network's forward differs under ``vjp`` or ``vmap`` from a plain one.

        Random modules in train mode (dropout, also inside attention) draw other masks under
        torch.func's transforms than in a plain forward with the same seed, and the
        measurement's pass used the plain forward's: Fisher-vector products would mix the
        masks (the Hessian at one, the Jacobians at another), so such a network is not
        solved (:func:`~fisher_monitor.engine.exact_solves.solve_deferred`).
        """
        if self._random is None:
            with self.context(), torch.no_grad():
                plain = self.forward({})
            name = next(iter(self.params))
            try:
                with self.context():
                    pulled = vjp(self.forward, {name: self.params[name]})[0]
                with self.context(), torch.no_grad():
                    mapped = vmap(lambda _: self.forward({}), randomness="same")(
                        torch.zeros(1, device=self.device)
                    )[0]
                # other masks change outputs by O(1); kernels (a fused eval-mode path) by rounding
                rtol = FOLD_AGREEMENT if self.dtype == torch.float64 else 1e-4
                atol = rtol * float(plain.abs().max())
                self._random = not all(
                    torch.allclose(plain, other, rtol=rtol, atol=atol) for other in (pulled, mapped)
                )
            except Exception:  # noqa: BLE001 - a network vmap cannot run is not solved either
                self._random = True
        return self._random

    def _linearized(self, function, primal: dict[str, Tensor], trace: bool = True):
        """``tangent ↦ J tangent``: a ``linearize`` trace, else ``jvp`` itself.

        The trace is used where it works under ``vmap`` and agrees with ``jvp`` (checked on
        two random tangents); after one failure the network is not traced again.
        """

        def pushed(tangent):
            return jvp(function, (primal,), (tangent,))[1]

        if not (trace and self._traceable):
            return pushed
        generator = torch.Generator().manual_seed(1)
        tangents = {
            n: torch.randn(2, *p.shape, generator=generator, dtype=p.dtype).to(p.device)
            for n, p in primal.items()
        }
        try:
            _, traced = linearize(function, primal)
            found = vmap(traced, randomness="same")(tangents)
            expected = vmap(pushed, randomness="same")(tangents)
            if torch.allclose(found, expected, rtol=1e-6, atol=1e-12 * float(expected.abs().max())):
                return traced
        except Exception:  # noqa: BLE001 - any tracing failure: the untraced route works
            pass
        self._traceable = False
        return pushed


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__


def dense_layer_fisher(function: NetworkFunction, parameter_names: Sequence[str]) -> Tensor:
    """``F_b`` as a dense ``D_b × D_b`` matrix from ``D_b`` products (tests, tiny layers)."""
    size = sum(math.prod(function.params[n].shape) for n in function.names_of(parameter_names))
    eye = torch.eye(size, dtype=torch.float64, device=function.device)
    return function.operator(parameter_names)(eye)


__all__ = ["FOLD_AGREEMENT", "LANE_BYTES", "NetworkFunction", "dense_layer_fisher"]

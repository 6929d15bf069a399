"""The loss-Hessian pulled back through the network's last linear layer, once per measurement.

A language model's or a 1000-class classifier's last layer (the *head*, ``y = W z + b`` with
``C`` outputs per position) is where every Fisher-vector product of every other layer spends
its time: ``2·C·I`` operations per position forward and again backward, for a layer whose
input ``z`` has only ``I`` features. For a layer ``b`` below the head,
``J_b = J_{f←y} W J_{z←θ_b}``, so

    F_b v = (1/N) Σ_n J_{z,b,n}ᵀ G_n J_{z,b,n} v,      G_{n,t} = Wᵀ H̃_{n,t} W   (I × I)

with ``H̃`` the loss-Hessian seen at the head's output (through whatever the output adapter
selects: a causal model's shift, a transpose). ``G`` is block-diagonal over the head's
positions when the head acts position-wise and nothing else reaches the output, and it is
formed once, column by column: ``G e_i`` for every position at once from the ``i``-th input
direction (``I`` batched products of the part after the head). The products of a body layer
then stop at the head's input and apply ``G`` per position: ``I²`` instead of ``4·C·I``
operations per position.

Whether this holds is checked, not assumed: each layer's folded product is compared with
the plain one on a random vector (:meth:`~fisher_monitor.engine.fisher_operator.
NetworkFunction.operator`), and a layer whose products differ (a tied head weight, a skip
connection around the head) keeps the plain products.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap


class _HeadInput(Exception):
    """Raised by the head's pre-hook to stop a forward pass at the head's input."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value


class FoldedHead:
    """``G_{n,t} = Wᵀ H̃_{n,t} W`` for the network's last ``nn.Linear`` (module docstring).

    Build it with :func:`fold_head`. Call :meth:`close` to remove its hooks from the copy.

    Attributes:
        module: The head (in the function's hook-free copy).
        parameters: The ``id`` of the head's parameters in the copy.
        curvature: ``G``, ``(N, *positions, I, I)``.
        input: The head's input ``z`` in the measurement's forward pass.
        output: Its output ``y``.
    """

    def __init__(self, function: Any, module: nn.Linear, curvature_bytes: int):
        self.function = function
        self.module = module
        self.parameters = {id(p) for p in module.parameters()}
        self._mode: tuple[str, Tensor | None] = ("off", None)
        self._handles = [
            module.register_forward_pre_hook(self._pre_hook),
            module.register_forward_hook(self._hook),
        ]
        self.curvature = torch.empty(0)
        self.curvature_bytes = curvature_bytes
        self.input = torch.empty(0)
        self.output = torch.empty(0)

    def _pre_hook(self, module, inputs):
        if self._mode[0] == "stop":
            raise _HeadInput(inputs[0])

    def _hook(self, module, inputs, output):
        if self._mode[0] == "replace":
            return self._mode[1]
        return None

    @contextmanager
    def _in_mode(self, mode: str, value: Tensor | None = None):
        previous, self._mode = self._mode, (mode, value)
        try:
            yield
        finally:
            self._mode = previous

    def head_input(self, overrides: dict[str, Tensor]) -> Tensor:
        """The head's input ``z`` with some parameters replaced (the forward stops there)."""
        with self._in_mode("stop"):
            try:
                self.function.forward(overrides)
            except _HeadInput as stop:
                return stop.value
        raise RuntimeError("The network's forward pass did not reach its head.")

    def top(self, head_output: Tensor) -> Tensor:
        """The loss's input with the head's output replaced by ``head_output``."""
        with self._in_mode("replace", head_output):
            return self.function.forward({})

    def weigh_batch(self, vectors: Tensor) -> Tensor:
        """``G u`` per position for a batch of vectors ``(m, *head input shape)``.

        One batched matrix product over the samples and positions, with the vectors as the
        rows of each: ``(m, N, …, I) → (N·…, m, I)``, times ``Gᵀ``.
        """
        count, curvature = vectors.shape[0], self.curvature
        inputs = curvature.shape[-1]
        rows = vectors.reshape(count, -1, inputs).transpose(0, 1).to(curvature.dtype)
        weighted = torch.bmm(rows, curvature.reshape(-1, inputs, inputs).mT)  # (P, m, I)
        return weighted.transpose(0, 1).reshape(vectors.shape).to(vectors.dtype)

    def build(self, weight: Tensor, head_output: Tensor, lane_bytes: int) -> None:
        """Form :attr:`curvature` column by column (module docstring)."""
        function = self.function
        outputs, likelihood = function.outputs64, function.likelihood
        with function.context():
            _, pullback = vjp(self.top, head_output)

        def column(direction: Tensor) -> Tensor:
            tangent = direction.to(head_output.dtype).expand_as(head_output)
            _, pushed = jvp(self.top, (head_output,), (tangent,))
            weighted = likelihood.hessian_product(outputs, pushed.to(torch.float64))
            pulled = pullback(weighted.to(pushed.dtype))[0].to(torch.float64)
            return pulled @ weight  # (N, *positions, I)

        inputs = weight.shape[1]
        per_lane = 8 * 4 * (outputs.numel() + head_output.numel())
        chunk = max(1, lane_bytes // per_lane)
        directions = weight.T.contiguous()  # row i: W e_i, the head output of input e_i
        columns = []
        for block in directions.split(chunk):
            with function.context():
                columns.append(vmap(column, randomness="same")(block))
        self.curvature = (
            torch.cat(columns)
            .movedim(0, -1)
            .reshape(*head_output.shape[:-1], inputs, inputs)
            .contiguous()  # a strided G makes every product copy it
        )

    def close(self) -> None:
        """Remove the hooks from the copy."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def fold_head(function: Any, lane_bytes: int) -> FoldedHead | None:
    """The folded head of ``function``'s network, or ``None`` where there is none to fold.

    ``function`` is a :class:`~fisher_monitor.engine.fisher_operator.NetworkFunction` (not
    imported here: it imports this module).

    The head is the last ``nn.Linear`` the forward pass calls, if it is called once, its
    weight is trained, and ``G`` (``N·positions·I²`` numbers) fits ``lane_bytes``.
    """
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []

    def record(module, inputs, output):
        calls.append((module, inputs[0], output))

    linears = [m for m in function.network.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(record) for m in linears]
    try:
        with function.context(), torch.no_grad():
            function.forward({})
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        return None
    module, head_input, head_output = calls[-1]
    weight_name = function.canonical.get(id(module.weight))
    inputs = module.in_features
    size = 8 * head_input[..., :1].numel() * inputs * inputs
    if (
        sum(1 for call in calls if call[0] is module) != 1
        or weight_name is None
        or not module.weight.requires_grad
        or size > lane_bytes
    ):
        return None
    head = FoldedHead(function, module, size)
    head.input, head.output = head_input.detach(), head_output.detach()
    try:
        weight = function.params[weight_name].to(torch.float64)
        head.build(weight, head_output.to(function.dtype), lane_bytes)
    except Exception:  # noqa: BLE001 - a head that cannot be folded keeps plain products
        head.close()
        return None
    return head


__all__ = ["FoldedHead", "fold_head"]

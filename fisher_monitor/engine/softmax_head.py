"""The exact ``(F_h + λI)⁻¹`` of a softmax head, by its block structure instead of iterations.

The head of a classifier or a language model is a ``Linear`` layer ``y_m = W z_m + b`` whose
outputs are the logits of a categorical likelihood at ``M`` positions (a causal model's
shift and transposes only select and move them). With ``z̃_m`` the input (and a 1 for a
trained bias) and ``p_m`` the predicted probabilities at position ``m`` (0 where the loss
does not read the position), its Fisher block is

    F_h = (1/N) Σ_m (diag(p_m) − p_m p_mᵀ) ⊗ z̃_m z̃_mᵀ = Bd − Ŵ Ŵᵀ,
    Bd = ⊕_c A_c,   A_c = (1/N) Σ_m p_{m,c} z̃_m z̃_mᵀ   (one I × I block per class),
    Ŵ = [p_m ⊗ z̃_m]_m / √N                                (D × M)

— block-diagonal over the ``C`` classes minus a rank-``M`` term. With ``A_c = U_c Λ_c U_cᵀ``
(once for every damping) and ``Bd_λ = Bd + λI``, Woodbury and the matrix determinant lemma
give every quantity the solves need exactly, for every damping:

    A⁻¹ = Bd_λ⁻¹ + Bd_λ⁻¹ Ŵ (I − Q)⁻¹ Ŵᵀ Bd_λ⁻¹,    Q = Ŵᵀ Bd_λ⁻¹ Ŵ   (M × M)
    log det A = Σ_c log det(A_c + λI) + log det(I − Q)
    tr A⁻¹ = Σ_c tr (A_c + λI)⁻¹ + tr((I − Q)⁻¹ Ŵᵀ Bd_λ⁻² Ŵ)

with ``Q = (1/N) Σ_c (p_c p_cᵀ) ∘ (Z̃ (A_c + λI)⁻¹ Z̃ᵀ)``. The work is about
``C·M·I²`` to form and diagonalise the blocks and ``C·M²·I`` per damping, against
hundreds of products of ``4·C·M·I`` each for conjugate gradients; no probe is needed, so
the head's KL is exact. Classes are processed in chunks, so memory stays at
``M² + chunk·I²`` numbers besides the vectors. The structure is checked, not assumed: the
loss-Hessian seen at the head's output must act as ``p ⊙ u − p(pᵀu)`` per position on a
random vector (:func:`softmax_head`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jvp, vjp

from fisher_monitor.engine.folded_head import FoldedHead
from fisher_monitor.likelihoods import Categorical
from fisher_monitor.linalg import symmetric_eigh
from fisher_monitor.structures.fisher_solves import LayerSolutions, ShiftSolution, SolveRequest

#: Relative difference up to which the head's pulled-back Hessian counts as a softmax's.
STRUCTURE_AGREEMENT = 1e-9
#: Numbers of one chunk of class blocks (``chunk·I²``).
CHUNK_NUMBERS = 2**24


@dataclass
class SoftmaxHead:
    """A verified softmax head (module docstring).

    Attributes:
        inputs: ``z̃_m`` of the read positions, ``(M, I')`` float64 (a trailing 1 per row
            when the bias is trained).
        probabilities: ``p_m``, ``(M, C)`` float64.
        samples: ``N``.
        weight_name: The copy's name of the head's weight.
        bias_name: That of its bias (``None`` without one).
    """

    inputs: Tensor
    probabilities: Tensor
    samples: int
    weight_name: str
    bias_name: str | None

    def covers(self, names: Sequence[str]) -> tuple[bool, bool] | None:
        """``(weight, bias)`` trained in a layer with these parameters, if it is the head's."""
        wanted = {self.weight_name, self.bias_name} - {None}
        if not set(names) <= wanted or not names:
            return None
        return self.weight_name in names, self.bias_name in names

    def product(self, vectors: Tensor, names: Sequence[str]) -> Tensor:
        """``F_h V`` by the structure: ``(1/N) Σ_m (diag(p_m) − p_m p_mᵀ) V_m z̃_m z̃_mᵀ``."""
        weight, bias = self.covers(names) or (True, False)
        layout = _Layout(self.inputs, self.probabilities, weight, bias, self.samples)
        logits = torch.einsum("rci,mi->rmc", layout.to_matrix(vectors), layout.z)
        p = layout.p
        weighted = p * logits - p * (p * logits).sum(dim=2, keepdim=True)
        return layout.to_vector(torch.einsum("rmc,mi->rci", weighted, layout.z) / layout.n)

    def agrees(self, operator, names: Sequence[str], tolerance: float) -> bool:
        """Whether the layer's plain products are the structure's (on a random vector).

        They are not where the head's weight also serves elsewhere (a tied embedding: the
        layer's Fisher then has the lookup's terms too) or the loss reads the head's output
        in another way than the verified softmax.
        """
        weight, bias = self.covers(names) or (True, False)
        size = self.probabilities.shape[1] * ((self.inputs.shape[1] - 1) * weight + bias)
        generator = torch.Generator().manual_seed(3)
        probe = torch.randn(1, size, generator=generator, dtype=torch.float64)
        probe = probe.to(self.inputs.device)
        expected, found = operator(probe), self.product(probe, names)
        return float((expected - found).norm()) <= tolerance * float(expected.norm())

    def solve(self, request: SolveRequest, names: Sequence[str]) -> LayerSolutions:
        """Every quantity of the solves, exactly, for the request's dampings."""
        weight, bias = self.covers(names) or (True, False)
        layout = _Layout(self.inputs, self.probabilities, weight, bias, self.samples)
        return layout.solutions(request, names)


class _Layout:
    """The head's parameters as ``C × I'`` matrices (weight columns, then the bias column)."""

    def __init__(self, inputs: Tensor, probabilities: Tensor, weight: bool, bias: bool, n: int):
        features = inputs.shape[1] - 1
        columns = ([inputs[:, :features]] if weight else []) + ([inputs[:, -1:]] if bias else [])
        self.z = torch.cat(columns, dim=1)
        self.p = probabilities
        self.weight, self.bias, self.n = weight, bias, n
        self.classes, self.width = probabilities.shape[1], self.z.shape[1]
        self.features = features if weight else 0

    def to_matrix(self, vectors: Tensor) -> Tensor:
        """``(R, D)`` in ``named_parameters`` order (weight, then bias) to ``(R, C, I')``."""
        r, c = vectors.shape[0], self.classes
        parts = []
        if self.weight:
            parts.append(vectors[:, : c * self.features].reshape(r, c, self.features))
        if self.bias:
            parts.append(vectors[:, -c:].reshape(r, c, 1))
        return torch.cat(parts, dim=2)

    def to_vector(self, matrices: Tensor) -> Tensor:
        r = matrices.shape[0]
        parts = []
        if self.weight:
            parts.append(matrices[:, :, : self.features].reshape(r, -1))
        if self.bias:
            parts.append(matrices[:, :, -1])
        return torch.cat(parts, dim=1)

    def chunks(self):
        """Class ranges whose blocks and rotated inputs fit :data:`CHUNK_NUMBERS`."""
        size = max(1, CHUNK_NUMBERS // max(1, self.width * max(self.width, self.z.shape[0])))
        return [range(s, min(s + size, self.classes)) for s in range(0, self.classes, size)]

    def blocks(self, classes: range) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``(c, I')`` and vectors ``(c, I', I')`` of ``A_c`` for these classes."""
        weights = self.p[:, classes.start : classes.stop].T  # (c, M)
        outer = (self.z.unsqueeze(2) * self.z.unsqueeze(1)).reshape(self.z.shape[0], -1)
        blocks = (weights @ outer).reshape(-1, self.width, self.width) / self.n
        values, vectors = symmetric_eigh(blocks)  # one thread: many small ones
        return values.clamp_min(0.0), vectors

    def solutions(self, request: SolveRequest, names: Sequence[str]) -> LayerSolutions:
        rows = torch.cat([request.gradient.unsqueeze(0), request.per_sample])
        right = self.to_matrix(rows)  # (1 + N, C, I')
        shifts = [float(s) for s in request.shifts]
        state = _Accumulator(self, right, shifts)
        for classes in self.chunks():
            state.add(classes, *self.blocks(classes))
        return state.finish(request, self)


class _Accumulator:
    """Sums over class chunks of everything the Woodbury formulas need, per damping."""

    def __init__(self, layout: _Layout, right: Tensor, shifts: list[float]):
        m, s = layout.z.shape[0], len(shifts)
        like = layout.z
        self.layout, self.right, self.shifts = layout, right, shifts
        self.core = like.new_zeros(s, m, m)  # Q
        self.core_square = like.new_zeros(s, m, m)  # Ŵᵀ Bd⁻² Ŵ
        self.logdet = like.new_zeros(s)
        self.trace = like.new_zeros(s)
        self.projected = like.new_zeros(s, right.shape[0], m)  # Ŵᵀ Bd⁻¹ rhs
        self.energy = like.new_zeros(s, right.shape[0])  # rhsᵀ Bd⁻¹ rhs
        self.direct = like.new_zeros(s, *right.shape[1:])  # Bd⁻¹ g (g only)
        self.eigen: list[tuple[range, Tensor, Tensor]] = []

    def add(self, classes: range, values: Tensor, vectors: Tensor) -> None:
        """Add one chunk of classes (their blocks' eigendecompositions)."""
        layout, scale = self.layout, layout_scale(self.layout)
        m = layout.z.shape[0]
        rotated = torch.einsum("mi,cij->cmj", layout.z, vectors)  # Z̃ U_c
        weights = layout.p[:, classes.start : classes.stop].T  # (c, M)
        right = self.right[:, classes.start : classes.stop]  # (R, c, I')
        coordinates = torch.einsum("rci,cij->rcj", right, vectors)  # U_cᵀ rhs_c
        weighted = (weights.unsqueeze(2) * rotated) * scale  # rows of Ŵ's blocks, rotated
        for index, shift in enumerate(self.shifts):
            inverse = 1.0 / (values + shift)  # (c, I')
            self.logdet[index] += torch.log(values + shift).sum()
            self.trace[index] += inverse.sum()
            for target, factor in ((self.core, inverse.sqrt()), (self.core_square, inverse)):
                # Σ_c X_c X_cᵀ as one product: X = [diag(p_c) Z̃ U_c Λ^{-k/2}]_c, (M, c·I')
                stacked = (weighted * factor.unsqueeze(1)).permute(1, 0, 2).reshape(m, -1)
                target[index] += stacked @ stacked.T
            solved = coordinates * inverse  # U_cᵀ Bd_c⁻¹ rhs_c, in U_c's coordinates
            self.energy[index] += (solved * coordinates).sum(dim=(1, 2))
            self.projected[index] += (
                torch.einsum("rcj,cmj,cm->rm", solved, rotated, weights) * scale
            )
            self.direct[index, classes.start : classes.stop] = torch.einsum(
                "cij,cj->ci", vectors, solved[0]
            )
        self.eigen.append((classes, values, vectors))

    def finish(self, request: SolveRequest, layout: _Layout) -> LayerSolutions:
        found = {}
        dimension = layout.classes * layout.width
        eye = torch.eye(self.core.shape[1], dtype=self.core.dtype, device=self.core.device)
        for index, shift in enumerate(self.shifts):
            kernel = eye - self.core[index]
            factor = torch.linalg.cholesky(kernel)
            logdet = self.logdet[index] + 2.0 * torch.log(torch.diagonal(factor)).sum()
            trace_inverse = self.trace[index] + torch.trace(
                torch.cholesky_solve(self.core_square[index], factor)
            )
            solved = torch.cholesky_solve(self.projected[index].T, factor)  # (M, R)
            quadratic = self.energy[index] + (self.projected[index].T * solved).sum(dim=0)
            direction = self.direct[index] + self._correction(solved[:, 0], shift)
            spectral = (logdet - dimension * math.log(shift)) - (dimension - shift * trace_inverse)
            zero = spectral.new_zeros(1)
            found[shift] = ShiftSolution(
                direction=layout.to_vector(direction.unsqueeze(0))[0],
                projection=quadratic[0],
                error_bound=0.0,
                spectral=spectral.reshape(1),
                spectral_square=zero,
                empirical=(quadratic[1:].sum() / layout.n).reshape(1),
            )
        return LayerSolutions(found, True, True, iterations=1, products=0)

    def _correction(self, weights_m: Tensor, shift: float) -> Tensor:
        """``Bd⁻¹Ŵ t`` as a ``C × I'`` matrix: ``(1/√N) U_c Λ_c⁻¹ U_cᵀ Z̃ᵀ(p_c ⊙ t)`` per class."""
        layout, scale = self.layout, layout_scale(self.layout)
        out = layout.z.new_zeros(layout.classes, layout.width)
        for classes, values, vectors in self.eigen:
            weights = layout.p[:, classes.start : classes.stop].T * weights_m  # (c, M)
            combined = weights @ layout.z  # (c, I')
            coordinates = torch.einsum("ci,cij->cj", combined, vectors) / (values + shift)
            out[classes.start : classes.stop] = torch.einsum("cij,cj->ci", vectors, coordinates)
        return out * scale


def layout_scale(layout: _Layout) -> float:
    """``1/√N``: ``Ŵ``'s columns are ``p_m ⊗ z̃_m / √N``."""
    return layout.n**-0.5


def softmax_head(head: FoldedHead, likelihood, names: dict[str, str | None]) -> SoftmaxHead | None:
    """The head as a :class:`SoftmaxHead`, if its loss-Hessian has that structure.

    Args:
        head: The folded head (its input, output and the map from its output to the loss's).
        likelihood: The likelihood (only a categorical one qualifies).
        names: The copy's names of the head's ``"weight"`` and ``"bias"``.
    """
    if not isinstance(likelihood, Categorical):
        return None
    function = head.function
    output = head.output
    probs = function.outputs64.softmax(dim=1)
    with function.context():
        _, pullback = vjp(head.top, output)
        placed = pullback(probs.to(output.dtype))[0].to(torch.float64)
        generator = torch.Generator().manual_seed(2)
        probe = torch.randn(output.shape, generator=generator, dtype=torch.float64)
        probe = probe.to(output.device)
        _, pushed = jvp(head.top, (output,), (probe.to(output.dtype),))
        weighted = likelihood.hessian_product(function.outputs64, pushed.to(torch.float64))
        expected = pullback(weighted.to(output.dtype))[0].to(torch.float64)
    predicted = placed * probe - placed * (placed * probe).sum(dim=-1, keepdim=True)
    if float((expected - predicted).norm()) > STRUCTURE_AGREEMENT * float(expected.norm()):
        return None
    flat = placed.reshape(-1, placed.shape[-1])
    read = flat.sum(dim=1) > 0
    inputs = head.input.reshape(-1, head.input.shape[-1])[read]
    inputs = torch.cat([inputs.to(torch.float64), inputs.new_ones(inputs.shape[0], 1)], dim=1)
    samples = function.outputs.shape[0]
    return SoftmaxHead(
        inputs.to(torch.float64), flat[read], samples, names["weight"], names["bias"]
    )


__all__ = ["CHUNK_NUMBERS", "STRUCTURE_AGREEMENT", "SoftmaxHead", "softmax_head"]

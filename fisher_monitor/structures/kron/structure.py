"""``kron``: a Kronecker-factored Fisher per layer against the exact EF block.

``F_S = G ⊗ A`` (KFC for layers with weight sharing, see
:class:`~fisher_monitor.factors.WeightSharingFactors`), compared with the exact
``EF_b``; layers without Kronecker factors (e.g. BatchNorm, layers measured with
``torch.func``) are skipped with a note. The relative damping ``λ_b`` is the one of the
exact block (from ``tr F_b``), as for the other structures.
"""

from __future__ import annotations

from torch import Tensor

from fisher_monitor.factors import (
    CURVATURE_BYTES,
    RATES,
    KroneckerFactors,
    LayerShape,
    OuterSamples,
    PassSize,
)
from fisher_monitor.structures.base import (
    Directions,
    LayerInput,
    LayerResult,
    Structure,
    StructureUnavailable,
)
from fisher_monitor.structures.kron.statistics import factor_basis, kronecker_statistics


class Kronecker(Structure):
    """Kronecker-factored Fisher ``G ⊗ A`` against the exact empirical Fisher block."""

    name = "kron"

    def layer(self, layer: LayerInput, directions: bool = False) -> LayerResult:  # noqa: D102
        factors = layer.require_factors()
        kron = factors.kronecker()
        if kron is None:
            raise StructureUnavailable(f"no Kronecker factorisation for a {layer.info.module_type}")
        statistics = kronecker_statistics(
            kron.input_factor,
            kron.output_factor,
            kron.samples,
            layer.gram_u(),
            layer.dampings,
            input_root=kron.input_root,
            output_root=kron.output_root,
            empirical=layer.empirical_solves(),
        )
        found = _directions(layer, kron) if directions else None
        return LayerResult(statistics, found)

    def flops(self, shape: LayerShape, size: PassSize) -> float:
        """The factors' eigendecompositions (through their roots where wide) and ``M̂_n``.

        In the units of :class:`~fisher_monitor.factors.Rates`: each factor is diagonalised
        on its smaller side (``min(O, R·T)``, ``min(I, N·T)``), formed first where its root
        is tall, and the per-sample gradients are rotated into both bases.
        """
        if shape.form == "materialised":
            return 0.0  # no Kronecker factors: the layer is skipped
        n, r, t = float(size.samples), float(size.rank), float(shape.positions)
        o, i = float(shape.outputs), float(shape.inputs)
        out_side, in_side = min(o, r * t), min(i, n * t)
        eigh = RATES.eigh64 * (out_side**3 + in_side**3)
        # each factor (or, where its root is wide, the root's Gram matrix), a QR pass over a
        # wide side's basis, the mean gradient and its part outside the bases, the samples'
        # residuals
        forming = _factor_flops(r * t, o) + _factor_flops(n * t, i)
        forming += 4.0 * (o * o * r + i * i * n) * t
        forming += 2.0 * n * t * o * i + 4.0 * o * i * max(out_side, in_side)
        forming += 4.0 * n * t * (o * out_side + i * in_side)
        if t > 1:  # per-sample gradients materialised and rotated on both sides
            rotating = 2.0 * n * t * o * i + 2.0 * n * o * i * (out_side + in_side)
        else:  # outer products: each side rotated on its own
            rotating = 2.0 * n * (o * out_side + i * in_side)
        # products of a few hundred rows run at about half the rate of large ones
        return eigh + 2.0 * RATES.gemm64 * (forming + rotating)

    def peak_bytes(self, shape: LayerShape, size: PassSize) -> int:
        """The factors and their eigenvectors; with weight sharing, the per-sample gradients."""
        if shape.form == "materialised":
            return 0
        d, n, t = CURVATURE_BYTES, size.samples, shape.positions
        i, o = shape.inputs, shape.outputs
        total = 3 * (i * i + o * o) * d
        if shape.form == "shared":
            total += (n * t * i + size.rank * t * o) * d
            if t > 1:  # per-sample gradients, rotated and residual copies
                total += 3 * n * shape.dimension * d
        return total


def _factor_flops(rows: float, columns: float) -> float:
    """Forming ``rootᵀroot`` (``columns²``) from a tall root, ``root rootᵀ`` from a wide one."""
    return 2.0 * rows * columns * min(rows, columns)


def _mean_sample(samples: Tensor | OuterSamples) -> Tensor:
    if isinstance(samples, OuterSamples):
        return samples.output_grads.T @ samples.inputs / samples.inputs.shape[0]
    return samples.mean(dim=0)


def _directions(layer: LayerInput, kron: KroneckerFactors) -> Directions:
    """``((G ⊗ A + λI)⁻¹g, B⁻¹g)`` per damping.

    With range bases ``Q_G``, ``Q_A`` of the factors (through their roots when those are
    wide, see :func:`~.statistics.factor_basis`) and ``ĝ = Q_Gᵀ g Q_A``:
    ``(G ⊗ A + λI)⁻¹ vec g = vec(Q_G (ĝ / Λ) Q_Aᵀ + (g − Q_G ĝ Q_Aᵀ)/λ)``, ``Λ_ij = γ_i α_j + λ``.
    """
    factors = layer.require_factors()
    out_basis = factor_basis(kron.output_factor, kron.output_root)
    in_basis = factor_basis(kron.input_factor, kron.input_root)
    spectrum = out_basis.eigenvalues.unsqueeze(1) * in_basis.eigenvalues.unsqueeze(0)
    mean = _mean_sample(kron.samples)
    rotated = out_basis.vectors.T @ mean @ in_basis.vectors
    residual = mean - out_basis.vectors @ rotated @ in_basis.vectors.T
    found = []
    for damping, solve in zip(layer.dampings, layer.empirical_solves(), strict=True):
        inside = out_basis.vectors @ (rotated / (spectrum + damping)) @ in_basis.vectors.T
        natural = kron.order(inside + residual / damping)
        found.append((natural, factors.u_combination(solve.coefficients)))
    return found

"""Multi-shift conjugate gradients and Gauss quadrature against dense float64 solves."""

from __future__ import annotations

import pytest
import torch

from fisher_monitor.krylov import (
    ENERGY,
    TRACE,
    gauss_rule,
    rademacher,
    shifted_conjugate_gradients,
    true_residuals,
)

DTYPE = torch.float64


def low_rank_psd(dimension: int = 120, rank: int = 60, decay: float = 2.0, seed: int = 0):
    """``F = X Xᵀ`` of rank ``rank`` with singular values over ``decay`` decades."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(dimension, rank, generator=generator, dtype=DTYPE)
    x *= torch.logspace(0, -decay, rank, dtype=DTYPE)
    return x @ x.T


def dense_quadratic(matrix: torch.Tensor, vector: torch.Tensor, phi) -> float:
    values, vectors = torch.linalg.eigh(matrix)
    weights = (vectors.T @ vector).square()
    return float((weights * phi(values.clamp_min(0.0))).sum())


def test_every_shift_solves_its_own_system():
    fisher = low_rank_psd()
    shifts = [1e-3, 3e-3, 0.1]
    starts = torch.randn(4, 120, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    result = shifted_conjugate_gradients(
        lambda v: v @ fisher, starts, shifts, keep=2, tolerances=1e-10, max_iterations=500
    )
    assert bool(result.converged.all())
    eye = torch.eye(120, dtype=DTYPE)
    for index, shift in enumerate(shifts):
        exact = torch.linalg.solve(fisher + shift * eye, starts[:2].T).T
        error = (result.solutions[:, index] - exact).norm(dim=1) / exact.norm(dim=1)
        assert float(error.max()) < 1e-8
    residual = true_residuals(lambda v: v @ fisher, result, starts)
    assert residual.shape == (2, 3)
    assert float((residual / starts[:2].norm(dim=1, keepdim=True)).max()) < 1e-9


def test_the_tolerance_bounds_the_recomputed_residual_and_the_error():
    """Relative residual ρ: ``‖x − A⁻¹b‖ ≤ ρ‖b‖/σ`` (the bound the engine reports)."""
    fisher = low_rank_psd(decay=3.0, seed=2)
    shift = 1e-4
    b = torch.randn(1, 120, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    result = shifted_conjugate_gradients(lambda v: v @ fisher, b, [shift], tolerances=1e-6)
    residual = float(true_residuals(lambda v: v @ fisher, result, b)[0, 0])
    assert residual <= 10 * 1e-6 * float(b.norm())
    exact = torch.linalg.solve(fisher + shift * torch.eye(120, dtype=DTYPE), b[0])
    assert float((result.solutions[0, 0] - exact).norm()) <= residual / shift * (1 + 1e-6)


def test_gauss_quadrature_matches_the_spectral_sums():
    """``bᵀφ(F)b`` for ``1/(t + σ)``, ``log(1 + t/σ)`` and the KL's ``h``, from one run."""
    fisher = low_rank_psd(seed=4)
    shift = 2e-3
    b = torch.randn(1, 120, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    result = shifted_conjugate_gradients(lambda v: v @ fisher, b, [shift], tolerances=1e-8)
    functions = [
        lambda t: 1.0 / (t + shift),
        lambda t: torch.log1p(t / shift),
        lambda t: torch.log1p(t / shift) - t / (t + shift),
    ]
    found = result.quadrature(0, functions)
    for value, phi in zip(found.tolist(), functions, strict=True):
        assert value == pytest.approx(dense_quadratic(fisher, b[0], phi), rel=1e-7)
    # the quadrature of 1/(t + σ) is the iterate's own bᵀx
    assert float(found[0]) == pytest.approx(float(b[0] @ result.solutions[0, 0]), rel=1e-10)


def test_a_loose_tolerance_still_gives_accurate_quadratures():
    """At relative residual 1e-3 the KL's spectral term is already good to 1e-4 (the probes'
    own noise is several percent)."""
    fisher = low_rank_psd(dimension=200, rank=150, decay=3.0, seed=6)
    shift = 1e-3 * float(fisher.trace()) / 200
    z = rademacher(4, 200, torch.Generator().manual_seed(7), fisher)
    result = shifted_conjugate_gradients(lambda v: v @ fisher, z, [shift], keep=0, tolerances=1e-3)
    assert bool(result.converged.all())

    def h(t):
        return torch.log1p(t / shift) - t / (t + shift)

    for lane in range(4):
        found = float(result.quadrature(lane, [h])[0])
        assert found == pytest.approx(dense_quadratic(fisher, z[lane], h), rel=1e-4)


def test_finished_right_hand_sides_leave_the_batch():
    fisher = low_rank_psd(seed=8)
    starts = torch.randn(3, 120, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    sizes = []

    def apply(v):
        sizes.append(v.shape[0])
        return v @ fisher

    tolerances = torch.tensor([1e-8, 1e-2, 1e-2], dtype=DTYPE)
    result = shifted_conjugate_gradients(apply, starts, [1e-3], tolerances=tolerances)
    assert sizes[0] == 3 and sizes[-1] == 1
    assert int(result.iterations[0]) > int(result.iterations[1:].max())
    assert result.products == sum(sizes)


def test_zero_right_hand_side_and_invariant_subspace():
    """``b = 0`` stops at once with ``x = 0``; a ``b`` in a 2-dimensional invariant subspace
    converges in two steps."""
    fisher = torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=DTYPE))
    starts = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=DTYPE)
    result = shifted_conjugate_gradients(lambda v: v @ fisher, starts, [0.5], keep=2)
    assert result.iterations.tolist() == [0, 2]
    assert torch.equal(result.solutions[0, 0], torch.zeros(4, dtype=DTYPE))
    expected = torch.tensor([1 / 3.5, 1 / 1.5, 0.0, 0.0], dtype=DTYPE)
    assert torch.allclose(result.solutions[1, 0], expected, atol=1e-14)
    assert float(result.quadrature(0, [lambda t: t + 1])[0]) == 0.0


def test_iteration_budget_is_reported_not_hidden():
    fisher = low_rank_psd(decay=4.0, seed=10)
    b = torch.randn(1, 120, generator=torch.Generator().manual_seed(11), dtype=DTYPE)
    result = shifted_conjugate_gradients(
        lambda v: v @ fisher, b, [1e-7], tolerances=1e-12, max_iterations=5
    )
    assert not bool(result.converged[0]) and int(result.iterations[0]) == 5


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="Every shift must be positive"):
        shifted_conjugate_gradients(lambda v: v, torch.ones(1, 3, dtype=DTYPE), [0.0])


def test_gauss_rule_weights_sum_to_one():
    nodes, weights = gauss_rule(
        torch.tensor([2.0, 3.0, 1.0], dtype=DTYPE), torch.tensor([0.5, 0.25], dtype=DTYPE)
    )
    assert float(weights.sum()) == pytest.approx(1.0)
    assert bool((nodes >= 0).all())


def test_rademacher_signs():
    signs = rademacher(3, 1000, torch.Generator().manual_seed(0), torch.zeros(1, dtype=DTYPE))
    assert signs.dtype == DTYPE and set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(signs.mean())) < 0.1


def test_energy_and_trace_rules_bound_the_quadrature_error():
    """ENERGY: bᵀx^σ within ``tol`` of bᵀ(F + σI)⁻¹b; TRACE: ‖b‖² − σbᵀx^σ within ``tol`` of
    bᵀF(F + σI)⁻¹b; both stop earlier than a residual rule that would guarantee as much."""
    fisher = low_rank_psd(dimension=200, rank=100, decay=2.0, seed=12)
    shifts = [1e-3, 3e-3]
    b = torch.randn(2, 200, generator=torch.Generator().manual_seed(13), dtype=DTYPE)
    rules = torch.tensor([ENERGY, TRACE])
    result = shifted_conjugate_gradients(
        lambda v: v @ fisher, b, shifts, keep=0, tolerances=1e-4, rules=rules
    )
    assert bool(result.converged.all())
    # Gauss quadrature underestimates in exact arithmetic; the 267 float64 steps leave
    # rounding of about 1e-8 relative (measured), of either sign
    rounding = 1e-7
    for index, shift in enumerate(shifts):
        inverse = dense_quadratic(fisher, b[0], lambda t, s=shift: 1 / (t + s))
        energy = float(result.energies[0, index])
        assert -rounding <= (inverse - energy) / inverse <= 1e-4
        ratio = dense_quadratic(fisher, b[1], lambda t, s=shift: t / (t + s))
        found = float(b[1] @ b[1]) - shift * float(result.energies[1, index])
        assert -rounding <= (found - ratio) / ratio <= 1e-4
    strict = shifted_conjugate_gradients(lambda v: v @ fisher, b[:1], shifts, tolerances=1e-8)
    assert int(result.iterations[0]) < int(strict.iterations[0])

"""``keep_directions=True``: (A⁻¹g, B⁻¹g) per structure, damping and layer, against dense solves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from fisher_monitor import measure
from fisher_monitor.backends.backpack import BackpackNetwork
from fisher_monitor.likelihoods import resolve_loss


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 4)).double()
    inputs = torch.randn(8, 20, dtype=torch.float64)
    return model, inputs, torch.randint(0, 4, (8,))


def solve(matrix, damping, vector):
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return torch.linalg.solve(matrix + damping * eye, vector)


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_diag_and_block_directions_are_the_damped_solves(fisher):
    model, inputs, targets = problem()
    loss = nn.CrossEntropyLoss()
    result = measure(
        model,
        loss,
        inputs,
        targets,
        fisher=fisher,
        damping=[1e-3, 1e-1],
        keep_directions=True,
        keep_blocks=True,
        generator=torch.Generator().manual_seed(3),
    )
    for index, damping in enumerate((1e-3, 1e-1)):
        suffix = f"@{damping!r}"
        for name in ("0", "2"):
            fisher_block, ef_block, g = result.blocks[name]
            lam = result[f"block/damping{suffix}/{name}"]
            natural, empirical = result.directions["block"][index][name]
            torch.testing.assert_close(natural, solve(fisher_block, lam, g), rtol=1e-8, atol=0)
            torch.testing.assert_close(empirical, solve(ef_block, lam, g), rtol=1e-8, atol=0)
            f_diag, e_diag = torch.diagonal(fisher_block), torch.diagonal(ef_block)
            natural, empirical = result.directions["diag"][index][name]
            torch.testing.assert_close(natural, g / (f_diag + lam))
            torch.testing.assert_close(empirical, g / (e_diag + lam))
    # the exact blocks are the reference's
    if fisher == "exact":
        slices = reference.layer_slices(model)
        dense = reference.fisher(model, loss, inputs, targets)
        torch.testing.assert_close(result.blocks["0"][0], dense[slices["0"], slices["0"]])


def test_kron_directions_solve_the_kronecker_fisher():
    model, inputs, targets = problem()
    result = measure(
        model,
        nn.CrossEntropyLoss(),
        inputs,
        targets,
        structures=("kron",),
        keep_directions=True,
        keep_blocks=True,
    )
    network = BackpackNetwork(model, resolve_loss(nn.CrossEntropyLoss()))
    factors = {}
    try:
        network.sync()
        network.run(inputs, targets, True, 1, 0, lambda info, f: factors.__setitem__(info.name, f))
    finally:
        network.close()
    for name in ("0", "2"):
        kron = factors[name].kronecker()
        # a wide root's factor is left unformed (None): formed here from the root
        output_factor, input_factor = (
            root.T @ root if factor is None else factor
            for factor, root in (
                (kron.output_factor, kron.output_root),
                (kron.input_factor, kron.input_root),
            )
        )
        dense = torch.kron(output_factor, input_factor)  # augmented layout
        size = dense.shape[0]
        basis = torch.eye(size, dtype=torch.float64).view(size, output_factor.shape[0], -1)
        to_parameters = torch.stack([kron.order(row) for row in basis], dim=1)
        fisher_block = to_parameters @ dense @ to_parameters.T
        g = result.blocks[name][2]
        lam = result[f"kron/damping/{name}"]
        natural, empirical = result.directions["kron"][0][name]
        torch.testing.assert_close(natural, solve(fisher_block, lam, g), rtol=1e-9, atol=0)
        torch.testing.assert_close(
            empirical, solve(result.blocks[name][1], lam, g), rtol=1e-8, atol=0
        )


@pytest.mark.parametrize("dampings", [[1e-2], [1e-2, 1e-1], [1e-3, 1e-2, 1e-1]])
def test_block_directions_reuse_the_statistics_solve_on_the_gram_route(monkeypatch, dampings):
    """Few dampings on the Gram route: A⁻¹g comes from the statistics' own Cholesky solves."""
    import fisher_monitor.structures.block.gram_route as lowrank
    import fisher_monitor.structures.block.structure as block

    calls = {"cholesky": 0, "root": 0}
    original_cholesky = lowrank._coefficients_cholesky

    def counted_cholesky(*args, **kwargs):
        calls["cholesky"] += 1
        return original_cholesky(*args, **kwargs)

    def no_root(*args, **kwargs):
        calls["root"] += 1
        return None  # force the Gram route

    monkeypatch.setattr(lowrank, "_coefficients_cholesky", counted_cholesky)
    monkeypatch.setattr(block, "_root_route", no_root)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    inputs, targets = torch.randn(24, 12, dtype=torch.float64), torch.randint(0, 5, (24,))
    result = measure(
        model,
        nn.CrossEntropyLoss(),
        inputs,
        targets,
        structures=("block",),
        damping=dampings,
        keep_directions=True,
        keep_blocks=True,
    )
    # layer 0 (208 parameters, rank 96) takes the Gram route; layer 2 (85) is formed densely
    assert calls["cholesky"] == 1 and calls["root"] == 2
    for index, damping in enumerate(dampings):
        suffix = f"@{damping!r}" if len(dampings) > 1 else ""
        for name in ("0", "2"):
            fisher_block, ef_block, g = result.blocks[name]
            lam = result[f"block/damping{suffix}/{name}"]
            natural, empirical = result.directions["block"][index][name]
            expected = solve(fisher_block, lam, g)
            torch.testing.assert_close(natural, expected, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(empirical, solve(ef_block, lam, g), rtol=1e-8, atol=1e-12)

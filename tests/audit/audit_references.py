"""Dense float64 references for the audit tests on a tiny network.

Every expected value is computed here from the definitions: dense F (the GGN) and EF from
``reference`` (torch.func, no fisher_monitor code), full ``D × D`` solves for the
natural-gradient and EF directions (``all`` as one block-diagonal system, not as a
concatenation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import reference
from fisher_monitor.layers import LayerInfo
from fisher_monitor.measurement import Measurement

LOSS = nn.CrossEntropyLoss()
LAYERS = {"0": ("0.weight", "0.bias"), "2": ("2.weight", "2.bias")}
TOLERANCE = 1e-10


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def make_batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


def layer_infos(model: nn.Module) -> list[LayerInfo]:
    params = dict(model.named_parameters())
    return [
        LayerInfo(
            name,
            "Linear",
            names,
            tuple(tuple(params[n].shape) for n in names),
            sum(params[n].numel() for n in names),
        )
        for name, names in LAYERS.items()
    ]


@dataclass
class Dense:
    """Dense F, EF, per-sample gradients and mean gradient of the whole network."""

    F: Tensor
    EF: Tensor
    per_sample: Tensor
    g: Tensor
    slices: dict[str, slice]


def dense(model: nn.Module, x: Tensor, y: Tensor) -> Dense:
    per_sample = reference.per_sample_gradients(model, LOSS, x, y)
    return Dense(
        F=reference.fisher(model, LOSS, x, y),
        EF=per_sample.T @ per_sample / x.shape[0],
        per_sample=per_sample,
        g=per_sample.mean(dim=0),
        slices=reference.layer_slices(model),
    )


def restricted(matrix: Tensor, structure: str, slices: dict[str, slice]) -> Tensor:
    """F_S or EF_S as a full D × D matrix (diagonal, or block-diagonal over layers)."""
    if structure == "diag":
        return torch.diag(torch.diagonal(matrix))
    out = torch.zeros_like(matrix)
    for s in slices.values():
        out[s, s] = matrix[s, s]
    return out


def damping_vector(reference_dense: Dense, damping: float) -> Tensor:
    """λ_b = damping · tr(F_b)/D_b on the coordinates of layer b (relative damping)."""
    lam = torch.zeros(reference_dense.g.numel(), dtype=torch.float64)
    for s in reference_dense.slices.values():
        lam[s] = damping * torch.trace(reference_dense.F[s, s]) / (s.stop - s.start)
    return lam


def full_directions(d: Dense, structure: str, damping: float) -> tuple[Tensor, Tensor]:
    """(A⁻¹g, B⁻¹g) of the whole network, one solve with the block-diagonal A and B."""
    lam = torch.diag(damping_vector(d, damping))
    natural = torch.linalg.solve(restricted(d.F, structure, d.slices) + lam, d.g)
    empirical = torch.linalg.solve(restricted(d.EF, structure, d.slices) + lam, d.g)
    return natural, empirical


def hand_measurement(
    model: nn.Module, d: Dense, structures=("diag", "block"), dampings=(1e-3,)
) -> Measurement:
    """A Measurement with the true gradient, diagonals and per-layer directions."""
    directions = {}
    for structure in structures:
        directions[structure] = []
        for damping in dampings:
            per_layer = {}
            for layer, s in d.slices.items():
                lam = damping * torch.trace(d.F[s, s]) / (s.stop - s.start)
                eye = lam * torch.eye(s.stop - s.start, dtype=torch.float64)
                fisher = restricted(d.F[s, s], structure, {layer: slice(None)})
                empirical = restricted(d.EF[s, s], structure, {layer: slice(None)})
                per_layer[layer] = (
                    torch.linalg.solve(fisher + eye, d.g[s]),
                    torch.linalg.solve(empirical + eye, d.g[s]),
                )
            directions[structure].append(per_layer)
    return Measurement(
        scalars={},
        layers=layer_infos(model),
        diagonals={
            layer: (torch.diagonal(d.F)[s].clone(), torch.diagonal(d.EF)[s].clone())
            for layer, s in d.slices.items()
        },
        settings={
            "structures": list(structures),
            "damping": list(dampings) if len(dampings) > 1 else dampings[0],
            "damping_mode": "relative",
        },
        gradient={layer: d.g[s].clone() for layer, s in d.slices.items()},
        directions=directions,
    )


def cosine(u: Tensor, v: Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


def flat(update: dict[str, Tensor]) -> Tensor:
    return torch.cat([update[n].reshape(-1) for names in LAYERS.values() for n in names])


def expected_update_cosines(d: Dense, delta: Tensor, structures, dampings) -> dict[str, float]:
    several = len(dampings) > 1
    scopes = {**d.slices, "all": slice(0, d.g.numel())}
    out = {}
    for structure in structures:
        for damping in dampings:
            natural, empirical = full_directions(d, structure, damping)
            suffix = f"@{damping!r}" if several else ""
            for scope, s in scopes.items():
                out[f"{structure}/update_nat_cosine{suffix}/{scope}"] = cosine(
                    delta[s], -natural[s]
                )
                out[f"{structure}/update_ef_cosine{suffix}/{scope}"] = cosine(
                    delta[s], -empirical[s]
                )
                out[f"{structure}/update_grad_cosine/{scope}"] = cosine(delta[s], -d.g[s])
    return out


def as_update(model: nn.Module, vector: Tensor) -> dict[str, Tensor]:
    """Split a flat vector into per-parameter pieces of ``model``'s shapes."""
    named = list(model.named_parameters())
    pieces = torch.split(vector, [p.numel() for _, p in named])
    return {n: piece.reshape(p.shape) for (n, p), piece in zip(named, pieces, strict=True)}


def last_update(model: nn.Module, optimizer, batches) -> tuple[dict, dict]:
    """Step through ``batches``; return θ before the last step and that step's Δθ."""
    for x, y in batches:
        optimizer.zero_grad()
        LOSS(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
    return before, {n: p.detach() - before[n] for n, p in model.named_parameters()}


def at(model: nn.Module, values: dict[str, Tensor]) -> nn.Module:
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in copied.named_parameters():
            parameter.copy_(values[name])
    return copied


def two_groups(model, **second):
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), **second},
    ]

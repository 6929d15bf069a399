"""Data-parallel diagonals: pack every layer's sums into one tensor for one all-reduce."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fisher_monitor.layers import LayerInfo

#: Per layer name: ``(diag F, diag EF, g)``.
Diagonals = dict[str, tuple[Tensor, Tensor, Tensor]]


def reduce_diagonals(
    local: Diagonals,
    all_layers: list[LayerInfo],
    loss: float,
    batch_size: float,
    all_reduce: Callable[[Tensor], Tensor],
    summed_loss: bool,
) -> tuple[Diagonals, float, float]:
    """Average diagonals and gradients over all processes, weighted by batch size.

    Every process contributes every layer of the network (zeros for a layer no gradient
    reached there), so all of them pass tensors of the same size to ``all_reduce``. The
    loss is averaged the same way for a ``"mean"`` loss and added up for a ``"sum"`` loss,
    as the loss of the joined batch would be.

    Returns:
        The reduced ``(diag F, diag EF, g)`` of the layers measured somewhere, the loss of
        the joined batch, and the joined batch size.
    """
    device = next(iter(local.values()))[0].device if local else torch.device("cpu")
    dtype = torch.float64
    head = torch.tensor(
        [batch_size, loss if summed_loss else loss * batch_size, 1.0 if local else 0.0],
        dtype=dtype,
        device=device,
    )
    parts = [head]
    for info in all_layers:
        measured = info.name in local
        parts.append(torch.tensor([1.0 if measured else 0.0], dtype=dtype, device=device))
        for index in range(3):
            if measured:
                parts.append(local[info.name][index].detach().to(dtype).reshape(-1) * batch_size)
            else:
                parts.append(torch.zeros(info.dimension, dtype=dtype, device=device))
    total = all_reduce(torch.cat(parts))
    total_size = float(total[0])
    joined_loss = float(total[1]) if summed_loss else float(total[1]) / total_size
    offset = 3
    reduced: Diagonals = {}
    for info in all_layers:
        measured_somewhere = float(total[offset]) > 0
        offset += 1
        tensors = []
        for _ in range(3):
            tensors.append(total[offset : offset + info.dimension] / total_size)
            offset += info.dimension
        if measured_somewhere:
            reduced[info.name] = (tensors[0], tensors[1], tensors[2])
    return reduced, joined_loss, total_size


__all__ = ["Diagonals", "reduce_diagonals"]

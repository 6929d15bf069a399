"""Statistics of diagonal F and EF (the ``diag`` structure).

With ``f = diag F``, ``e = diag EF`` and the mean gradient ``g`` of one layer, the damped
matrices are ``A = diag(f) + λ`` and ``B = diag(e) + λ``, so every quantity is a sum of
elementwise terms. The per-sample projection needs no per-sample gradients:
``(1/N) Σ_n g_nᵀ B⁻¹ g_n = Σ_i e_i / (e_i + λ)`` because ``e_i = (1/N) Σ_n g_{n,i}²``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from fisher_monitor.metrics import DampedStatistics, LayerStatistics

#: Entries per chunk of the CPU pass: the chunk's float64 rows (a few per damping) stay in
#: the processor's cache while every sum is taken from them. The pass runs on torch's
#: intra-op threads like the rest of the measurement: on a quiet 2-core AVX-512 machine two
#: threads take 5.3 ms for 536k entries against 11.3 ms for one (16% slower than one while
#: another process keeps a core busy).
DIAGONAL_CHUNK = 1 << 17

#: Entries per chunk elsewhere (CUDA): few, large kernels, with the float64 rows of one
#: chunk (about ``(8 + 4·dampings) × 32 MiB``) bounded whatever the layer's size.
DEVICE_CHUNK = 1 << 22

_workspaces = threading.local()


def _workspace(rows: int, chunk: int) -> Tensor:
    """A reused, contiguous ``rows × chunk`` float64 CPU buffer (no fresh pages per call).

    Carved from the start of one flat buffer, so that its layout (and with it the last bits
    of the BLAS sums over it) depends only on ``rows × chunk``, not on the calls before.
    """
    buffer = getattr(_workspaces, "buffer", None)
    if buffer is None or buffer.numel() < rows * chunk:
        buffer = torch.empty(rows * chunk, dtype=torch.float64)
        _workspaces.buffer = buffer
    return buffer[: rows * chunk].view(rows, chunk)


class _Layout:
    """Rows of the per-chunk float64 matrix and slots of the per-chunk sums.

    Rows: ``g, (A⁻¹g, B⁻¹g) per damping, e, f, 1/(e+λ) per damping, e − f,
    u − log(1+u) per damping, 1, scratch``; products of contiguous row ranges with one
    vector are single matrix-vector products.
    """

    def __init__(self, dampings: int):
        self.dampings = dampings
        self.g = 0
        self.e = 1 + 2 * dampings
        self.f = self.e + 1
        self.inv_e = self.f + 1
        self.diff = self.inv_e + dampings
        self.kl = self.diff + 1
        self.ones = self.kl + dampings
        self.scratch = self.ones + 1
        self.rows = self.scratch + 1
        # slots: [g·(g, A⁻¹g, B⁻¹g …)], [e·(e, f, 1/(e+λ) …)], [1·(e, f, …, u − log(1+u) …)],
        # f·f, (e−f)·(e−f), then per damping A⁻¹g·(A⁻¹g, B⁻¹g) and B⁻¹g·B⁻¹g
        self.with_g = 0
        self.with_e = self.with_g + self.e
        self.with_ones = self.with_e + (self.diff - self.e)
        self.f_sq = self.with_ones + (self.ones - self.e)
        self.diff_sq = self.f_sq + 1
        self.cross = self.diff_sq + 1
        self.slots = self.cross + 3 * dampings

    def nat(self, index: int) -> int:
        return 1 + 2 * index

    def ef(self, index: int) -> int:
        return 2 + 2 * index


def diagonal_statistics(
    fisher: Tensor, empirical: Tensor, gradient: Tensor, dampings: Sequence[float]
) -> LayerStatistics:
    r"""Additive statistics of ``F_S = diag(fisher)`` against ``EF_S = diag(empirical)``.

    The KL divergence is evaluated as ``½ Σ_i [u_i − log(1 + u_i)]`` with
    ``u_i = (e_i − f_i) / (f_i + λ)``, which equals
    ``½[tr(B A⁻¹) − D + log det A − log det B]`` without the cancellation of the
    ``− D`` term.

    The inputs may be of any floating-point type (float32 as the network computed
    them): every sum is accumulated in float64. On the CPU the entries are processed in
    chunks of :data:`DIAGONAL_CHUNK` converted into a reused float64 buffer, where the
    vectors ``f, e, g, e − f`` and, per damping, ``A⁻¹g``, ``B⁻¹g``, ``1/(e + λ)`` and
    ``u − log(1 + u)`` are rows, and every sum is one of a few matrix-vector products of
    contiguous rows; no array of the layer's size is allocated. Elsewhere (CUDA) the
    chunks are :data:`DEVICE_CHUNK` long.

    Args:
        fisher: Diagonal of the Fisher, any shape (flattened).
        empirical: Diagonal of the empirical Fisher, same number of entries.
        gradient: Mean gradient ``g``, same number of entries.
        dampings: Damping values λ (> 0) of this layer.

    Returns:
        The layer's additive statistics (float64).
    """
    f = fisher.reshape(-1)
    e = empirical.reshape(-1)
    g = gradient.reshape(-1)
    size = f.numel()
    layout = _Layout(len(dampings))
    device = f.device
    chunk = max(1, min(size, DIAGONAL_CHUNK if device.type == "cpu" else DEVICE_CHUNK))
    if device.type == "cpu":
        z = _workspace(layout.rows, chunk)
    else:  # the caching allocator reuses the memory
        z = torch.empty(layout.rows, chunk, dtype=torch.float64, device=device)
    z[layout.ones].fill_(1.0)
    starts = range(0, size, chunk)
    partial = torch.zeros(max(1, len(starts)), layout.slots, dtype=torch.float64, device=device)
    for row, start in enumerate(starts):
        stop = min(start + chunk, size)
        block = z[:, : stop - start]
        out = partial[row]
        _chunk_sums(block, f[start:stop], e[start:stop], g[start:stop], dampings, layout, out)
    sums = partial.sum(dim=0)
    e_slot = layout.with_e
    ones_slot = layout.with_ones
    damped = []
    for index, damping in enumerate(dampings):
        nat, ef = layout.nat(index), layout.ef(index)
        cross = layout.cross + 3 * index
        damped.append(
            DampedStatistics(
                damping_mass=torch.as_tensor(damping * size, dtype=torch.float64, device=device),
                kl=0.5 * sums[ones_slot + (layout.kl - layout.e) + index],
                grad_sq=sums[layout.with_g],
                nat_sq=sums[cross],
                ef_sq=sums[cross + 2],
                nat_ef=sums[cross + 1],
                nat_projection=sums[layout.with_g + nat],
                ef_projection=sums[layout.with_g + ef],
                ef_projection_per_sample=sums[e_slot + 2 + index],
            )
        )
    return LayerStatistics(
        dimension=size,
        trace_f=sums[ones_slot + 1],
        trace_ef=sums[ones_slot],
        frob_f_sq=sums[layout.f_sq],
        frob_ef_sq=sums[e_slot],
        inner=sums[e_slot + 1],
        frob_diff_sq=sums[layout.diff_sq],
        damped=damped,
    )


def _chunk_sums(
    block: Tensor,
    f: Tensor,
    e: Tensor,
    g: Tensor,
    dampings: Sequence[float],
    layout: _Layout,
    out: Tensor,
) -> None:
    """Every sum of one chunk, written into ``out`` (the chunk's row of partial sums)."""
    row_g, row_e, row_f, row_diff = (block[i] for i in (layout.g, layout.e, layout.f, layout.diff))
    scratch = block[layout.scratch]
    row_g.copy_(g)
    row_e.copy_(e)
    row_f.copy_(f)
    torch.sub(row_e, row_f, out=row_diff)
    for index, damping in enumerate(dampings):
        nat, ef = block[layout.nat(index)], block[layout.ef(index)]
        inv_e, kl = block[layout.inv_e + index], block[layout.kl + index]
        torch.add(row_f, damping, out=scratch).reciprocal_()  # 1/(f+λ)
        torch.mul(row_g, scratch, out=nat)  # A⁻¹g
        torch.mul(row_diff, scratch, out=kl)  # u = (e − f)/(f + λ) > −1
        kl.sub_(torch.log1p(kl, out=scratch))
        torch.add(row_e, damping, out=inv_e).reciprocal_()
        torch.mul(row_g, inv_e, out=ef)  # B⁻¹g
    torch.mv(block[: layout.e], row_g, out=out[layout.with_g : layout.with_e])
    torch.mv(block[layout.e : layout.diff], row_e, out=out[layout.with_e : layout.with_ones])
    torch.mv(
        block[layout.e : layout.ones], block[layout.ones], out=out[layout.with_ones : layout.f_sq]
    )
    torch.dot(row_f, row_f, out=out[layout.f_sq])
    torch.dot(row_diff, row_diff, out=out[layout.diff_sq])
    for index in range(len(dampings)):
        nat_row = layout.nat(index)
        cross = layout.cross + 3 * index
        torch.mv(block[nat_row : nat_row + 2], block[nat_row], out=out[cross : cross + 2])
        torch.dot(block[nat_row + 1], block[nat_row + 1], out=out[cross + 2])

"""The few collectives the callback needs under data parallelism (``torch.distributed``).

Every function is a no-op on a single process. Collectives must be entered by every
process in the same order; :func:`all_agree` lets the processes decide together whether to
go ahead, so that one process failing to prepare its probe batch cannot leave the others
waiting in a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def _collective_device(device: torch.device) -> torch.device:
    # NCCL communicates CUDA tensors only; gloo both
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes (a new tensor; the input is left alone)."""
    if not is_distributed():
        return tensor.clone()
    out = tensor.detach().clone().to(_collective_device(tensor.device))
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_agree(ok: bool) -> bool:
    """Whether every process reports ``ok`` (a collective: all processes must call it)."""
    if not is_distributed():
        return ok
    device = _collective_device(torch.device("cpu"))
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0.5)


def decision_of_rank_zero(decision: bool) -> bool:
    """Rank zero's ``decision``, on every process (a collective: all processes must call it).

    Used for decisions that depend on a process's own clock (the budget schedule), so that
    every process measures at the same steps.
    """
    if not is_distributed():
        return decision
    device = _collective_device(torch.device("cpu"))
    flag = torch.tensor([1.0 if decision else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item() > 0.5)


def gather_texts(text: str | None) -> list[str | None]:
    """Every process's ``text`` (or ``None``), in rank order, on every process.

    A collective: all processes must call it. Used to bring the cause of a failure on one
    process to rank zero, which is the only one that warns. Texts are UTF-8 encoded into
    rank-indexed slots and summed (no ``all_gather``; see :func:`gather_batch`).

    Args:
        text: This process's message, or ``None`` when it has nothing to say.

    Returns:
        One entry per process.
    """
    if not is_distributed():
        return [text]
    device = _collective_device(torch.device("cpu"))
    world, me = dist.get_world_size(), dist.get_rank()
    data = b"" if text is None else text.encode("utf-8")[:4096]
    lengths = torch.zeros(world, dtype=torch.long, device=device)
    lengths[me] = len(data) + (0 if text is None else 1)  # 0: None, 1 + n: n bytes
    dist.all_reduce(lengths, op=dist.ReduceOp.SUM)
    longest = max(int(lengths.max().item()) - 1, 1)
    slots = torch.zeros((world, longest), dtype=torch.int32, device=device)
    if data:
        slots[me, : len(data)] = torch.tensor(list(data), dtype=torch.int32)
    dist.all_reduce(slots, op=dist.ReduceOp.SUM)
    texts: list[str | None] = []
    for r in range(world):
        size = int(lengths[r].item())
        raw = bytes(slots[r, : max(size - 1, 0)].cpu().tolist())
        texts.append(None if size == 0 else raw.decode("utf-8", errors="replace"))
    return texts


def gather_batch(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` along dimension 0, in rank order.

    Batches may differ in size between processes (e.g. the last batch of an epoch).

    Args:
        tensor: This process's tensor; all processes must pass the same trailing shape
            and dtype.

    Returns:
        The joined tensor, identical on every process, on ``tensor``'s device.
    """
    if not is_distributed():
        return tensor
    # all_reduce of rank-indexed slots rather than all_gather: with gloo, all_gather left
    # a thread behind that aborted the process at exit (torch 2.14, "terminate called
    # without an active exception"); probe batches are small, so the extra traffic is too
    device = _collective_device(tensor.device)
    world, me = dist.get_world_size(), dist.get_rank()
    # every process must bring the same trailing shape (e.g. not per-batch padded sequences);
    # all of them find out together, so none is left waiting in the gather below
    shape = torch.full((9,), -1, dtype=torch.long, device=device)
    shape[0] = tensor.dim()
    shape[1 : tensor.dim()] = torch.tensor(tensor.shape[1:9], dtype=torch.long)
    highest, lowest = shape.clone(), shape.clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    if not torch.equal(highest, lowest):
        raise ValueError(
            "The processes' probe batches have different shapes beyond the batch dimension "
            f"(this process: {tuple(tensor.shape)}), so they cannot be joined for the block or "
            "Kronecker structures. Use a fixed `probe_data`, pad to a common length, or "
            "measure structures=('diag',) only."
        )
    sizes = torch.zeros(world, dtype=torch.long, device=device)
    sizes[me] = tensor.shape[0]
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM)
    longest = int(sizes.max().item())
    slots = torch.zeros((world, longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    slots[me, : tensor.shape[0]] = tensor.to(device)
    dist.all_reduce(slots, op=dist.ReduceOp.SUM)
    joined = torch.cat([slots[r, : int(sizes[r].item())] for r in range(world)])
    return joined.to(tensor.device)

"""DDP with two CPU processes (gloo): logged metrics equal one process on the joined batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fisher_monitor import measure
from fisher_monitor.keys import CONSTANT_METRICS, parse_key
from lightning_helpers import TinyClassifier

SCRIPT = Path(__file__).parent / "ddp_script.py"

pytestmark = pytest.mark.slow


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ddp(tmp_path: Path, structures: str, mode: str = "every") -> None:
    # an explicit free port: two DDP runs on one machine must not meet on Lightning's default
    env = dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), structures, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # both processes measured at the same steps
    assert torch.load(tmp_path / "steps_0.pt") == torch.load(tmp_path / "steps_1.pt")


@pytest.mark.parametrize("structures", ["diag", "diag,block,kron"])
def test_ddp_metrics_equal_single_process_on_joined_batch(tmp_path, structures):
    run_ddp(tmp_path, structures)
    for step in range(3):
        logged = torch.load(tmp_path / f"metrics_{step}.pt")
        inputs0, targets0 = torch.load(tmp_path / f"batch_0_{step}.pt")
        inputs1, targets1 = torch.load(tmp_path / f"batch_1_{step}.pt")
        assert not torch.equal(inputs0, inputs1)  # the processes saw different data
        net = TinyClassifier().net
        net.load_state_dict(torch.load(tmp_path / f"weights_{step}.pt"))
        joined = measure(
            net,
            nn.CrossEntropyLoss(),
            torch.cat([inputs0, inputs1]),
            torch.cat([targets0, targets1]),
            structures=tuple(structures.split(",")),
        )
        assert logged["~fisher/probe/batch_size"] == len(targets0) + len(targets1)
        for key, value in joined.scalars.items():
            parsed = parse_key(key)
            if key == "probe/seconds" or (parsed and parsed.metric in CONSTANT_METRICS):
                continue
            assert logged[f"~fisher/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-8), key


def test_ddp_budget_schedule_is_decided_on_rank_zero(tmp_path):
    run_ddp(tmp_path, "diag", "budget")
    steps = torch.load(tmp_path / "steps_0.pt")
    assert steps[0] == 0 and len(steps) >= 1


@pytest.mark.parametrize("structures", ["diag", "diag,block"])
def test_ddp_failure_on_one_process_names_its_cause_on_rank_zero(tmp_path, structures):
    run_ddp(tmp_path, structures, "fail")  # training completes
    warnings = (tmp_path / "warnings.txt").read_text()
    assert "FloatingPointError" in warnings and "another process failed" not in warnings
    if structures == "diag":  # only process 1 failed: rank 0 reports its cause
        assert "(on process 1: FloatingPointError" in warnings
    assert torch.load(tmp_path / "steps_0.pt") == []


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from fisher_monitor import distributed

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        mine = torch.arange(3 + rank * 2, dtype=torch.float64).reshape(-1, 1) + 100 * rank
        joined = distributed.gather_batch(mine)
        summed = distributed.all_reduce_sum(torch.tensor([rank + 1.0]))
        agreed = distributed.all_agree(rank == 0)
        decided = distributed.decision_of_rank_zero(rank == 0)
        texts = distributed.gather_texts("ünïcode on 0" if rank == 0 else None)
        try:  # sequences padded to different lengths cannot be joined: every process says so
            distributed.gather_batch(torch.zeros(2, 3 + rank))
            mismatch = None
        except ValueError as error:
            mismatch = str(error)
        torch.save((joined, summed, agreed, mismatch, decided, texts), f"{out}/gather_{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_collectives_with_uneven_batches(tmp_path):
    torch.multiprocessing.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    expected = torch.cat([torch.arange(3.0), torch.arange(5.0) + 100]).reshape(-1, 1).double()
    for rank in range(2):
        joined, summed, agreed, mismatch, decided, texts = torch.load(
            tmp_path / f"gather_{rank}.pt", weights_only=False
        )
        assert torch.equal(joined, expected)
        assert summed.item() == 3.0
        assert agreed is False  # one process said no
        assert "different shapes beyond the batch dimension" in mismatch
        assert decided is True  # rank 0's decision on both
        assert texts == ["ünïcode on 0", None]

"""One measurement on every process: who measures what, and agreeing on failures.

Under data parallelism every process must enter the same collectives in the same order,
even when one of them fails. The protocol of one attempt:

1. every process takes its probe batch and the processes agree that all of them could
   (:func:`fisher_monitor.distributed.all_agree`);
2. with ``structures=("diag",)`` each process measures its own batch and the diagonal
   sums are all-reduced before any ratio (a process that fails before the all-reduce says
   so, and the others give up with :class:`~.failures.PeerFailed`); with ``"block"`` or
   ``"kron"`` the batches are gathered and every process measures the joined batch;
3. the processes exchange their causes of failure as text, so that every one takes the
   same decision and rank zero can name the real cause in its warning.

On a single process the collectives are no-ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fisher_monitor import distributed
from fisher_monitor.batching import map_tensors
from fisher_monitor.callback.failures import PeerFailed, describe
from fisher_monitor.engine import Measurer
from fisher_monitor.measurement import Measurement
from fisher_monitor.settings import Structure


@dataclass
class Outcome:
    """The result of one attempt, the same decision on every process.

    Attributes:
        measurement: The measurement, or ``None`` when any process failed.
        error: This process's exception (a :class:`PeerFailed` when only others failed).
        causes: Per process, its cause of failure as text (``None``: it did not fail).
        stage: ``"batch"`` when taking the probe batch failed, else ``"measure"``.
    """

    measurement: Measurement | None
    error: BaseException | None
    causes: list[str | None]
    stage: str = "measure"


def shared_causes(error: BaseException | None) -> list[str | None]:
    """Every process's cause of failure (a collective under data parallelism)."""
    return distributed.gather_texts(describe(error))


def measure_everywhere(
    measurer: Measurer,
    take_probe: Callable[[], tuple[Any, Tensor]],
    generator: torch.Generator,
    **options: Any,
) -> Outcome:
    """Take the probe batch and measure it, on every process.

    Args:
        measurer: The prepared measurer (one per process).
        take_probe: Returns this process's ``(inputs, targets)``.
        generator: The monitor's generator (label sampling, dropout masks).
        **options: Passed to the measurer (e.g. ``keep_directions``).

    Returns:
        The outcome, identical in its decision on every process.
    """
    error: BaseException | None = None
    try:
        inputs, targets = take_probe()
    except Exception as exception:  # noqa: BLE001 - every process must hear about it
        error = exception
    if not distributed.all_agree(error is None):
        return Outcome(None, error or PeerFailed(), shared_causes(error), "batch")
    measurement = None
    try:
        measurement = _measure(measurer, inputs, targets, generator, **options)
    except Exception as exception:  # noqa: BLE001
        error = exception
    causes = shared_causes(error)
    if error is not None or any(causes):
        return Outcome(None, error or PeerFailed(), causes)
    return Outcome(measurement, None, causes)


def _measure(
    measurer: Measurer, inputs: Any, targets: Tensor, generator: torch.Generator, **options: Any
) -> Measurement:
    if not distributed.is_distributed():
        return measurer(inputs, targets, generator=generator, **options)
    if measurer.settings.structures == (Structure.DIAG,):
        return _measure_diagonal(measurer, inputs, targets, generator, **options)
    joined_inputs = map_tensors(inputs, distributed.gather_batch)
    joined_targets = distributed.gather_batch(targets)
    return measurer(joined_inputs, joined_targets, generator=generator, **options)


def _measure_diagonal(
    measurer: Measurer, inputs: Any, targets: Tensor, generator: torch.Generator, **options: Any
) -> Measurement:
    """Local pass per process, diagonals summed across processes before any ratio."""
    # independent labels per process: fold the rank into this measurement's seed
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    local = torch.Generator().manual_seed(seed + distributed.rank())
    reached = []

    def all_reduce(flat: Tensor) -> Tensor:
        reached.append(True)
        if not distributed.all_agree(True):
            raise PeerFailed()
        return distributed.all_reduce_sum(flat)

    try:
        return measurer(inputs, targets, generator=local, all_reduce=all_reduce, **options)
    except Exception:
        if not reached:  # the others wait in `all_agree`: tell them to give up too
            distributed.all_agree(False)
        raise

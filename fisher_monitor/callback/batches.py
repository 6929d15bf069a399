"""The probe batch: splitting training batches, the fixed probe set, the probe size."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from fisher_monitor import distributed
from fisher_monitor.batching import map_tensors, take_samples
from fisher_monitor.callback.recipe import labelled_only

_INPUT_KEYS = ("inputs", "input", "x", "features", "images", "image", "data")
_TARGET_KEYS = ("targets", "target", "y", "labels", "label")

Splitter = Callable[[Any], tuple[Any, Tensor]]


def default_batch_to_inputs_targets(batch: Any) -> tuple[Any, Tensor]:
    """Split a training batch into ``(inputs, targets)``.

    Handles ``(inputs, targets, ...)`` tuples and lists, and mappings with one of the keys
    ``inputs``/``input``/``x``/``features``/``images``/``image``/``data`` and one of
    ``targets``/``target``/``y``/``labels``/``label``. For other batches, e.g.
    ``(x, mask, y)``, pass your own, e.g.
    ``batch_to_inputs_targets=lambda batch: ((batch[0], batch[1]), batch[2])`` (a tuple
    of inputs is passed to ``forward`` as positional arguments).

    Args:
        batch: What the dataloader yields.

    Returns:
        ``(inputs, targets)``.

    Raises:
        ValueError: If the batch has none of these forms.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        inputs = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        targets = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if inputs is not None and targets is not None:
            return inputs, targets
        keys = sorted(map(str, batch))
        raise ValueError(
            f"`FisherMonitor` cannot find inputs and targets in a batch with keys {keys}: it "
            f"looks for one of {_INPUT_KEYS} and one of {_TARGET_KEYS}. Pass "
            "`batch_to_inputs_targets=lambda batch: (inputs, targets)`."
        )
    raise ValueError(
        f"`FisherMonitor` cannot split a batch of type {type(batch).__name__} into "
        "(inputs, targets). Pass `batch_to_inputs_targets=lambda batch: (inputs, targets)`."
    )


class ProbeSource:
    """Where each measurement's probe batch comes from.

    Args:
        splitter: ``batch -> (inputs, targets)``.
        probe_size: At most this many samples (the first ones), or ``None``.
        probe_data: A fixed probe set (a ``DataLoader``, whose first batch is taken once,
            or an ``(inputs, targets)`` pair), or ``None`` for the training batch.

    Attributes:
        likelihood: The measured likelihood, once known: samples whose every target it
            ignores (``ignore_index``) are left out of the probe.
    """

    def __init__(self, splitter: Splitter, probe_size: int | None, probe_data: Any) -> None:
        self.splitter = splitter
        self.probe_size = probe_size
        self.probe_data = probe_data
        self.likelihood: Any = None
        self._fixed: tuple[Any, Tensor] | None = None

    @property
    def fixed(self) -> bool:
        """Whether a fixed probe set is used."""
        return self.probe_data is not None

    def prepare(self) -> None:
        """Take the fixed probe set (this process's share under data parallelism)."""
        if self.probe_data is None or self._fixed is not None:
            return
        if isinstance(self.probe_data, torch.utils.data.DataLoader):
            with torch.random.fork_rng(devices=[]):  # a shuffling sampler draws a seed
                batch = next(iter(self.probe_data))
            inputs, targets = self.splitter(batch)
        else:
            inputs, targets = self.probe_data
        if distributed.is_distributed():  # each process takes its share of the probe set
            world, rank = torch.distributed.get_world_size(), distributed.rank()
            inputs = map_tensors(inputs, lambda t: t[rank::world])
            targets = targets[rank::world]
        self._fixed = (inputs, targets)

    def take(self, batch: Any) -> tuple[Any, Tensor]:
        """The probe batch of a step.

        Args:
            batch: The training batch of the step (ignored with a fixed probe set).

        Returns:
            ``(inputs, targets)``, cut to ``probe_size`` samples.

        Raises:
            ValueError: If the targets are not a tensor, or the batch cannot be split.
        """
        if self.probe_data is not None:
            self.prepare()
            assert self._fixed is not None
            inputs, targets = self._fixed
        else:
            inputs, targets = self.splitter(batch)
        if not isinstance(targets, Tensor):
            raise ValueError(
                f"`FisherMonitor` needs the targets as a tensor, got {type(targets).__name__}. "
                "Pass `batch_to_inputs_targets=lambda batch: (inputs, targets)`."
            )
        inputs, targets = labelled_only(inputs, targets, self.likelihood)
        size = int(targets.shape[0]) if targets.dim() else 0
        if self.probe_size is not None and size > self.probe_size:
            inputs = take_samples(inputs, self.probe_size, size)  # shared tensors stay whole
            targets = targets[: self.probe_size]
        return inputs, targets

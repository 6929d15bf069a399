"""Checks of ``FisherMonitor``'s arguments, at construction.

Every message names the argument, shows the bad value with ``!r`` and says what is
allowed, so that a misconfiguration fails before training starts rather than quietly
producing an empty monitor.
"""

from __future__ import annotations

from typing import Any

import torch

from fisher_monitor import keys
from fisher_monitor.schedules import Schedule, budget, every
from fisher_monitor.settings import MeasureSettings, is_whole_number


def check_schedule(every_n_steps: Any, schedule: Any) -> Schedule:
    """The schedule: ``schedule``, ``every(every_n_steps)`` or the default ``budget()``."""
    if every_n_steps is not None and schedule is not None:
        raise ValueError("Pass either `every_n_steps` or `schedule` to `FisherMonitor`, not both.")
    if every_n_steps is not None:
        if not is_whole_number(every_n_steps):
            raise ValueError(
                f"Invalid every_n_steps: {every_n_steps!r}. Use a positive integer (1 measures "
                "at every optimizer step), or None for the default time budget."
            )
        return every(every_n_steps)
    if schedule is None:
        return budget()
    if not callable(schedule):
        raise ValueError(
            f"Invalid schedule: {schedule!r}. Pass a callable step -> bool, e.g. "
            "schedules.budget(0.05), schedules.every(100) or schedules.log_spaced()."
        )
    return schedule


def check_prefix(value: Any) -> str:
    """A non-empty logging prefix without trailing slashes."""
    if not isinstance(value, str) or not value.strip("/ "):
        raise ValueError(
            f"Invalid log_prefix: {value!r}. Use a non-empty string such as 'fisher': every "
            "key is logged under it, and the report finds the monitor's keys by it."
        )
    return value.rstrip("/")


def check_probe_size(value: Any) -> int | None:
    """``None`` or a positive int."""
    if value is not None and not is_whole_number(value):
        raise ValueError(
            f"Invalid probe_size: {value!r}. Use a positive integer (samples per process) or "
            "None for the whole batch."
        )
    return value


def check_probe_data(value: Any) -> Any:
    """``None``, a ``DataLoader`` or an ``(inputs, targets)`` pair of matching tensors.

    A pair is checked now, not at the first measurement: a fixed probe set is the same at
    every step, so a mismatch would fail every measurement of the fit. (A ``DataLoader``'s
    first batch is taken at the start of fitting and checked then.)
    """
    if value is None or isinstance(value, torch.utils.data.DataLoader):
        return value
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(
            f"Invalid probe_data: a {type(value).__name__}. Pass a DataLoader (its first batch "
            "is taken once), an (inputs, targets) pair of tensors, or None to measure on the "
            "training batch."
        )
    inputs, targets = value
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        shown = (
            f"a tensor of shape {tuple(targets.shape)}"
            if isinstance(targets, torch.Tensor)
            else _kind(targets)
        )
        raise ValueError(
            f"Invalid probe_data: its targets are {shown}. Pass (inputs, targets) with the "
            "targets as a tensor whose first dimension is the sample."
        )
    count = int(targets.shape[0])
    if count == 0:
        raise ValueError("Invalid probe_data: it holds 0 samples. Pass at least one sample.")
    for tensor in _flat(inputs):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"Invalid probe_data: its inputs hold {_kind(tensor)}. Pass the inputs as a "
                "tensor, or a tuple of tensors passed to forward() as positional arguments."
            )
        if tensor.dim() == 0 or tensor.shape[0] != count:
            raise ValueError(
                f"Invalid probe_data: inputs of shape {tuple(tensor.shape)} and targets of "
                f"shape {tuple(targets.shape)} disagree on the number of samples. Pass one "
                "target per input sample (the first dimension of each)."
            )
    return value


def _flat(inputs: Any) -> list[Any]:
    """The tensors of an input, a tuple of inputs or nested tuples of them."""
    if isinstance(inputs, (tuple, list)):
        return [tensor for part in inputs for tensor in _flat(part)]
    return [inputs]


def _kind(value: Any) -> str:
    """``"a str ('x')"``, ``"None"``: what a bad value is, briefly."""
    if value is None:
        return "None"
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    return f"a {type(value).__name__} ({shown})"


def check_callable(name: str, value: Any, example: str) -> Any:
    """``None`` or a callable."""
    if value is not None and not callable(value):
        raise ValueError(f"Invalid {name}: {value!r}. Pass a callable, e.g. {example}.")
    return value


def check_network(value: Any) -> Any:
    """``None``, an attribute name, or a callable."""
    if value is None or callable(value) or (isinstance(value, str) and value):
        return value
    raise ValueError(
        f"Invalid network: {value!r}. Pass None (the LightningModule), an attribute name "
        "such as 'net' or 'model.encoder', or a callable module -> nn.Module."
    )


def check_flag(name: str, value: Any) -> bool:
    """A ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}. Use True or False.")
    return value


def check_whole(name: str, value: Any, minimum: int) -> int:
    """An ``int`` of at least ``minimum``."""
    if not is_whole_number(value, minimum=minimum):
        raise ValueError(f"Invalid {name}: {value!r}. Use an integer ≥ {minimum}.")
    return value


#: The largest seed ``torch.Generator.manual_seed`` accepts.
MAX_SEED = 2**64 - 1


def check_seed(value: Any) -> int:
    """An ``int`` from 0 to :data:`MAX_SEED` (what ``torch.Generator`` can be seeded with)."""
    if not is_whole_number(value, minimum=0) or value > MAX_SEED:
        raise ValueError(
            f"Invalid seed: {value!r}. Use an integer ≥ 0 and below 2**64 (the range of "
            "torch.Generator.manual_seed)."
        )
    return value


def check_prog_bar(value: Any, settings: MeasureSettings, prefix: str) -> list[str]:
    """Keys (without the prefix) the monitor logs, to show on the progress bar."""
    if value is not None and not isinstance(value, (str, list, tuple)):
        raise ValueError(
            f"Invalid prog_bar: {value!r}. Use a key the monitor logs, such as "
            "'block/direction_cosine/all', a list of them, or None."
        )
    given = [value] if isinstance(value, str) else list(value or [])
    checked = []
    for key in given:
        if isinstance(key, str) and key.startswith(prefix + "/"):
            key = key[len(prefix) + 1 :]
        if not (isinstance(key, str) and _is_logged_key(key, settings)):
            structures = ", ".join(settings.structure_names)
            raise ValueError(
                f"Invalid prog_bar key: {key!r}. Use keys the monitor logs (the prefix is "
                "optional): "
                "'{structure}/{metric}/{layer}' with a measured structure "
                f"({structures}), e.g. '{settings.structures[0].value}/direction_cosine/all', "
                f"or 'probe/{{name}}' with a name in {tuple(keys.PROBE_DESCRIPTIONS)}."
            )
        checked.append(key)
    return checked


def _is_logged_key(key: str, settings: MeasureSettings) -> bool:
    if key.startswith(keys.PROBE + "/"):
        return key[len(keys.PROBE) + 1 :] in keys.PROBE_DESCRIPTIONS
    parsed = keys.parse_key(key)
    if parsed is None or parsed.metric in keys.CONSTANT_METRICS:
        return False
    if parsed.structure == keys.OPTIMIZER:
        return True
    if parsed.structure not in settings.structure_names:
        return False
    if parsed.metric not in keys.DAMPED_METRICS or not settings.several_dampings:
        return parsed.damping is None
    return parsed.damping in {repr(d) for d in settings.dampings}

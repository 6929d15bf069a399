"""Where the monitor's results go: one writer per logger of the trainer.

The callback hands every result to its writers; a writer turns it into what its logger
understands. :class:`LoggerWriter` serves any Lightning logger (scalars through
``log_metrics`` with keys joined by the logger's ``group_separator``, settings through
``log_hyperparams``); :class:`~fisher_monitor.callback.tensorboard.TensorBoardWriter`
adds what only TensorBoard shows. A writer for another service (W&B tables, MLflow
artifacts) is one more subclass of :class:`Writer`, registered for its logger class in
:mod:`~fisher_monitor.callback.writer_registry`.

A destination can fail during the fit (the log directory deleted or read-only, a full
disk, a service that is down). :class:`WriterGroup` calls the writers for the monitor:
a writer that raises is dropped after one warning, the others go on, and training is
never stopped by a log write. Every string handed to a writer is valid UTF-8
(:func:`encodable_data`): a layer name that is not (a lone surrogate) would otherwise stop
the fit with a ``UnicodeEncodeError`` in whichever writer encodes it first.
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fisher_monitor import keys, runinfo
from fisher_monitor.callback.history import History
from fisher_monitor.report.text import encodable


def encodable_data(value: Any) -> Any:
    """``value`` with every string in it (keys too, at any depth) made valid UTF-8."""
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, Mapping):
        return {encodable_data(k): encodable_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(encodable_data(v) for v in value)
    return value


def encodable_keys(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` with its keys (scalar keys holding layer names) made valid UTF-8."""
    return {encodable(key): value for key, value in mapping.items()}


@dataclass
class RunInfo:
    """What the monitor measures and how: the settings, the layers and the notes.

    Attributes:
        prefix: The logging prefix.
        settings: Setting name to plain value (structures, Fisher type, damping, schedule,
            probe, backend, network, loss, optimizer).
        layers: ``Measurement.coverage``: per layer its type, parameters, dimension,
            backend, whether it was measured and why not (empty before a measurement).
        notes: Notes of the measurements so far, each once.
        fit: The end-of-fit summary (``None`` while fitting).
    """

    prefix: str
    settings: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fit: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # writers read these fields directly: every string in them must be valid UTF-8
        self.prefix = encodable(self.prefix)
        self.settings = encodable_data(dict(self.settings))
        self.layers = encodable_data(list(self.layers))
        self.notes = encodable_data(list(self.notes))

    def as_dict(self) -> dict[str, Any]:
        """Plain data (the run-information file's content), every string valid UTF-8."""
        data: dict[str, Any] = {
            "prefix": self.prefix,
            "settings": dict(self.settings),
            "layers": list(self.layers),
            "notes": list(self.notes),
        }
        if self.fit is not None:
            data["fit"] = dict(self.fit)
        return encodable_data(data)

    def add_coverage(self, coverage: list[dict[str, Any]]) -> bool:
        """Take the layers of the first measurement; whether that changed anything."""
        if self.layers or not coverage:
            return False
        self.layers = encodable_data([dict(entry) for entry in coverage])
        used = sorted({str(entry["backend"]) for entry in self.layers})
        self.settings["backend_used"] = ", ".join(used)
        return True

    def add_notes(self, notes: Iterable[str]) -> bool:
        """Add the notes not seen yet; whether the notes changed.

        A note that differs from an earlier one only in its numbers (a sub-sampled probe's
        sizes, a sketch's columns at this step) replaces it, so that the summary and the
        run file say each thing once, with the latest numbers.
        """
        changed = False
        for note in dict.fromkeys(encodable(note) for note in notes):
            if note in self.notes:
                continue
            shape = _note_shape(note)
            same = next((i for i, old in enumerate(self.notes) if _note_shape(old) == shape), None)
            if same is None:
                self.notes.append(note)
            else:
                self.notes[same] = note
            changed = True
        return changed

    def hyperparameters(self) -> dict[str, Any]:
        """Settings and constants (each layer's dimension) as flat hyperparameters.

        Keys are ``{prefix}/{setting}`` and ``{prefix}/dimension/{layer}`` (``…/all``: the
        measured total); values are numbers, strings or booleans (lists become
        comma-separated text), as every logger accepts.
        """
        flat: dict[str, Any] = {}
        for name, value in self.settings.items():
            flat[f"{self.prefix}/{name}"] = _plain(value)
        measured = [layer for layer in self.layers if layer.get("measured")]
        for layer in measured:
            flat[f"{self.prefix}/dimension/{layer['layer']}"] = int(layer["dimension"])
        if measured:
            total = sum(int(layer["dimension"]) for layer in measured)
            flat[f"{self.prefix}/dimension/{keys.ALL}"] = total
        return flat


#: A number in running text; digits in names (``layer4.1``, `` `0` ``, ``'fc2'``) are not.
_NUMBER = re.compile(r"(?<![\w.`'\"])\d[\d,]*(\.\d+)?(e[+-]?\d+)?(?![\w`'\"])")


def _note_shape(note: str) -> str:
    """A note with its numbers replaced: notes of one kind at different steps match."""
    return _NUMBER.sub("#", note)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return "None" if value is None else value
    return str(value)


def time_series(scalars: Mapping[str, float], constant: Iterable[str]) -> dict[str, float]:
    """The scalars worth logging over time: no NaN, no metric of ``constant``.

    Args:
        scalars: Keys without the prefix.
        constant: Metrics that do not change during the run (they are settings).

    Returns:
        The kept scalars as floats.
    """
    constant = set(constant)
    kept = {}
    for key, value in scalars.items():
        parsed = keys.parse_key(key)
        if (parsed is None or parsed.metric not in constant) and not math.isnan(value):
            kept[key] = float(value)
    return kept


def logged_key(prefix: str, key: str, separator: str = "/") -> str:
    """The key as logged: ``{prefix}/{key}`` with ``/`` replaced by the logger's separator."""
    full = f"{prefix}/{key}"
    return full if separator == "/" else full.replace("/", separator)


class Writer(ABC):
    """Receives the monitor's results on rank zero and writes them to one destination.

    Args:
        logger: The Lightning logger written to.
        prefix: The logging prefix.
    """

    def __init__(self, logger: Any, prefix: str) -> None:
        self.logger = logger
        self.prefix = prefix

    @property
    def run_directory(self) -> str | None:
        """Where the report can read this run (TensorBoard), or ``None``."""
        return None

    @property
    def destination(self) -> str:
        """The destination in words, for messages (e.g. ``"TensorBoardLogger at runs/v0"``)."""
        name = type(self.logger).__name__
        try:
            where = self.run_directory or getattr(self.logger, "log_dir", None)
        except Exception:  # noqa: BLE001 - only for a message
            where = None
        return f"{name} at {encodable(where)}" if where else name

    def flush(self) -> None:  # noqa: B027 - optional for writers
        """Write out what is buffered (at the end of the fit, where a failure is still ours)."""

    def release(self) -> None:  # noqa: B027 - optional for writers
        """Let go of the destination after a failed write (never raises)."""

    def write_info(self, info: RunInfo) -> None:  # noqa: B027 - optional for writers
        """The run's settings, layers, notes or end-of-fit summary changed."""

    @abstractmethod
    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Log scalar values (keys without the prefix, e.g. ``"block/kl/all"``)."""

    def log_histograms(  # noqa: B027 - optional for writers
        self, group: str, values: Mapping[str, np.ndarray], step: int
    ) -> None:
        """Log one histogram per layer (``{prefix}/histograms/{group}/{layer}``)."""

    def log_heatmap(self, history: History, step: int) -> None:  # noqa: B027
        """Log the heat map of the direction cosine over the measurements so far."""


class LoggerWriter(Writer):
    """Any Lightning logger: scalars through ``log_metrics``, settings as hyperparameters.

    For a ``CSVLogger`` the run directory is its ``log_dir``, where the run file is
    written too, so ``fisher-monitor report`` reads it with the notes and layers.
    """

    def __init__(self, logger: Any, prefix: str) -> None:
        super().__init__(logger, prefix)
        self._hyperparameters: set[str] = set()

    @property
    def run_directory(self) -> str | None:
        """A ``CSVLogger``'s ``log_dir`` (the report reads its ``metrics.csv``), else ``None``."""
        if any(cls.__name__ == "CSVLogger" for cls in type(self.logger).__mro__):
            return str(self.logger.log_dir)
        return None

    def write_info(self, info: RunInfo) -> None:
        """Log the settings and dimensions not logged yet (some services refuse changes)."""
        new = {k: v for k, v in info.hyperparameters().items() if k not in self._hyperparameters}
        if new:
            self._hyperparameters.update(new)
            self._log_hyperparameters(new)
        if self.run_directory is not None:
            runinfo.write(self.run_directory, info.as_dict())

    def _log_hyperparameters(self, params: dict[str, Any]) -> None:
        self.logger.log_hyperparams(params)

    def flush(self) -> None:
        """A ``TensorBoardLogger``'s writer writes in a thread: its errors surface here."""
        if is_tensorboard(self.logger):
            self.logger.experiment.flush()

    def release(self) -> None:
        """Detach a ``TensorBoardLogger``'s file writer if a failed write broke it.

        TensorBoard's event writer keeps the error of its writing thread and raises it
        again at every later call, including the logger's own ``finalize`` after the fit:
        a failure of the monitor's write would then fail the fit. A broken writer is
        dropped, so that the logger creates a new one if it writes again, as it would
        have without the monitor; a healthy one (whose buffered events are the logger's
        too) is kept.
        """
        if not is_tensorboard(self.logger):
            return
        try:
            experiment = self.logger.experiment
            experiment.flush()
        except Exception:  # noqa: BLE001 - broken: drop it below
            experiment = getattr(self.logger, "_experiment", None)
            if experiment is not None and hasattr(experiment, "all_writers"):
                experiment.file_writer = experiment.all_writers = None

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """``log_metrics`` with keys joined by the logger's ``group_separator``."""
        separator = getattr(self.logger, "group_separator", "/")
        metrics = {logged_key(self.prefix, k, separator): v for k, v in scalars.items()}
        if metrics:
            self.logger.log_metrics(metrics, step=step)


class MLflowWriter(LoggerWriter):
    """MLflow: metric and parameter names without the characters MLflow refuses.

    MLflow accepts letters, digits, ``_``, ``-``, ``.``, ``/`` and spaces; anything else
    (the default prefix's ``~``) is left out, silently, rather than warned about per key.
    """

    _REFUSED = re.compile(r"[^A-Za-z0-9_\-./ ]")

    def __init__(self, logger: Any, prefix: str) -> None:
        super().__init__(logger, self._REFUSED.sub("", prefix).strip("/") or "fisher")

    @property
    def run_directory(self) -> str | None:
        """The run's folder of a local file store (``mlruns/<experiment>/<run>``), else ``None``."""
        save_dir = getattr(self.logger, "save_dir", None)
        try:
            experiment, run = self.logger.experiment_id, self.logger.run_id
        except Exception:  # noqa: BLE001 - a remote tracking server: nothing to read locally
            return None
        if not save_dir or not experiment or not run:
            return None
        folder = os.path.join(save_dir, experiment, run)
        return folder if os.path.isdir(folder) else None

    def _log_hyperparameters(self, params: dict[str, Any]) -> None:
        self.logger.log_hyperparams({self._REFUSED.sub("", k): v for k, v in params.items()})


#: ``on_failure(writer, error, remaining)``: a writer failed and was dropped.
FailureHandler = Callable[["Writer", BaseException, int], None]


class WriterGroup:
    """The writers of one fit: every call reaches each writer still working.

    A writer that raises (the log directory deleted or read-only, a full disk, a service
    that is down) is released and dropped, and ``on_failure`` decides what to tell the
    user; the others keep receiving every result. Nothing a writer raises reaches
    Lightning, unless ``on_failure`` raises it (strict mode).

    Args:
        writers: The writers (rank zero; empty elsewhere).
        on_failure: Called once per failed writer, after it was dropped.
    """

    def __init__(self, writers: Iterable[Writer], on_failure: FailureHandler) -> None:
        self.writers = list(writers)
        self.started = len(self.writers)
        self.on_failure = on_failure
        self._directories = [w.run_directory for w in self.writers if w.run_directory]

    def __iter__(self) -> Iterator[Writer]:
        return iter(list(self.writers))

    def __len__(self) -> int:
        return len(self.writers)

    @property
    def run_directories(self) -> list[str]:
        """TensorBoard run directories of the fit (those written before a failure too)."""
        return list(self._directories)

    @property
    def all_failed(self) -> bool:
        """Whether there were writers and none is left."""
        return self.started > 0 and not self.writers

    def call(self, method: str, *args: Any) -> None:
        """``writer.{method}(*args)`` for each working writer; a failure drops the writer."""
        for writer in list(self.writers):
            try:
                getattr(writer, method)(*args)
            except Exception as error:  # noqa: BLE001 - a log write never stops the fit
                self.drop(writer, error)

    def drop(self, writer: Writer, error: BaseException) -> None:
        """Stop writing to ``writer`` after ``error``, and report it."""
        if writer in self.writers:
            self.writers.remove(writer)
        try:
            writer.release()
        except Exception:  # noqa: BLE001, S110 - releasing is best effort
            pass
        self.on_failure(writer, error, len(self.writers))


def is_tensorboard(logger: Any) -> bool:
    """Whether ``logger`` is Lightning's ``TensorBoardLogger`` (either namespace)."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)

"""Which writer serves which logger: a registry by logger class name.

:func:`writers_for` gives every logger of the trainer its writer: the one registered for
the logger's class (or a base class), else :class:`~fisher_monitor.callback.writers.
LoggerWriter`, which serves any Lightning logger. A writer for another service is one
subclass of :class:`~fisher_monitor.callback.writers.Writer` and one
:func:`register_writer` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fisher_monitor.callback.tensorboard import TensorBoardWriter
from fisher_monitor.callback.writers import LoggerWriter, MLflowWriter, Writer

#: ``factory(logger, prefix, histograms=..., images=...) -> Writer``.
WriterFactory = Callable[..., Writer]


def _tensorboard(logger: Any, prefix: str, histograms: bool, images: bool) -> Writer:
    return TensorBoardWriter(logger, prefix, histograms=histograms, images=images)


def _mlflow(logger: Any, prefix: str, histograms: bool, images: bool) -> Writer:
    return MLflowWriter(logger, prefix)


#: Logger class name → its writer's factory (Lightning's ``lightning.pytorch`` and
#: ``pytorch_lightning`` namespaces alike, hence names).
WRITERS: dict[str, WriterFactory] = {
    "TensorBoardLogger": _tensorboard,
    "MLFlowLogger": _mlflow,
}


def register_writer(logger_class: str, factory: WriterFactory) -> None:
    """Serve loggers of the class named ``logger_class`` (or a subclass) with ``factory``.

    Args:
        logger_class: The logger's class name, e.g. ``"WandbLogger"``.
        factory: ``factory(logger, prefix, histograms=..., images=...)`` returning a
            :class:`~fisher_monitor.callback.writers.Writer`.

    Raises:
        TypeError: If ``factory`` is not callable.
    """
    if not callable(factory):
        raise TypeError(f"Invalid factory for {logger_class!r}: {factory!r} is not callable.")
    WRITERS[logger_class] = factory


def writers_for(loggers: Iterable[Any], prefix: str, histograms: bool, images: bool) -> list:
    """One writer per logger, the registered one for its class (or the generic one).

    Args:
        loggers: ``trainer.loggers``.
        prefix: The logging prefix.
        histograms: Whether writers that can log histograms do.
        images: Whether writers that can log the heat-map image do.

    Returns:
        The writers.
    """
    writers: list[Writer] = []
    for logger in loggers:
        factory = next(
            (WRITERS[cls.__name__] for cls in type(logger).__mro__ if cls.__name__ in WRITERS),
            None,
        )
        if factory is None:
            writers.append(LoggerWriter(logger, prefix))
        else:
            writers.append(factory(logger, prefix, histograms=histograms, images=images))
    return writers


__all__ = ["WRITERS", "WriterFactory", "register_writer", "writers_for"]

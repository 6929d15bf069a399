"""Issue 21, item 1: a log-write failure never stops ``Trainer.fit``.

The log directory deleted, the disk full or the file system read-only during a real fit:
the same fit completes with and without the monitor, with the same weights; the monitor
gives one warning naming the logger, the cause and the fix, and keeps measuring to the
other loggers (or, with none left, switches off). Lightning logs every 50 steps here, so
that, as in the issue, the fit without the monitor writes nothing after the fault.
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.compat.tensorflow_stub.io import gfile

from fisher_monitor import FisherMonitor, runinfo
from fisher_monitor.report.load import load_runs
from lightning_helpers import SpyLogger, TinyClassifier, loader, trainer_kwargs

# TensorBoard's writer thread dies of the injected error; it is printed, not raised
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

STEPS = 10
FAULT_AT = 3
KEY = "~fisher/block/direction_cosine/all"


class Fault(pl.Callback):
    """Breaks the TensorBoard log directory after the optimizer step of ``FAULT_AT``."""

    def __init__(self, how):
        self.how = how
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == FAULT_AT and not self.done:
            self.done = True
            tensorboard = next(lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger))
            self.how(Path(tensorboard.log_dir))


class FullDisk:
    """Makes every write under a directory fail with ``errno`` from the moment it is armed.

    Patches the two ways bytes reach the disk: TensorBoard's file system layer (the event
    files, written by its writer thread) and the run file's atomic write.
    """

    def __init__(self, monkeypatch, code: int):
        self.code = code
        self.root: Path | None = None
        append = gfile.LocalFileSystem.append
        write = runinfo.atomic_write

        def failing_append(fs, filename, file_content, binary_mode=False):
            self._check(os.fsdecode(filename))
            return append(fs, filename, file_content, binary_mode)

        def failing_write(path, data):
            self._check(str(path))
            return write(path, data)

        monkeypatch.setattr(gfile.LocalFileSystem, "append", failing_append)
        monkeypatch.setattr(runinfo, "atomic_write", failing_write)

    def _check(self, filename: str) -> None:
        if self.root is not None and filename.startswith(str(self.root)):
            raise OSError(self.code, os.strerror(self.code), filename)

    def __call__(self, directory: Path) -> None:
        self.root = directory


def run_fit(tmp_path, how, monitor=None, extra_loggers=()):
    """A real fit with a TensorBoardLogger broken at ``FAULT_AT``; returns what it left."""
    torch.manual_seed(0)
    model = TinyClassifier()
    logger = TensorBoardLogger(tmp_path, name="run")
    callbacks = [Fault(how), *([monitor] if monitor is not None else [])]
    trainer = pl.Trainer(
        max_steps=STEPS,
        logger=[logger, *extra_loggers],
        callbacks=callbacks,
        **trainer_kwargs(log_every_n_steps=50),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader())
    assert trainer.global_step == STEPS and trainer.state.finished
    found = [str(w.message) for w in caught if "`FisherMonitor`" in str(w.message)]
    return model, found, Path(logger.log_dir)


def delete(directory: Path) -> None:
    """Delete the run directory (TensorBoard's writer thread may add a file meanwhile)."""
    for _ in range(20):
        shutil.rmtree(directory, ignore_errors=True)
        if not directory.exists():
            return
    raise AssertionError(f"could not delete {directory}")


FAULTS = {
    "deleted": (lambda mp: delete, "The log directory was deleted or moved"),
    "disk full": (lambda mp: FullDisk(mp, errno.ENOSPC), "The disk is full"),
    "read-only": (lambda mp: FullDisk(mp, errno.EROFS), "The file system is read-only"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_fit_completes_with_the_same_weights_and_one_warning(tmp_path, monkeypatch, fault):
    make, fix = FAULTS[fault]
    plain, found, _ = run_fit(tmp_path / "plain", make(monkeypatch))
    assert found == []  # without the monitor, the same fit completes
    monitor = FisherMonitor(every_n_steps=1)
    model, found, directory = run_fit(tmp_path / "monitored", make(monkeypatch), monitor)
    for mine, theirs in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(mine, theirs)  # the monitor changed nothing
    (warning,) = found
    assert warning.startswith(
        f"`FisherMonitor` could not write to TensorBoardLogger at {directory}"
    )
    assert fix in warning and "No logger is left to write to" in warning
    assert monitor._policy.off and "no logger left" in monitor._policy.off
    assert len(monitor._history) <= FAULT_AT + 3  # it switched off soon after the fault


@pytest.mark.parametrize("fault", ["deleted", "disk full"])
def test_the_other_loggers_keep_every_measurement(tmp_path, monkeypatch, fault):
    make, fix = FAULTS[fault]
    spy = SpyLogger()
    monitor = FisherMonitor(every_n_steps=1)
    _, found, _ = run_fit(tmp_path, make(monkeypatch), monitor, extra_loggers=[spy])
    (warning,) = found
    assert fix in warning and "goes on with the other logger" in warning
    assert monitor._policy.off is None
    assert spy.steps_with(KEY) == list(range(STEPS))  # not one measurement lost


def test_tensorboard_keeps_every_measurement_when_another_logger_fails(tmp_path):
    class Broken(SpyLogger):
        def log_metrics(self, metrics, step=None):
            if step is not None and step >= FAULT_AT:
                raise ConnectionError("the tracking server is down")
            super().log_metrics(metrics, step)

    monitor = FisherMonitor(every_n_steps=1)
    _, found, directory = run_fit(tmp_path, lambda _: None, monitor, extra_loggers=[Broken()])
    (warning,) = found
    assert "could not write to Broken (ConnectionError: the tracking server is down)" in warning
    (run,) = load_runs([directory])
    assert run.steps == list(range(STEPS))


def test_a_directory_made_read_only_mid_fit(tmp_path, monkeypatch):
    """``chmod 0500`` on the log directory; root ignores modes, so there the writes are made
    to fail with the error a non-root user gets (EACCES, permission denied)."""
    monitor = FisherMonitor(every_n_steps=1)
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    arm = FullDisk(monkeypatch, errno.EACCES) if root else (lambda d: d.chmod(0o500))
    try:
        _, found, directory = run_fit(tmp_path, arm, monitor)
    finally:
        for path in tmp_path.rglob("*"):
            if path.is_dir():
                path.chmod(0o700)
    (warning,) = found
    assert "could not write to TensorBoardLogger" in warning


def test_strict_mode_raises_the_write_error(tmp_path, monkeypatch):
    monitor = FisherMonitor(every_n_steps=1, raise_on_error=True)
    with pytest.raises(OSError, match="No space left on device"):
        run_fit(tmp_path, FullDisk(monkeypatch, errno.ENOSPC), monitor)


def test_an_unexpected_error_in_a_hook_is_one_warning(tmp_path, monkeypatch):
    def broken(summary):
        raise RuntimeError("drawing the summary failed")

    monkeypatch.setattr("fisher_monitor.callback.summary.show", broken)
    monitor = FisherMonitor(every_n_steps=1)
    _, found, _ = run_fit(tmp_path, lambda _: None, monitor)
    (warning,) = found
    assert "failed in `on_fit_end` (RuntimeError: drawing the summary failed)" in warning
    assert "Training continues" in warning and "tries again" not in warning

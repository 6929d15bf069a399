"""Command lines printed for the user to copy: runnable as printed, without activating anything.

A console script is named by the full path of the one next to the running interpreter
(``.venv/bin/fisher-monitor``), or, when the environment has none (an interpreter that
sees the package through ``PYTHONPATH``), as ``python -m module`` with the interpreter's
full path. Paths below the working directory are shown relative to it. Standard library
only.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def script(name: str, module: str) -> list[str]:
    """The words that run console script ``name`` of the running Python's environment.

    Args:
        name: The console script, e.g. ``"fisher-monitor"`` or ``"tensorboard"``.
        module: The module that ``python -m`` runs instead, e.g. ``"fisher_monitor"``.

    Returns:
        ``[".venv/bin/name"]`` when that script exists, else
        ``["/full/path/python", "-m", module]``.
    """
    found = Path(sys.executable).parent / name
    if found.is_file() and os.access(found, os.X_OK):
        return [shown(found)]
    return [shown(sys.executable), "-m", module]


def report_command(*arguments: str | os.PathLike[str]) -> str:
    """``fisher-monitor report ARGUMENTS…`` as a runnable, quoted command line (paths shown)."""
    words = [*script("fisher-monitor", "fisher_monitor"), "report"]
    words += [shown(a) if isinstance(a, Path) else str(a) for a in arguments]
    return shlex.join(words)


def tensorboard_command(logdir: str | os.PathLike[str]) -> str:
    """``tensorboard --logdir LOGDIR`` as a runnable, quoted command line."""
    return shlex.join([*script("tensorboard", "tensorboard.main"), "--logdir", shown(logdir)])


__all__ = ["report_command", "script", "shown", "tensorboard_command"]

"""The run-information file: what the callback measured and how, read back by the report.

Scalars go through the user's loggers; the settings, the layers (coverage), the notes and
the end-of-fit summary go, as JSON, into a file next to the TensorBoard event files:
``fisher_monitor-{prefix}.json`` (the prefix with anything but letters, digits, ``-`` and
``_`` replaced by ``_``). The report reads it back as data; nothing is parsed out of
Markdown. Standard library only: the report must not import torch.

Schema (``"version": 1``)::

    {
      "format": "fisher-monitor-run",
      "version": 1,
      "prefix": "fisher",
      "settings": {"structures": [...], "fisher": "exact", "mc_samples": 1,
                   "damping": 0.001, "damping_mode": "relative", "schedule": "...", ...},
      "layers": [{"layer": "fc1", "type": "Linear", "parameters": ["fc1.weight", ...],
                  "dimension": 1234, "backend": "backpack", "measured": true,
                  "reason": null}, ...],
      "notes": ["..."],
      "fit": {"measurements": 12, "steps": [0, 1, ...], "monitor_seconds": 1.2,
              "fit_seconds": 30.0, "overhead": 0.04, ...}      # at the end of fitting
    }

Unknown keys are kept and ignored by readers, so later versions may add fields. Every
known field is checked on reading (:func:`validate`): a file of this format with a field
of the wrong type is refused with one line naming the file and the field
(:class:`RunFileError`), never half-read. The file is written atomically (a temporary
file renamed over it) with the permissions of any other file the process creates (the
umask applies), not the owner-only mode of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT = "fisher-monitor-run"
VERSION = 1
_GLOB = "fisher_monitor-*.json"
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class RunFileError(ValueError):
    """A run-information file that cannot be used: the message names the file and field."""


def file_name(prefix: str) -> str:
    """The file name for a logging prefix, e.g. ``fisher_monitor-fisher.json``."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", prefix) or "_"
    return f"fisher_monitor-{slug}.json"


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory.

    The file appears complete or not at all: a full disk or a crash leaves the old file
    (or none), never a truncated one. The temporary file is created with mode ``0o666``
    less the umask, as ``open()`` creates files, so the result has the permissions of
    the other files written next to it.

    Raises:
        OSError: When the directory cannot be written (the temporary file is removed).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write(directory: str | Path, info: dict[str, Any]) -> Path:
    """Write (or replace) the run information for ``info["prefix"]`` atomically.

    Args:
        directory: The run directory (a TensorBoard logger's ``log_dir``).
        info: The data; ``format``, ``version`` are filled in.

    Returns:
        The path written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, **info}
    path = directory / file_name(str(info["prefix"]))
    # ensure_ascii: a name that is not valid UTF-8 (a lone surrogate) is written as its
    # JSON escape instead of failing the write
    text = json.dumps(data, indent=1, default=_plain, allow_nan=True, ensure_ascii=True)
    atomic_write(path, text.encode("utf-8"))
    return path


def read(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Read every run-information file of a directory.

    Args:
        directory: A run directory.

    Returns:
        Per logging prefix, the stored data, validated (:func:`validate`), every string
        in it valid UTF-8. A JSON file of another format is not ours and is left out.

    Raises:
        RunFileError: For a file that cannot be read, is not JSON, or is of this format
            with a field of the wrong type (one line naming the file and the field).
    """
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(directory).glob(_GLOB)):
        data = _load(path)
        if isinstance(data, dict) and data.get("format") == FORMAT:
            validate(data, path)
            found[str(data["prefix"])] = data
    return found


def _load(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise RunFileError(f"{path}: cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{path}: not a run file (not UTF-8 text)") from None
    try:
        return _encodable(json.loads(text))
    except RecursionError:
        raise RunFileError(f"{path}: not a run file (JSON nested too deeply)") from None
    except ValueError as error:
        raise RunFileError(f"{path}: not valid JSON ({error})") from None


def _encodable(value: Any) -> Any:
    r"""Strings (keys too) with lone surrogates (JSON ``\udcNN`` escapes) shown as escapes."""
    if isinstance(value, str):
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encodable(v) for v in value]
    return value


# ------------------------------------------------------------------ schema

Check = Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _optional(check: Check) -> Check:
    return lambda value: value is None or check(value)


def _list_of(check: Check) -> Check:
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


_STR: tuple[Check, str] = (lambda v: isinstance(v, str), "a string")
_OPTIONAL_STR: tuple[Check, str] = (_optional(_STR[0]), "a string or null")
_BOOL: tuple[Check, str] = (lambda v: isinstance(v, bool), "true or false")
_COUNT: tuple[Check, str] = (lambda v: _is_int(v) and v >= 0, "a whole number ≥ 0")
_NUMBER: tuple[Check, str] = (_is_number, "a number")
_STRINGS: tuple[Check, str] = (_list_of(_STR[0]), "a list of strings")

#: Settings the report reads, with their types (others: any JSON value, shown as text).
SETTINGS: dict[str, tuple[Check, str]] = {
    "structures": _STRINGS,
    "fisher": _STR,
    "mc_samples": _COUNT,
    "damping": (
        lambda v: _is_number(v) or _list_of(_is_number)(v),
        "a number or a list of numbers",
    ),
    "damping_mode": _STR,
    "schedule": _STR,
    "probe_size": (_optional(_COUNT[0]), "a whole number ≥ 0 or null"),
    "fixed_probe": _BOOL,
    "backend": _OPTIONAL_STR,
    "backend_used": _OPTIONAL_STR,
    "estimator": _OPTIONAL_STR,
    "network": _OPTIONAL_STR,
    "loss": _OPTIONAL_STR,
    "optimizer": _OPTIONAL_STR,
    "audit": _BOOL,
    "preconditioner": _BOOL,
    "seed": (_is_int, "a whole number"),
}
#: Fields of each entry of ``layers`` (``layer`` is required).
LAYER: dict[str, tuple[Check, str]] = {
    "layer": _STR,
    "type": _OPTIONAL_STR,
    "parameters": _STRINGS,
    "dimension": (_optional(_COUNT[0]), "a whole number ≥ 0 or null"),
    "backend": _OPTIONAL_STR,
    "measured": _BOOL,
    "reason": _OPTIONAL_STR,
}
#: Fields of ``fit`` (the end-of-fit summary).
FIT: dict[str, tuple[Check, str]] = {
    "measurements": _COUNT,
    "steps": (_list_of(_is_int), "a list of whole numbers"),
    "monitor_seconds": _NUMBER,
    "fit_seconds": _NUMBER,
    "overhead": _NUMBER,
    "off": _OPTIONAL_STR,
    "warnings": _STRINGS,
    "verdicts": _STRINGS,
}


def _kind(value: Any) -> str:
    """``a string ('x')``: what a bad value is, shown briefly."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    name = names.get(type(value)) or (
        "null" if value is None else "a number" if _is_number(value) else type(value).__name__
    )
    if isinstance(value, (dict, list)):
        return name
    shown = repr(value)
    return f"{name} ({shown[:40] + '…' if len(shown) > 40 else shown})"


def _fields(data: dict, spec: dict[str, tuple[Check, str]], where: str, path: Path) -> None:
    for name, (check, expected) in spec.items():
        if name in data and not check(data[name]):
            raise RunFileError(
                f"{path}: field {where + name!r} must be {expected}, got {_kind(data[name])}"
            )


def validate(data: dict[str, Any], path: str | Path = "run file") -> None:
    """Check every known field of a run file's data (unknown fields are allowed).

    Args:
        data: The parsed JSON object (``"format"`` is this module's :data:`FORMAT`).
        path: The file, for the message.

    Raises:
        RunFileError: For the first field of the wrong type: ``"{path}: field 'fit'
            must be an object, got a string ('x')"``.
    """
    path = Path(path)
    version = data.get("version", VERSION)
    if not (_is_int(version) and version >= 1):
        raise RunFileError(
            f"{path}: field 'version' must be a whole number ≥ 1, got {_kind(version)}"
        )
    prefix = data.get("prefix")
    if not (isinstance(prefix, str) and prefix):
        raise RunFileError(
            f"{path}: field 'prefix' must be a non-empty string, got {_kind(prefix)}"
        )
    for name, expected in (("settings", dict), ("fit", dict), ("layers", list), ("notes", list)):
        value = data.get(name)
        if value is not None and not isinstance(value, expected):
            wanted = "an object" if expected is dict else "a list"
            raise RunFileError(f"{path}: field {name!r} must be {wanted}, got {_kind(value)}")
    _fields(data.get("settings") or {}, SETTINGS, "settings.", path)
    for index, entry in enumerate(data.get("layers") or []):
        if not isinstance(entry, dict) or "layer" not in entry:
            raise RunFileError(
                f"{path}: field 'layers[{index}]' must be an object with a 'layer' name, "
                f"got {_kind(entry)}"
            )
        _fields(entry, LAYER, f"layers[{index}].", path)
    notes = data.get("notes") or []
    if not all(isinstance(note, str) for note in notes):
        bad = next(note for note in notes if not isinstance(note, str))
        raise RunFileError(f"{path}: field 'notes' must be a list of strings, got {_kind(bad)}")
    _fields(data.get("fit") or {}, FIT, "fit.", path)


def _plain(value: Any) -> Any:
    """JSON fallback for values that are not plain data (enums, paths, tuples of those)."""
    if hasattr(value, "value"):
        return value.value
    return str(value)


__all__ = [
    "FORMAT",
    "VERSION",
    "RunFileError",
    "atomic_write",
    "file_name",
    "read",
    "validate",
    "write",
]

"""What to measure: structures, Fisher type, damping. Validated once, shared by all entry points."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from fisher_monitor import keys


class Structure(str, Enum):
    """Restrictions of F and EF that are compared (docs/theory.md#structures)."""

    DIAG = "diag"
    BLOCK = "block"
    KRON = "kron"


class FisherType(str, Enum):
    """How the Fisher is computed: exactly, or from sampled labels."""

    EXACT = "exact"
    MC = "mc"


class DampingMode(str, Enum):
    """``relative``: λ_b = damping · tr(F_b)/D_b per layer; ``absolute``: λ_b = damping."""

    RELATIVE = "relative"
    ABSOLUTE = "absolute"


def is_whole_number(value, minimum: int = 1) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _choice(enum: type[Enum], value, argument: str) -> Enum:
    try:
        return enum(value)
    except (ValueError, TypeError):
        allowed = tuple(member.value for member in enum)
        raise ValueError(f"Invalid {argument}: {value!r}. Supported: {allowed}.") from None


def _structure(value) -> str:
    """A built-in structure as its :class:`Structure` member, a registered one as its name."""
    if isinstance(value, str) and value in keys.registered_structures():
        return Structure(value) if value in keys.STRUCTURES else value
    raise ValueError(f"Invalid structure: {value!r}. Supported: {keys.registered_structures()}.")


def _structures(structures) -> tuple[str, ...]:
    """``structures`` as a non-empty tuple of distinct structure names (:func:`_structure`)."""
    allowed = keys.registered_structures()
    if isinstance(structures, str):
        structures = (structures,)
    try:
        if isinstance(structures, Mapping):
            raise TypeError(structures)
        structures = tuple(structures)
    except TypeError:  # not iterable (None, a number, a 0-d tensor)
        raise ValueError(
            f"Invalid structures: {structures!r}. Use one of {allowed} or a sequence of them, "
            "e.g. ('diag', 'block')."
        ) from None
    if not structures:
        raise ValueError(f"Invalid structures: (). Choose at least one of {allowed}.")
    parsed = tuple(_structure(s) for s in structures)
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"Invalid structures: {structures!r} lists a structure twice.")
    return parsed  # type: ignore[return-value]


def _dampings(damping) -> tuple[float, ...]:
    """``damping`` as a non-empty tuple of distinct positive finite floats."""
    if isinstance(damping, (str, bytes)):
        raise TypeError(
            f"Invalid damping: {damping!r} is a string. Use a positive number such as 1e-3 "
            "(not its text), or a sequence of them."
        )
    several = not isinstance(damping, numbers.Real)
    if several and (not isinstance(damping, Iterable) or isinstance(damping, Mapping)):
        raise TypeError(
            f"Invalid damping: {damping!r}. Use a positive number such as 1e-3, or a "
            "sequence of them."
        )
    try:
        values = tuple(damping) if several else (damping,)
    except TypeError:  # e.g. a 0-dimensional tensor or array
        raise TypeError(
            f"Invalid damping: {damping!r}. Use a positive number such as 1e-3 (a Python "
            "float, e.g. float(value)), or a sequence of them."
        ) from None
    if not values:
        raise ValueError("Invalid damping: []. Give a positive float or a list of them.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"Invalid damping value {value!r} in damping={damping!r}: expected a positive "
                "float."
            )
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"Invalid damping: {value!r}. Damping must be a positive finite number: "
                "λ = 0 makes the rank-deficient F and EF singular."
            )
    dampings = tuple(float(v) for v in values)
    if len(set(map(repr, dampings))) != len(dampings):
        raise ValueError(f"Invalid damping: {damping!r} repeats a value.")
    return dampings


@dataclass(frozen=True)
class MeasureSettings:
    """Validated settings of a measurement.

    Attributes:
        structures: Structures to compute, in the order given (built-in ones as
            :class:`Structure` members, registered ones as their names).
        fisher: Exact or Monte-Carlo Fisher.
        mc_samples: Sampled labels per input for the Monte-Carlo Fisher.
        dampings: Damping values (one or more).
        several_dampings: Whether damped metric keys carry an ``@{value}`` suffix.
        damping_mode: Relative or absolute damping.
    """

    structures: tuple[Structure, ...]
    fisher: FisherType
    mc_samples: int
    dampings: tuple[float, ...]
    several_dampings: bool
    damping_mode: DampingMode

    @classmethod
    def create(
        cls,
        structures: Iterable[str] | str = ("diag", "block"),
        fisher: str = "exact",
        mc_samples: int = 1,
        damping: float | Sequence[float] = 1e-3,
        damping_mode: str = "relative",
    ) -> MeasureSettings:
        """Validate the user-facing arguments.

        Args:
            structures: Any of ``"diag"``, ``"block"``, ``"kron"`` (non-empty, no repeats).
            fisher: ``"exact"`` or ``"mc"``.
            mc_samples: Positive number of sampled labels per input.
            damping: Positive finite float, or a non-empty sequence of distinct ones.
            damping_mode: ``"relative"`` or ``"absolute"``.

        Returns:
            The validated settings.

        Raises:
            ValueError: For any invalid value; the message shows it and what is allowed.
            TypeError: For arguments of the wrong type.
        """
        parsed = _structures(structures)
        fisher_type = _choice(FisherType, fisher, "fisher")
        if not is_whole_number(mc_samples):
            raise ValueError(f"Invalid mc_samples: {mc_samples!r}. Use a positive integer.")
        dampings = _dampings(damping)
        mode = _choice(DampingMode, damping_mode, "damping_mode")
        return cls(
            structures=parsed,  # type: ignore[arg-type]
            fisher=fisher_type,  # type: ignore[arg-type]
            mc_samples=mc_samples,
            dampings=dampings,
            several_dampings=len(dampings) > 1,
            damping_mode=mode,  # type: ignore[arg-type]
        )

    @property
    def structure_names(self) -> tuple[str, ...]:
        """The structures as plain names (``"diag"``, ``"block"``, …)."""
        return tuple(str(getattr(s, "value", s)) for s in self.structures)

    def as_dict(self) -> dict:
        """Plain-data view, for logging as hyperparameters and for reports."""
        return {
            "structures": list(self.structure_names),
            "fisher": self.fisher.value,
            "mc_samples": self.mc_samples,
            "damping": list(self.dampings) if self.several_dampings else self.dampings[0],
            "damping_mode": self.damping_mode.value,
        }

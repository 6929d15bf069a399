"""Audit the optimizer the user runs: its step and its preconditioner against F and the EF.

Two questions, answered with pure tensor maths on a :class:`~fisher_monitor.measurement.
Measurement` (no Lightning, no BackPACK): how far is the step the optimizer really took
from the natural-gradient step (:mod:`~fisher_monitor.audit.step`), and how well does the
diagonal curvature an adaptive optimizer implies match the Fisher's or the empirical
Fisher's diagonal (:mod:`~fisher_monitor.audit.preconditioner`)? The theory page of the
documentation (``docs/theory.md``) explains them at more length.
"""

from fisher_monitor.audit.preconditioner import (
    PreconditionerAudit,
    has_second_moment,
    minibatch_second_moment,
    preconditioner_audit,
)
from fisher_monitor.audit.step import update_cosines

__all__ = [
    "PreconditionerAudit",
    "has_second_moment",
    "minibatch_second_moment",
    "preconditioner_audit",
    "update_cosines",
]

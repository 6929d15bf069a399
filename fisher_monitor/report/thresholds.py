"""The numbers behind every verdict (printed in the reports, used by the heat maps' colours).

Standard library only: the training side draws the same heat map.
"""

from __future__ import annotations

#: The EF direction *disagrees* with the natural gradient below this cosine (60°) ...
DISAGREE_COSINE = 0.5
#: ... and *agrees* with it from this cosine on (about 26°).
AGREE_COSINE = 0.9
#: EF preconditioning is *not a good stand-in* when it disagrees in at least this share.
DISAGREE_SHARE = 0.5
#: EF preconditioning is *a fair stand-in* when it agrees in at least this share.
AGREE_SHARE = 0.9
#: The EF *differs as a matrix* above this relative Frobenius error ...
REL_ERROR_LIMIT = 0.5
#: ... and is *close* to the Fisher up to this one (between the two: a rough stand-in).
REL_ERROR_CLOSE = 0.1
#: The EF *misjudges the curvature scale* when tr EF / tr F leaves this range.
TRACE_RATIO_RANGE = (0.5, 2.0)
#: The traces *match* inside this range (with a large matrix error: the trace hides it);
#: between it and :data:`TRACE_RATIO_RANGE` the scale is *near* (within a factor of 2).
TRACE_AGREES_RANGE = (0.8, 1.25)
#: An optimizer step points *within 60°* of the natural gradient from this cosine on.
STEP_COSINE = 0.5
#: Fewer measurements than this (or none after a training step) are not evidence.
MIN_MEASUREMENTS = 5
#: A preconditioner *follows* the EF (or F) when its cosine with it is larger by this much.
FOLLOWS_MARGIN = 0.05

THRESHOLDS = {
    "disagree_cosine": DISAGREE_COSINE,
    "agree_cosine": AGREE_COSINE,
    "disagree_share": DISAGREE_SHARE,
    "agree_share": AGREE_SHARE,
    "rel_error_limit": REL_ERROR_LIMIT,
    "rel_error_close": REL_ERROR_CLOSE,
    "trace_ratio_range": list(TRACE_RATIO_RANGE),
    "trace_agrees_range": list(TRACE_AGREES_RANGE),
    "step_cosine": STEP_COSINE,
    "min_measurements": MIN_MEASUREMENTS,
    "follows_margin": FOLLOWS_MARGIN,
}

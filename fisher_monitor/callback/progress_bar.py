"""Names of the monitor's values on Lightning's progress bar (``prog_bar=...``).

The progress bar cuts its line at the terminal's width, so the full key
(``~fisher/block/direction_cosine/all``) was shown as ``~fisher/block/dire…``, without its
metric or layer. On the bar the monitor's values go by short names:
``"block/direction_cosine/all"`` → ``"cos_dir/block"``.
"""

from __future__ import annotations

from fisher_monitor import keys

#: Short names of the metrics on the progress bar (others keep their name).
PROGRESS_BAR_NAMES = {
    "direction_cosine": "cos_dir",
    "rel_error": "rel_err",
    "trace_ratio": "tr_ratio",
    "matrix_cosine": "cos_mat",
    "nat_grad_cosine": "cos_nat_g",
    "ef_grad_cosine": "cos_ef_g",
    "update_nat_cosine": "cos_step",
    "update_ef_cosine": "cos_step_ef",
    "update_grad_cosine": "cos_step_g",
}


def progress_bar_name(key: str) -> str:
    """The short name of a key (without the logging prefix) on the progress bar.

    Args:
        key: e.g. ``"block/direction_cosine/all"``, ``"diag/kl@0.1/fc1"``, ``"probe/loss"``.

    Returns:
        ``"cos_dir/block"``, ``"kl@0.1/diag/fc1"``, ``"probe_loss"``: the metric's short
        name, its damping, its structure, and its layer unless it is ``all``.
    """
    if key.startswith(keys.PROBE + "/"):
        return key.replace("/", "_")
    parsed = keys.parse_key(key)
    if parsed is None:
        return key
    name = PROGRESS_BAR_NAMES.get(parsed.metric, parsed.metric)
    name += f"@{parsed.damping}" if parsed.damping else ""
    name += f"/{parsed.structure}"
    return name if parsed.layer == keys.ALL else f"{name}/{parsed.layer}"


__all__ = ["PROGRESS_BAR_NAMES", "progress_bar_name"]

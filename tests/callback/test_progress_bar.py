"""Short names for the monitor's values on Lightning's progress bar (issue 22, item 3)."""

from __future__ import annotations

from fisher_monitor.callback.progress_bar import progress_bar_name


def test_progress_bar_names_are_short_and_keep_metric_structure_and_layer():
    assert progress_bar_name("block/direction_cosine/all") == "cos_dir/block"
    assert progress_bar_name("diag/kl@0.1/net.0") == "kl@0.1/diag/net.0"
    assert progress_bar_name("kron/update_nat_cosine/fc") == "cos_step/kron/fc"
    assert progress_bar_name("probe/loss") == "probe_loss"
    assert progress_bar_name("optimizer/preconditioner_ef_cosine/all") == (
        "preconditioner_ef_cosine/optimizer"
    )
    # the key the issue saw cut to "~fisher/block/dire…" fits in 16 characters
    assert len(progress_bar_name("block/direction_cosine/all")) <= 16

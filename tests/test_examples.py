"""Every example runs in fast mode and shows its qualitative outcome."""

from __future__ import annotations

import numpy as np
import pytest

from examples_helpers import EXAMPLES, load


@pytest.mark.slow
def test_quickstart_writes_logs_and_a_report(tmp_path, capsys):
    result = load("quickstart").main(fast=True, root=tmp_path)
    out = capsys.readouterr().out
    assert result["report"].exists() and result["report"].name == "report.html"
    assert list(result["log_dir"].glob("events.out.tfevents.*"))
    assert result["measurements"] >= 10
    assert f"tensorboard --logdir {tmp_path}" in out and "Verdict: " in out
    assert -1.0 <= result["final_direction_cosine"] <= 1.0


@pytest.mark.slow
def test_vector_fields_natural_gradient_goes_straight_and_ef_bends():
    result = load("vector_fields").main(fast=True)
    assert result["figure"].exists()
    distance = result["final_distance"]
    # NGD follows straight lines to the optimum (F is the Hessian up to a constant) ...
    assert distance["natural gradient"] < 0.2
    # ... while the EF field bends away from it: its paths end farther away and its
    # direction disagrees with the natural gradient at some start point
    assert distance["EF-preconditioned"] > 2 * distance["natural gradient"]
    assert min(result["cosines"]) < 0.5


@pytest.mark.slow
def test_misspecification_ef_matches_f_only_for_the_right_model_and_large_n():
    result = load("misspecification").main(fast=True)
    means = result["means"]
    well = means["well specified"]
    # right model: the EF approaches F as N grows
    assert well["rel_error"][-1] < well["rel_error"][0]
    assert well["rel_error"][-1] < 0.1 and well["kl"][-1] < 0.01
    # wrong models: a mismatch that does not go away, at the same N
    for name in ("misspecified: variances", "misspecified: crossed"):
        assert means[name]["rel_error"][-1] > 3 * well["rel_error"][-1]
        assert means[name]["kl"][-1] > 10 * well["kl"][-1]
    # the trace alone misses the crossed mismatch
    crossed = means["misspecified: crossed"]
    assert abs(crossed["trace_ratio"][-1] - 1) < 0.1 and crossed["rel_error"][-1] > 0.3


@pytest.mark.slow
def test_optimizers_ngd_beats_ef_and_the_ef_direction_drifts():
    result = load("optimizers").main(fast=True)
    assert result["NGD"]["final_loss"] < result["EF"]["final_loss"]
    assert result["NGD"]["final_loss"] < result["GD"]["final_loss"]
    ngd, ef = np.array(result["NGD"]["cosines"]), np.array(result["EF"]["cosines"])
    # somewhere along the way the EF trajectory's cosine falls below the NGD trajectory's
    assert np.any(ef[1:] < ngd[1:])
    assert ef.min() < 0.9


@pytest.mark.slow
def test_cnn_block_kron_reports_every_structure_per_layer():
    result = load("cnn_block_kron").main(fast=True)
    table = result["table"]
    assert result["layers"] == ["net.0", "net.3", "net.6", "net.8"]
    for layer in [*result["layers"], "all"]:
        for structure in ("diag", "block", "kron"):
            entry = table[layer][structure]
            assert entry["rel_error"] > 0 and -1 <= entry["direction_cosine"] <= 1
    # the Kronecker factorisation adds its own error on top of the EF's for the convolutions
    assert table["net.0"]["kron"]["rel_error"] > table["net.0"]["block"]["rel_error"]


@pytest.mark.slow
def test_lightning_cli_config_adds_the_monitor(tmp_path):
    from fisher_monitor import FisherMonitor
    from fisher_monitor.report import load_runs

    cli = load("lightning_cli").main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "lightning_cli.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, FisherMonitor)]
    assert repr(monitor.schedule) == "log_spaced(per_decade=10, max_interval=50)"
    (run,) = load_runs([tmp_path])
    assert run.structures == ["diag", "block"] and len(run.steps) > 10

"""The TensorBoard writer: described scalars written once, layout, histograms, image, text,
hyperparameters and the JSON run file, from a real ``Trainer.fit``."""

from __future__ import annotations

import glob
import json
import re

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from fisher_monitor import FisherMonitor, keys, runinfo
from fisher_monitor.callback.layout import custom_scalar_layout
from fisher_monitor.callback.tensorboard import description
from lightning_helpers import fit

F64 = torch.float64


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorboard")
    monitor = FisherMonitor(every_n_steps=2, structures=("diag", "block"))
    logger = TensorBoardLogger(root)
    fit(monitor, steps=5, logger=logger)
    (event_file,) = glob.glob(str(root / "lightning_logs" / "version_0" / "events.*"))
    events = EventAccumulator(
        event_file, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    )
    events.Reload()
    return events, logger, monitor


def test_scalars_are_written_once_with_their_description(tensorboard_run):
    events, _, _ = tensorboard_run
    tags = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("~fisher/block/direction_cosine/all")] == [0, 2, 4]
    assert [e.step for e in events.Scalars("~fisher/probe/overhead")] == [0, 2, 4]
    assert "~fisher/diag/trace_ratio/net.0" in tags
    assert not [tag for tag in tags if "/dimension/" in tag]  # constants are settings
    for tag in tags:
        if tag.startswith("~fisher/"):
            assert len(events.Scalars(tag)) <= 3, tag  # no tag written twice per step
    metadata = events.SummaryMetadata("~fisher/block/direction_cosine/net.3")
    assert metadata.summary_description.startswith("cos(F̃⁻¹g, ẼF⁻¹g): natural gradient")
    assert "Structure block, layer net.3." in metadata.summary_description
    overhead = events.SummaryMetadata("~fisher/probe/overhead").summary_description
    assert overhead.startswith(keys.PROBE_DESCRIPTIONS["overhead"])
    # the optimizer audit (SGD: its step, no preconditioner)
    assert [e.step for e in events.Scalars("~fisher/block/update_nat_cosine/all")] == [0, 2, 4]
    audit = events.SummaryMetadata("~fisher/block/update_grad_cosine/net.0")
    assert "the optimizer's step against plain gradient descent" in audit.summary_description


def test_histograms_image_and_text(tensorboard_run):
    events, _, _ = tensorboard_run
    tags = events.Tags()
    assert set(tags["histograms"]) == {
        "~fisher/histograms/log10_ef_over_f/net.0",
        "~fisher/histograms/log10_ef_over_f/net.3",
    }
    steps = [e.step for e in events.Histograms("~fisher/histograms/log10_ef_over_f/net.0")]
    assert steps == [0, 2, 4]
    histogram = events.SummaryMetadata("~fisher/histograms/log10_ef_over_f/net.0")
    assert histogram.summary_description.startswith("log10(EF_ii / F_ii)")
    images = events.Images("~fisher/images/direction_cosine")
    # drawn at every tenth measurement and at the end of training: with three, at the end
    # drawn at the size TensorBoard's image card shows it (about 350 px), not scaled down
    assert [e.step for e in images] == [4] and 300 <= images[-1].width <= 360
    assert (
        "green from 0.9"
        in events.SummaryMetadata("~fisher/images/direction_cosine").summary_description
    )
    (text,) = events.Tensors("~fisher/settings/text_summary")
    content = text.tensor_proto.string_val[0].decode()
    assert "| fisher | exact |" in content and "| net.0 | Linear |" in content
    assert "| structures | diag, block |" in content


def read_layout(events) -> layout_pb2.Layout:
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return layout


def test_custom_scalars_layout_in_the_event_file(tensorboard_run):
    events, _, _ = tensorboard_run
    layout = read_layout(events)
    titles = [category.title for category in layout.category]
    assert titles[:5] == [  # an overview first, then the structure the verdicts use
        "~fisher: overview (whole network; with few points set Smoothing to 0)",
        "~fisher: block",
        "~fisher: block by layer",
        "~fisher: diag",
        "~fisher: diag by layer",
    ]
    assert "~fisher: probe" in titles
    overview = layout.category[0]
    assert [c.title.split(" ")[0] for c in overview.chart] == [
        "direction_cosine",
        "rel_error",
        "trace_ratio",
        "update_nat_cosine",  # the optimizer is audited (SGD)
    ]
    first = overview.chart[0]
    assert first.title == (
        "direction_cosine (block, all): EF step vs natural gradient, cos(F̃⁻¹g, ẼF⁻¹g); "
        "1 same; ≥ 0.9 agree, < 0.5 disagree"
    )
    assert list(first.multiline.tag) == [re.escape("~fisher/block/direction_cosine/all") + "$"]
    assert "> 0.5 differ" in overview.chart[1].title
    assert "outside [0.5, 2] off" in overview.chart[2].title
    by_layer = next(c for c in layout.category if c.title == "~fisher: block by layer")
    chart = next(c for c in by_layer.chart if c.title.startswith("direction_cosine · net.0"))
    assert chart.title == "direction_cosine · net.0 (1 same; ≥ 0.9 agree, < 0.5 disagree)"
    assert list(chart.multiline.tag) == [re.escape("~fisher/block/direction_cosine/net.0") + "$"]
    scalar_tags = events.Tags()["scalars"]
    for category in layout.category:
        for chart in category.chart:
            assert len(chart.multiline.tag) == 1, chart.title  # one line per chart
            for pattern in chart.multiline.tag:  # every chart shows logged tags
                assert any(re.match(pattern, tag) for tag in scalar_tags), (chart.title, pattern)


def test_the_overview_takes_each_metric_from_a_structure_that_logged_it():
    """A sketched block Fisher logs no direction cosine: the overview shows the diagonal's."""
    logged = {"block/rel_error/all", "block/trace_ratio/all", "diag/direction_cosine/all"}
    layout = custom_scalar_layout("f", ["diag", "block"], [1e-3], ["a"], audit=True, logged=logged)
    overview = next(iter(layout.values()))
    assert len(overview) == 4
    tags = [tags[0] for _, tags in overview.values()]
    assert tags == [
        re.escape("f/diag/direction_cosine/all") + "$",
        re.escape("f/block/rel_error/all") + "$",
        re.escape("f/block/trace_ratio/all") + "$",
        re.escape("f/diag/update_nat_cosine/all") + "$",  # audited where solves exist
    ]
    no_audit = custom_scalar_layout("f", ["diag"], [1e-3], ["a"])
    assert list(next(iter(no_audit.values())))[-1].startswith("kl (diag, all)")


def test_the_guide_card_says_how_to_read_the_charts(tensorboard_run):
    events, _, _ = tensorboard_run
    (text,) = events.Tensors("~fisher/guide/text_summary")
    guide = text.tensor_proto.string_val[0].decode()
    assert "Custom Scalars → ~fisher: overview" in guide
    assert "≥ 0.9: agree" in guide and "< 0.5: disagree" in guide and "> 0.5: different" in guide
    assert "Smoothing to 0" in guide and "Ignore outliers" in guide
    assert "docs/glossary.md" in guide and "docs/guide/acting.md" in guide
    assert "`update_nat_cosine`" in guide  # the optimizer's row, when audited


def test_hyperparameters_and_the_run_file(tensorboard_run):
    _, logger, _ = tensorboard_run
    assert logger.hparams["~fisher/dimension/all"] == 67
    assert logger.hparams["~fisher/fisher"] == "exact"
    info = runinfo.read(logger.log_dir)["~fisher"]
    assert info["settings"]["structures"] == ["diag", "block"]
    assert info["settings"]["schedule"] == "every(2, offset=0)"
    assert info["settings"]["optimizer"] == "SGD"
    assert info["settings"]["loss"] == "CrossEntropyLoss(reduction='mean', ignore_index=-100)"
    assert info["settings"]["network"] == "TinyClassifier"
    assert info["settings"]["fixed_probe"] is False
    assert [layer["layer"] for layer in info["layers"]] == ["net.0", "net.3"]
    assert info["layers"][0]["dimension"] == 40
    fit_block = info["fit"]
    assert fit_block["measurements"] == 3 and fit_block["steps"] == [0, 2, 4]
    assert 0 < fit_block["monitor_seconds"] < fit_block["fit_seconds"]
    assert fit_block["overhead"] == pytest.approx(
        fit_block["monitor_seconds"] / fit_block["fit_seconds"]
    )
    assert json.loads(json.dumps(info)) == info  # plain JSON


def test_every_chart_has_one_tag():
    """Issue 22, item 3: TensorBoard colours lines by run, so lines in one chart of one run
    cannot be told apart."""
    layout = custom_scalar_layout(
        "fisher",
        ["diag", "block"],
        [1e-3, 1e-1],
        ["enc.0", "enc.2"],
        audit=True,
        preconditioner=True,
    )
    assert len(next(iter(layout.values()))) <= 4  # the overview
    titles = set()
    for category, charts in layout.items():
        for title, (kind, tags) in charts.items():
            assert kind == "Multiline" and len(tags) == 1, (category, title)
            assert "dimension" not in tags[0]
            titles.add((category, title))
    block = [title for category, title in titles if category == "fisher: block"]
    assert not [title for title in block if title.startswith("damping (all)")]  # one per λ
    assert any(title.startswith("damping (all λ=0.1)") for title in block)
    assert any(title.startswith("kl (all λ=0.1)") for title in block)
    absolute = custom_scalar_layout("fisher", ["diag"], [1e-3], ["a"], constant_damping=True)
    assert not [title for title in absolute["fisher: diag"] if title.startswith("damping")]


def test_descriptions_of_keys():
    assert description("diag/kl@0.001/all").endswith(
        "Structure diag, whole network, λ = 0.001. Terms: docs/glossary.md#kl."
    )
    assert description("block/trace_ratio_se/fc").startswith("Standard error of trace_ratio")
    assert description("optimizer/preconditioner_ef_cosine/all").endswith(
        "Optimizer audit, whole network. Terms: docs/glossary.md#preconditioner."
    )
    assert description("probe/loss").startswith(keys.PROBE_DESCRIPTIONS["loss"])
    assert description("something/else") == ""
    for metric in (*keys.METRICS, *keys.UPDATE_METRICS):  # every chart links the glossary
        assert "Terms: docs/glossary.md#" in description(f"block/{metric}/all"), metric


def test_tensorboard_reads_every_tag_without_complaint(tensorboard_run, caplog):
    _, logger, _ = tensorboard_run
    with caplog.at_level("WARNING", logger="tensorboard"):
        events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
        events.Reload()
    assert not [r for r in caplog.records if "not associated with a plugin" in r.getMessage()]
    metadata = events.SummaryMetadata("~fisher/probe/loss")
    assert metadata.plugin_data.plugin_name == "scalars"


def test_histogram_summary_matches_numpy():
    """Our torch-made histogram has NumPy's counts, edges and moments."""
    import numpy as np

    from fisher_monitor.callback.tensorboard import HISTOGRAM_BINS, histogram_summary

    data = np.random.default_rng(0).normal(size=5000).astype(np.float32)
    (value,) = histogram_summary("h", data).value
    histo = value.histo
    counts, edges = np.histogram(data.astype(np.float64), bins=HISTOGRAM_BINS)
    assert histo.num == 5000 and histo.min == data.min() and histo.max == data.max()
    assert histo.sum == pytest.approx(data.astype(np.float64).sum(), rel=1e-12, abs=1e-9)
    assert histo.sum_squares == pytest.approx(np.square(data.astype(np.float64)).sum(), rel=1e-12)
    np.testing.assert_allclose(histo.bucket_limit, edges[1:], rtol=1e-12)
    # torch.histc and NumPy may put a value lying on an edge in neighbouring bins
    assert sum(histo.bucket) == 5000
    assert np.abs(np.array(histo.bucket) - counts).sum() <= 4
    (constant,) = histogram_summary("c", np.full(7, 2.5)).value
    assert list(constant.histo.bucket) == [7] and list(constant.histo.bucket_limit) == [2.5]
    (finite,) = histogram_summary("f", np.array([1.0, np.nan, np.inf, 3.0])).value
    assert finite.histo.num == 2 and finite.histo.min == 1.0 and finite.histo.max == 3.0
    assert histogram_summary("n", np.array([np.nan, -np.inf])) is None


def test_log_ratio_histogram_values_keep_tiny_entries_and_drop_undefined_ones():
    """``log10(EF_ii / F_ii)`` where both are positive and finite, also below float32's range."""
    import numpy as np

    from fisher_monitor.callback.tensorboard import ef_over_f_log_ratios

    fisher = torch.tensor([1.0, 0.0, 1e-300, 2.0, 0.0, 1e-45, 1.0, np.nan, 4.0], dtype=F64)
    empirical = torch.tensor([10.0, 0.0, 1e-250, 0.0, 3.0, 1e-44, 1e-60, 1.0, np.inf], dtype=F64)
    (ratios,) = ef_over_f_log_ratios({"layer": (fisher, empirical)}).values()
    f, e = fisher.numpy(), empirical.numpy()
    defined = (f > 0) & (e > 0) & np.isfinite(f) & np.isfinite(e)
    expected = np.log10(e[defined]) - np.log10(f[defined])  # 1, 50, 1, -60
    assert ratios.dtype == np.float32
    np.testing.assert_allclose(ratios, expected, rtol=1e-6)
    many = torch.rand(1000, dtype=F64) + 0.1, torch.rand(1000, dtype=F64) + 0.1
    (all_finite,) = ef_over_f_log_ratios({"layer": many}).values()
    expected = np.log10(many[1].numpy()) - np.log10(many[0].numpy())
    np.testing.assert_allclose(all_finite, expected, rtol=1e-6, atol=1e-6)


def test_no_heat_map_of_a_single_measurement(tmp_path):
    monitor = FisherMonitor(every_n_steps=100, structures=("diag",))
    logger = TensorBoardLogger(tmp_path)
    fit(monitor, steps=3, logger=logger)
    (event_file,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "events.*"))
    events = EventAccumulator(event_file, size_guidance={"images": 0})
    events.Reload()
    assert "~fisher/images/direction_cosine" not in events.Tags()["images"]

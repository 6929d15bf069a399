"""Reading event files once: every valid record, damaged tails reported, nothing decoded twice."""

from __future__ import annotations

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_crc
from tensorboard.util import tensor_util

from fisher_monitor.report import events as events_module
from fisher_monitor.report.events import EventFileError, masked_crc32c, read_directory
from synthetic import histogram_event, scalar_event, write_events


def scalar_run(directory, count=20):
    events = [scalar_event("fisher/block/kl/all", step, step / 10) for step in range(count)]
    return write_events(directory, events)


def test_masked_crc_matches_tensorboards():
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert masked_crc32c(data) == reference_crc(data)


def test_every_record_is_read_with_the_values_written(tmp_path):
    scalar_run(tmp_path)
    data = read_directory(tmp_path)
    steps, values = data.scalars["fisher/block/kl/all"]
    assert steps.tolist() == list(range(20))
    np.testing.assert_allclose(values, np.arange(20) / 10, rtol=1e-6)  # float32 on disk
    (report,) = data.files
    assert report.records == 21 and report.skipped_bytes == 0 and report.message() is None


def test_same_values_as_tensorboards_own_reader(tmp_path):
    rng = np.random.default_rng(0)
    events = [
        scalar_event(f"fisher/diag/{metric}/fc{i}", step, float(rng.normal()))
        for step in range(0, 50, 5)
        for metric in ("kl", "trace_ratio")
        for i in range(3)
    ]
    events += [
        histogram_event("fisher/histograms/log10_ef_over_f/fc0", s, rng.normal(size=50))
        for s in (0, 5)
    ]
    write_events(tmp_path, events)
    ours = read_directory(tmp_path)
    theirs = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    theirs.Reload()
    for tag in theirs.Tags()["scalars"]:
        expected = theirs.Scalars(tag)
        steps, values = ours.scalars[tag]
        assert steps.tolist() == [e.step for e in expected]
        assert values.tolist() == [e.value for e in expected]
    (histogram,) = theirs.Histograms("fisher/histograms/log10_ef_over_f/fc0")[:1]
    edges, counts = ours.histograms["fisher/histograms/log10_ef_over_f/fc0"].at(0)
    assert counts.tolist() == list(histogram.histogram_value.bucket)
    assert edges[0] == histogram.histogram_value.min and len(edges) == len(counts) + 1


def test_a_step_logged_twice_keeps_the_last_value(tmp_path):
    write_events(tmp_path, [scalar_event("t", 1, 1.0), scalar_event("t", 0, 0.0)], "a")
    write_events(tmp_path, [scalar_event("t", 1, 5.0)], "b")
    steps, values = read_directory(tmp_path).scalars["t"]
    assert steps.tolist() == [0, 1] and values.tolist() == [0.0, 5.0]


def test_tensor_scalars_with_summary_metadata_are_read(tmp_path):
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        summary_description="what the number means",
    )
    events = []
    for step in range(3):
        value = summary_pb2.Summary.Value(
            tag="fisher/diag/kl/all", tensor=tensor_util.make_tensor_proto(np.float32(step))
        )
        if step == 0:  # TensorBoard writers attach metadata to the first event only
            value.metadata.CopyFrom(metadata)
        events.append(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=[value])))
    write_events(tmp_path, events)
    steps, values = read_directory(tmp_path).scalars["fisher/diag/kl/all"]
    assert steps.tolist() == [0, 1, 2] and values.tolist() == [0.0, 1.0, 2.0]


def test_histograms_are_kept_only_where_asked(tmp_path):
    rng = np.random.default_rng(1)
    write_events(
        tmp_path,
        [histogram_event(tag, 0, rng.normal(size=30)) for tag in ("keep/me", "drop/me")],
    )
    data = read_directory(tmp_path, keep_histogram=lambda tag: tag.startswith("keep"))
    assert list(data.histograms) == ["keep/me"]


@pytest.mark.parametrize("cut", [1, 5, 13, 37])
def test_a_partial_last_record_is_skipped_and_counted(tmp_path, cut):
    """Issue 12, item 5: a file ending in a partial record is read up to that record."""
    path = scalar_run(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    read = read_directory(tmp_path)
    (report,) = read.files
    starts = record_starts(data)
    assert len(starts) == 21
    assert report.records == 20  # the version record and 19 of 20 scalars
    assert report.skipped_bytes == len(data) - cut - starts[-1]
    assert read.scalars["fisher/block/kl/all"][0].tolist() == list(range(19))
    message = report.message()
    assert f"skipped the last {report.skipped_bytes:,} of {len(data) - cut:,} bytes" in message
    assert "partial record" in message
    with pytest.raises(EventFileError, match="corrupt or truncated event file"):
        read_directory(tmp_path, strict=True)


def test_damage_in_the_middle_costs_one_record(tmp_path):
    """Issue 21, item 4: the reader resynchronises on the next valid record."""
    path = scalar_run(tmp_path)
    starts = record_starts(path.read_bytes())
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    (report,) = read_directory(tmp_path).files
    assert report.problem and "checksum" in report.problem
    damaged = max(i for i, start in enumerate(starts) if start <= 200)
    assert report.records == len(starts) - 1
    assert report.skipped_bytes == starts[damaged + 1] - starts[damaged]
    assert f"at byte {starts[damaged]:,}" in report.message()


def record_starts(data: bytes) -> list[int]:
    """File offsets of the records, from their length fields (16 bytes of framing each)."""
    starts, position = [], 0
    while position + 8 <= len(data):
        starts.append(position)
        position += int.from_bytes(data[position : position + 8], "little") + 16
    return starts


def test_each_record_is_decoded_once(tmp_path, monkeypatch):
    """Issue 12, item 7: one read and one decode per record (no validation pass)."""
    scalar_run(tmp_path, count=30)
    decoded = []
    original = event_pb2.Event.FromString

    class CountingEvent:
        @staticmethod
        def FromString(data):  # noqa: N802 - protobuf's name
            decoded.append(data)
            return original(data)

    monkeypatch.setattr("tensorboard.compat.proto.event_pb2.Event", CountingEvent)
    opened = []
    real_open = events_module.Path.open

    def counting_open(self, *args, **kwargs):
        opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(events_module.Path, "open", counting_open)
    read = read_directory(tmp_path)
    (report,) = read.files
    assert len(decoded) == report.records == 31
    assert len(set(decoded)) == 31 - 0  # each record once (all differ: steps differ)
    assert len(opened) == 1


def test_progress_is_told_every_byte(tmp_path):
    path = scalar_run(tmp_path)
    seen = []
    read_directory(tmp_path, on_bytes=seen.append)
    assert sum(seen) == path.stat().st_size
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    seen.clear()
    read_directory(tmp_path, on_bytes=seen.append)
    assert sum(seen) == len(data) - 7

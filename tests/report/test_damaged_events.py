"""Issue 21, item 4: one damaged byte costs one record, not the rest of the file.

A real event file (written by ``Trainer.fit`` with FisherMonitor) damaged at random
offsets: the reader resynchronises on the next valid record, keeps every record that was
not touched, and says how many bytes it skipped and where. Before, 4 of 12 random byte
flips lost the rest of the file ("no fisher-monitor data in these event files").
"""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.compat.proto import event_pb2

from fisher_monitor.report.cli import main
from fisher_monitor.report.events import (
    EventFileError,
    masked_crc32c,
    read_directory,
)
from fisher_monitor.report.load import load_runs
from synthetic import fisher_run


def records(data: bytes) -> list[tuple[int, int]]:
    """``(start, stop)`` file offsets of each record of an undamaged file."""
    spans, position = [], 0
    while position < len(data):
        (length,) = struct.unpack_from("<Q", data, position)
        spans.append((position, position + 16 + length))
        position += 16 + length
    assert position == len(data)
    return spans


def scalars_of(data: bytes, spans: list[tuple[int, int]], lost: set[int]) -> dict:
    """What the records not in ``lost`` hold: per tag, ``{step: value}`` (last one wins)."""
    found: dict[str, dict[int, float]] = {}
    for index, (start, stop) in enumerate(spans):
        if index in lost:
            continue
        event = event_pb2.Event.FromString(data[start + 12 : stop - 4])
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def read_scalars(directory) -> dict:
    data = read_directory(directory)
    found = {
        tag: dict(zip(steps.tolist(), values.tolist(), strict=True))
        for tag, (steps, values) in data.scalars.items()
    }
    return found, data.files[0]


class RealFile(tuple):
    """``(directory, path, bytes, record spans)`` of a copied event file (short repr)."""

    def __repr__(self) -> str:
        return f"RealFile({self[1].name}, {len(self[2])} bytes, {len(self[3])} records)"


@pytest.fixture
def real_file(plain_run, tmp_path):
    """A copy of the event file of a real fit, with its bytes and record spans."""
    directory = tmp_path / "run"
    shutil.copytree(plain_run, directory)
    (path,) = directory.glob("events.out.tfevents.*")
    data = path.read_bytes()
    return RealFile((directory, path, data, records(data)))


def damage(path, data: bytes, offsets) -> None:
    damaged = bytearray(data)
    for offset in offsets:
        damaged[offset] ^= 0xFF
    path.write_bytes(bytes(damaged))


def test_twelve_random_byte_flips_each_cost_one_record(real_file):
    directory, path, data, spans = real_file
    rng = np.random.default_rng(21)
    for offset in rng.integers(0, len(data), 12).tolist():
        damage(path, data, [offset])
        hit = next(i for i, (start, stop) in enumerate(spans) if start <= offset < stop)
        found, report = read_scalars(directory)
        assert found == scalars_of(data, spans, {hit})
        assert report.records == len(spans) - 1
        assert report.skipped_bytes == spans[hit][1] - spans[hit][0]
        (run,) = load_runs([directory])  # the report still has its run
        assert run.steps
        assert f"at byte {spans[hit][0]:,}" in run.read_notes[0] or "the last" in run.read_notes[0]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    flips=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
)
def test_flips_and_a_cut_lose_exactly_the_records_touched(real_file, flips, cut):
    directory, path, data, spans = real_file
    offsets = sorted({int(f * len(data)) for f in flips})
    damaged = bytearray(data)
    for offset in offsets:
        damaged[offset] ^= 0xA5
    end = len(data) if cut is None else int(cut * len(data))
    path.write_bytes(bytes(damaged[:end]))
    lost = {i for i, (start, stop) in enumerate(spans) if stop > end}
    lost |= {i for offset in offsets for i, (s, e) in enumerate(spans) if s <= offset < e}
    found, report = read_scalars(directory)
    assert found == scalars_of(data, spans, lost)
    assert report.records == len(spans) - len(lost)
    expected = sum(
        max(0, min(stop, end) - start) for i, (start, stop) in enumerate(spans) if i in lost
    )
    assert report.skipped_bytes == expected
    assert (report.message() is None) == (expected == 0)


def test_a_valid_header_claiming_a_huge_length_is_skipped(real_file):
    directory, path, data, spans = real_file
    start, _ = spans[5]
    header = struct.pack("<Q", 2**40)
    forged = data[:start] + header + struct.pack("<I", masked_crc32c(header)) + data[start + 12 :]
    path.write_bytes(forged)
    found, report = read_scalars(directory)
    assert found == scalars_of(data, spans, {5})
    assert "partial record" in report.problem


def test_an_undecodable_record_with_valid_checksums_is_skipped(real_file):
    directory, path, data, spans = real_file
    start, stop = spans[4]
    payload = b"\xff" * 20  # not a protocol buffer
    header = struct.pack("<Q", len(payload))
    bad = header + struct.pack("<I", masked_crc32c(header))
    bad += payload + struct.pack("<I", masked_crc32c(payload))
    path.write_bytes(data[:start] + bad + data[stop:])
    found, report = read_scalars(directory)
    assert found == scalars_of(data, spans, {4})
    assert "undecodable record" in report.problem and report.skipped_bytes == len(bad)


def test_garbage_inserted_between_records_is_skipped(real_file):
    directory, path, data, spans = real_file
    start, _ = spans[7]
    path.write_bytes(data[:start] + b"\x00" * 1000 + data[start:])
    found, report = read_scalars(directory)
    assert found == scalars_of(data, spans, set())
    assert report.skipped_bytes == 1000 and report.records == len(spans)


def test_strict_mode_refuses_damage_in_the_middle(real_file):
    directory, path, data, spans = real_file
    damage(path, data, [spans[3][0] + 20])
    with pytest.raises(EventFileError, match="corrupt or truncated event file"):
        read_directory(directory, strict=True)


def test_the_command_line_reports_and_says_what_it_skipped(real_file, tmp_path, capsys):
    directory, path, data, spans = real_file
    damage(path, data, [spans[2][0] + 14, spans[9][0] + 3])  # two places
    assert main(["report", str(directory), "-o", str(tmp_path / "out"), "--format", "md"]) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert f"read {len(spans) - 2} records; skipped" in warning
    assert "at 2 damaged places" in warning and "read on from the next valid record" in warning
    assert "read on from the next valid record" in (tmp_path / "out" / "report.md").read_text()


def test_a_synthetic_run_damaged_everywhere_still_loads(tmp_path):
    run = fisher_run(tmp_path / "run", steps=tuple(range(0, 200, 10)))
    (path,) = run.glob("events.out.tfevents.*")
    data = path.read_bytes()
    spans = records(data)
    damage(path, data, [start + 13 for start, _ in spans[1::3]])  # every third record
    (loaded,) = load_runs([run])
    assert len(loaded.steps) == 20  # each step keeps most of its metrics

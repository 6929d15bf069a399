"""Read TensorBoard event files once: every valid record, and what was skipped.

An event file is a sequence of TFRecords (``uint64 length``, ``uint32`` masked CRC-32C of
the length, the serialised ``Event``, ``uint32`` masked CRC-32C of the data). Each record
is read, checked and decoded exactly once, with TensorBoard's own ``Event`` protocol
buffer (decoded by protobuf's C implementation). Why not TensorBoard's loaders: without
TensorFlow installed, ``EventFileLoader`` checks every byte with a pure-Python CRC
(about 11 MB/s) and the ``EventAccumulator`` keeps Python objects per point; the Rust
data server is a separate gRPC process that downsamples series unless told not to. And
all of them treat a damaged or partial record as "still being written" and stop quietly,
where a report must say what it skipped.

A damaged record (a flipped bit, a block of a disk that was lost) does not end the file:
the framing (length, checksum of the length, data, checksum of the data) lets the reader
resynchronise on the next valid record, so one bad byte costs one record, not the rest of
the file. A file that ends in a partial record (a full disk, a copy taken while the run
was writing, a network file system) is read up to that record. How many bytes were
skipped, and where, is reported once per file. ``strict=True`` refuses such a file.
"""

from __future__ import annotations

import itertools
import operator
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EVENT_GLOB = "events.out.tfevents.*"
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_CHUNK = 8 * 2**20  # bytes read at a time: memory stays flat whatever the file size
_MASK_DELTA = 0xA282EAD8

try:  # C implementation (about 1000× the pure-Python one)
    from google_crc32c import value as _crc32c
except ImportError:  # pragma: no cover - depends on the environment
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as _crc32c


class EventFileError(Exception):
    """A damaged or partial event file read with ``strict=True``."""


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C: ``rotr15(crc) + 0xa282ead8`` (mod 2³²)."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


@dataclass(frozen=True)
class SkippedRegion:
    """A stretch of an event file that held no valid record.

    Attributes:
        offset: Its first byte in the file.
        length: Its length in bytes.
        reason: Why its first record was refused (e.g. a checksum mismatch).
    """

    offset: int
    length: int
    reason: str


@dataclass
class FileReport:
    """How one event file was read.

    Attributes:
        path: The file.
        size: Its size in bytes.
        records: Records read and decoded.
        regions: The damaged stretches skipped, in file order; reading went on at the
            next valid record after each.
    """

    path: Path
    size: int
    records: int = 0
    regions: list[SkippedRegion] = field(default_factory=list)

    @property
    def skipped_bytes(self) -> int:
        """Bytes that were not read as records (every damaged stretch together)."""
        return sum(region.length for region in self.regions)

    @property
    def problem(self) -> str | None:
        """Why the first damaged stretch was skipped (``None`` when every byte was read)."""
        return self.regions[0].reason if self.regions else None

    def message(self) -> str | None:
        """One line for the user when bytes were skipped (``None`` otherwise)."""
        if not self.regions:
            return None
        last = self.regions[-1]
        tail = last if last.offset + last.length == self.size else None
        inside = [region for region in self.regions if region is not tail]
        parts = []
        if inside:
            first = inside[0]
            places = "1 damaged place" if len(inside) == 1 else f"{len(inside)} damaged places"
            parts.append(
                f"skipped {sum(r.length for r in inside):,} of {self.size:,} bytes at {places} "
                f"(the first at byte {first.offset:,}: {first.reason}) and read on from the "
                "next valid record"
            )
        if tail is not None:
            parts.append(f"skipped the last {tail.length:,} of {self.size:,} bytes ({tail.reason})")
        return f"{self.path}: read {self.records} records; " + "; ".join(parts)


@dataclass
class HistogramSeries:
    """Histograms of one tag over steps, stored flat (one array for all buckets).

    Attributes:
        steps: Step of each histogram, increasing.
        offsets: Histogram ``i`` has buckets ``offsets[i]:offsets[i + 1]``.
        counts: Bucket counts, all histograms one after the other.
        edges: Bucket edges; histogram ``i`` has ``offsets[i + 1] - offsets[i] + 1`` of them,
            starting at ``edges[offsets[i] + i]``.
    """

    steps: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    edges: np.ndarray

    def at(self, step: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(edges, counts)`` of the histogram at ``step`` (``None`` when not logged)."""
        index = int(np.searchsorted(self.steps, step))
        if index >= len(self.steps) or self.steps[index] != step:
            return None
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.edges[start + index : stop + index + 1], self.counts[start:stop]


@dataclass
class EventData:
    """What the event files of one directory hold.

    Attributes:
        scalars: Per tag, ``(steps, values)`` sorted by step; a step logged twice keeps
            the value written last (as TensorBoard shows it).
        histograms: Per tag (only tags ``keep_histogram`` accepted), the histograms.
        files: How each file was read.
    """

    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    histograms: dict[str, HistogramSeries] = field(default_factory=dict)
    files: list[FileReport] = field(default_factory=list)


class _Collector:
    """Accumulates decoded values in compact typed arrays (no object per point)."""

    def __init__(self, keep_histogram: Callable[[str], bool]):
        self.scalars: dict[str, tuple[array, array]] = {}
        self.histograms: dict[str, tuple[array, array, array, array]] = {}
        self.keep_histogram = keep_histogram
        self.plugins: dict[str, str] = {}  # tag -> plugin of its tensor values
        from tensorboard.compat.proto.event_pb2 import Event

        self.decode = Event.FromString

    def add(self, data: bytes) -> None:
        event = self.decode(data)
        step, scalars = event.step, self.scalars
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                tag = value.tag
                series = scalars.get(tag)
                if series is None:
                    series = scalars[tag] = (array("q"), array("d"))
                series[0].append(step)
                series[1].append(value.simple_value)
            elif kind == "histo":
                if self.keep_histogram(value.tag):
                    self._histogram_proto(value.tag, step, value.histo)
            elif kind == "tensor":
                self._tensor(value, step)

    def _scalar(self, tag: str, step: int, number: float) -> None:
        series = self.scalars.get(tag)
        if series is None:
            series = self.scalars[tag] = (array("q"), array("d"))
        series[0].append(step)
        series[1].append(number)

    def _histogram_series(self, tag: str) -> tuple[array, array, array, array]:
        series = self.histograms.get(tag)
        if series is None:
            series = self.histograms[tag] = (array("q"), array("q", [0]), array("d"), array("d"))
        return series

    def _histogram_proto(self, tag: str, step: int, histogram) -> None:
        counts = np.asarray(histogram.bucket, dtype=np.float64)
        if not len(counts):
            return
        # TensorBoard stores right edges; the first bucket starts at the minimum
        edges = np.empty(len(counts) + 1)
        edges[0] = histogram.min
        np.minimum(
            np.asarray(histogram.bucket_limit, dtype=np.float64), histogram.max, out=edges[1:]
        )
        self._append_histogram(tag, step, edges, counts)

    def _append_histogram(self, tag: str, step: int, edges, counts) -> None:
        steps, offsets, all_counts, all_edges = self._histogram_series(tag)
        steps.append(step)
        all_counts.frombytes(np.asarray(counts, dtype=np.float64).tobytes())
        all_edges.frombytes(np.asarray(edges, dtype=np.float64).tobytes())
        offsets.append(len(all_counts))

    def _tensor(self, value, step: int) -> None:
        from tensorboard.util import tensor_util

        tag = value.tag
        if value.HasField("metadata") and value.metadata.plugin_data.plugin_name:
            self.plugins[tag] = value.metadata.plugin_data.plugin_name
        plugin = self.plugins.get(tag)
        if plugin not in ("scalars", "histograms"):
            return
        try:
            data = tensor_util.make_ndarray(value.tensor)
        except (ValueError, TypeError):
            return
        if plugin == "scalars" and data.size == 1:
            self._scalar(tag, step, float(data.reshape(())))
        elif plugin == "histograms" and data.ndim == 2 and data.shape[1] == 3 and len(data):
            if self.keep_histogram(tag):  # rows: left edge, right edge, count
                edges = [*data[:, 0].tolist(), float(data[-1, 1])]
                self._append_histogram(tag, step, edges, data[:, 2].tolist())

    def result(self) -> tuple[dict, dict]:
        scalars = {}
        shared: dict[bytes, np.ndarray] = {}  # the tags of a run mostly share their steps
        for tag, (steps, values) in self.scalars.items():
            if all(map(operator.lt, steps, itertools.islice(steps, 1, None))):
                raw = steps.tobytes()
                steps_array = shared.get(raw)
                if steps_array is None:  # read-only, as it may be shared
                    steps_array = shared[raw] = np.frombuffer(raw, dtype=np.int64)
                values_array = np.frombuffer(values, dtype=np.float64).copy()
            else:  # out of order or repeated (a resumed run)
                steps_array = np.frombuffer(steps, dtype=np.int64)
                keep = _last_per_step(steps_array)
                steps_array = steps_array[keep]
                values_array = np.frombuffer(values, dtype=np.float64)[keep]
            scalars[tag] = (steps_array, values_array)
        histograms = {}
        for tag, (steps, offsets, counts, edges) in self.histograms.items():
            histograms[tag] = _histogram_result(steps, offsets, counts, edges)
        return scalars, histograms


def _last_per_step(steps: np.ndarray) -> np.ndarray:
    """Indices that sort ``steps`` and keep, for a repeated step, its last occurrence."""
    order = np.argsort(steps, kind="stable")
    ordered = steps[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    return order[last]


def _histogram_result(steps, offsets, counts, edges) -> HistogramSeries:
    steps = np.frombuffer(steps, dtype=np.int64)
    offsets = np.frombuffer(offsets, dtype=np.int64)
    counts = np.frombuffer(counts, dtype=np.float64)
    edges = np.frombuffer(edges, dtype=np.float64)
    keep = _last_per_step(steps)
    if len(keep) == len(steps) and np.all(keep == np.arange(len(steps))):
        return HistogramSeries(steps.copy(), offsets.copy(), counts.copy(), edges.copy())
    new_counts, new_edges, new_offsets = [], [], [0]
    for index in keep:
        start, stop = offsets[index], offsets[index + 1]
        new_counts.append(counts[start:stop])
        new_edges.append(edges[start + index : stop + index + 1])
        new_offsets.append(new_offsets[-1] + stop - start)
    return HistogramSeries(
        steps[keep],
        np.asarray(new_offsets, dtype=np.int64),
        np.concatenate(new_counts),
        np.concatenate(new_edges),
    )


class _Records:
    """The payloads of a file's valid records; damaged stretches are skipped and recorded.

    At each position a record is tried: its length (the header's checksum must match and
    the record must end inside the file), then its data (the data's checksum). Where
    either fails, the reader moves on one byte at a time until a position holds a valid
    record again (resynchronises): the framing's two checksums make a false match about
    one in 2⁶⁴. The stretches skipped are :attr:`regions`; reading never goes past
    ``size`` bytes (a file still being written is read as it was when it was opened).
    """

    def __init__(self, stream, size: int, on_bytes: Callable[[int], None] | None):
        self.stream = stream
        self.size = size
        self.on_bytes = on_bytes
        self.regions: list[SkippedRegion] = []
        self._bad: tuple[int, str] | None = None  # start and reason of the stretch being skipped
        self._last, self._last_length = 0, 0  # offset and data length of the last record
        self._read = 0

    def _refill(self, data: bytes, position: int, needed: int) -> bytes:
        """``data[position:]`` extended until ``needed`` bytes or ``size`` bytes were read."""
        data = data[position:]
        while len(data) < needed and self._read < self.size:
            amount = min(max(_CHUNK, needed - len(data)), self.size - self._read)
            chunk = self.stream.read(amount)
            if not chunk:
                break
            self._read += len(chunk)
            if self.on_bytes is not None:
                self.on_bytes(len(chunk))
            data += chunk
        return data

    def _damaged(self, offset: int, reason: str) -> None:
        if self._bad is None:
            self._bad = (offset, reason)

    def _resynchronised(self, offset: int) -> None:
        if self._bad is not None:
            start, reason = self._bad
            self.regions.append(SkippedRegion(start, offset - start, reason))
            self._bad = None

    def skip_last(self, reason: str) -> None:
        """Count the record yielded last as skipped (its data could not be decoded)."""
        self.regions.append(SkippedRegion(self._last, self._last_length + 16, reason))

    def __iter__(self) -> Iterator[bytes]:
        crc32c, header, footer = _crc32c, _HEADER.unpack_from, _FOOTER.unpack_from
        size = self.size
        data, position, base = b"", 0, 0  # base: file offset of data[0]
        while True:
            if position + 12 > len(data):
                data = self._refill(data, position, 12)
                base, position = base + position, 0
                if len(data) < 12:
                    if data:
                        self._damaged(base, f"a partial record: {len(data)} bytes of its header")
                    self._resynchronised(base + len(data))
                    return
            length, header_crc = header(data, position)
            crc = crc32c(data[position : position + 8])
            if (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF != header_crc:
                self._damaged(base + position, "a damaged record header (checksum mismatch)")
                position += 1
                continue
            stop = position + 16 + length
            if base + stop > size:
                offset = base + position
                self._damaged(
                    offset, f"a partial record: {size - offset:,} of its {16 + length:,} bytes"
                )
                position += 1
                continue
            if stop > len(data):
                data = self._refill(data, position, 16 + length)
                base, position, stop = base + position, 0, 16 + length
                if len(data) < stop:  # the file shrank while it was read
                    self._damaged(base, f"a partial record: {len(data):,} of its {stop:,} bytes")
                    self._resynchronised(base + len(data))
                    return
            payload = data[position + 12 : stop - 4]
            crc = crc32c(payload)
            if (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF != footer(data, stop - 4)[
                0
            ]:
                self._damaged(base + position, "a damaged record (checksum mismatch)")
                position += 1
                continue
            if self._bad is not None:
                self._resynchronised(base + position)
            self._last, self._last_length = base + position, length
            yield payload
            position = stop


def _read_file(
    path: Path,
    collector: _Collector,
    strict: bool,
    on_bytes: Callable[[int], None] | None,
) -> FileReport:
    size = path.stat().st_size
    report = FileReport(path=path, size=size)
    with path.open("rb") as stream:
        records = _Records(stream, size, on_bytes)
        add = collector.add
        for payload in records:
            try:
                add(payload)
            except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and kin
                records.skip_last(f"an undecodable record ({type(error).__name__})")
            else:
                report.records += 1
    if on_bytes is not None and size > records._read:  # the unread rest counts as done
        on_bytes(size - records._read)
    report.regions = records.regions
    if report.regions and strict:
        raise EventFileError(f"corrupt or truncated event file: {path}: {report.problem}")
    return report


def event_files(directory: Path) -> list[Path]:
    """The event files of a directory, in the order TensorBoard reads them."""
    return sorted(p for p in directory.glob(EVENT_GLOB) if p.is_file())


def read_directory(
    directory: Path,
    *,
    strict: bool = False,
    keep_histogram: Callable[[str], bool] = lambda tag: True,
    on_bytes: Callable[[int], None] | None = None,
    files: Iterable[Path] | None = None,
) -> EventData:
    """Read every event file of ``directory`` once.

    Args:
        directory: A run directory.
        strict: Refuse a file with a damaged or partial record instead of reading the
            records before it.
        keep_histogram: Which histogram tags to keep (others are not decoded further).
        on_bytes: Called with the number of bytes read, as reading goes (progress).
        files: The files to read (default: :func:`event_files` of ``directory``).

    Returns:
        The scalars, the kept histograms, and how each file was read.

    Raises:
        EventFileError: With ``strict=True``, for a damaged or partial file.
        OSError: When a file cannot be opened or read.
    """
    collector = _Collector(keep_histogram)
    reports = [
        _read_file(path, collector, strict, on_bytes)
        for path in (event_files(directory) if files is None else files)
    ]
    scalars, histograms = collector.result()
    return EventData(scalars=scalars, histograms=histograms, files=reports)


__all__ = [
    "EVENT_GLOB",
    "EventData",
    "EventFileError",
    "FileReport",
    "HistogramSeries",
    "SkippedRegion",
    "event_files",
    "masked_crc32c",
    "read_directory",
]

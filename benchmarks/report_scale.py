"""Time and peak memory of ``fisher-monitor report`` on large runs (part of ``make bench``).

Writes synthetic TensorBoard runs shaped like a FisherMonitor run of a 50-layer network
(every metric of the ``diag`` and ``block`` structures per layer and for ``all``, the step
audit of the optimizer, the probe scalars, one 64-bucket histogram per layer, a heat-map
image every tenth measurement and the run-information JSON; one event per scalar, as
Lightning's ``TensorBoardLogger`` writes them) into a temporary directory, then runs
``fisher-monitor report`` on each in a fresh process and prints a Markdown table of the
wall time and the process's own peak resident memory (its ``VmHWM``).

Two shapes of case:

- ``{layers}x{measurements}``: one large run;
- ``{count}runs``: a parent directory of ``count`` small runs (:data:`SMALL_RUN` layers ×
  measurements each, as a sweep leaves them), reported together: a table of every run,
  figures and details for the runs that matter.

Usage: ``python benchmarks/report_scale.py [--cases 50x200,50x2000,2000runs] [--keep DIR]``.
:func:`main` returns the rows for other benchmark drivers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: E402

from fisher_monitor import keys, runinfo  # noqa: E402

#: (layers, measurements) of the default cases; the goal is under 60 s and 1 GB for 50 × 2000.
CASES = ((50, 200), (50, 2000))
#: Runs of the default many-runs case; the goal is under 60 s and 1 GB for 2000 runs.
RUNS_CASES = (2000,)
#: (layers, measurements) of each run of a many-runs case.
SMALL_RUN = (3, 12)
GOAL_SECONDS = 60.0
GOAL_MEGABYTES = 1024.0
STRUCTURES = ("diag", "block")
PREFIX = "fisher"

try:  # the C implementation when installed: writing 300 MB with the pure-Python one is slow
    import google_crc32c

    def _crc32c(data: bytes) -> int:
        return google_crc32c.value(data)

except ImportError:  # pragma: no cover - fallback
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as _crc32c


def _masked(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(event: event_pb2.Event) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked(header)) + data + struct.pack("<I", _masked(data))


def _scalar(tag: str, value: float, step: int, wall_time: float) -> bytes:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return _record(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))


def _histogram(tag: str, values: np.ndarray, step: int, wall_time: float) -> bytes:
    counts, edges = np.histogram(values, bins=64)
    histogram = summary_pb2.HistogramProto(
        min=float(values.min()),
        max=float(values.max()),
        num=float(values.size),
        sum=float(values.sum()),
        sum_squares=float(np.dot(values, values)),
        bucket_limit=edges[1:].tolist(),
        bucket=counts.astype(float).tolist(),
    )
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, histo=histogram)])
    return _record(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))


def _image(tag: str, size: int, step: int, wall_time: float, rng: np.random.Generator) -> bytes:
    image = summary_pb2.Summary.Image(
        height=1000, width=800, colorspace=3, encoded_image_string=rng.bytes(size)
    )
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=image)])
    return _record(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))


def _metric_values(rng: np.random.Generator, layers: int, measurements: int) -> dict:
    """Smooth random trajectories per (metric, layer) in each metric's natural range."""
    time_axis = np.linspace(0.0, 1.0, measurements)[None, :]
    levels = rng.uniform(-0.2, 1.0, size=(layers + 1, 1))
    wobble = 0.1 * rng.standard_normal((layers + 1, measurements))
    cosine = np.clip(levels * (1 - 0.5 * time_axis) + wobble, -1, 1)
    positive = np.exp(rng.normal(0, 1, (layers + 1, 1)) + 0.3 * wobble.cumsum(axis=1) / 10)
    return {"cosine": cosine, "positive": positive}


def write_run(
    directory: Path, layers: int, measurements: int, seed: int = 0, image_bytes: int = 40_000
) -> dict:
    """Write one synthetic run into ``directory``.

    Args:
        directory: Created if missing.
        layers: Number of layers (plus ``all``).
        measurements: Number of measurements (steps 0, 10, 20, ...).
        seed: Random seed.
        image_bytes: Size of each heat-map image.

    Returns:
        ``{"bytes": size of the event file, "events": records written}``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"encoder.block{i // 2}.fc{i % 2}" for i in range(layers)]
    everyone = [*names, keys.ALL]
    values = {structure: _metric_values(rng, layers, measurements) for structure in STRUCTURES}
    histogram_pool = [rng.normal(rng.uniform(-1, 1), 0.5, 4096) for _ in range(16)]
    path = directory / f"events.out.tfevents.{int(time.time())}.bench.{os.getpid()}.0"
    metrics = [m for m in keys.METRICS if m not in keys.CONSTANT_METRICS]
    records = 0
    with path.open("wb") as stream:
        version = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        stream.write(_record(version))
        records += 1
        for index in range(measurements):
            step = 10 * index
            wall = 1.7e9 + index
            chunk = [_scalar("train_loss", float(np.exp(-index / 500)), step, wall)]
            for structure in STRUCTURES:
                cosine = values[structure]["cosine"][:, index]
                positive = values[structure]["positive"][:, index]
                for metric in (*metrics, *keys.UPDATE_METRICS):
                    source = cosine if metric in keys.COSINE_METRICS else positive
                    for row, layer in enumerate(everyone):
                        tag = f"{PREFIX}/{keys.metric_key(structure, metric, layer)}"
                        chunk.append(_scalar(tag, float(source[row]), step, wall))
            cosine = values["diag"]["cosine"][:, index]
            for metric in keys.OPTIMIZER_METRICS:
                for row, layer in enumerate(everyone):
                    tag = f"{PREFIX}/{keys.optimizer_key(metric, layer)}"
                    chunk.append(_scalar(tag, float(abs(cosine[row])), step, wall))
            for name, value in (
                ("loss", 1.0),
                ("batch_size", 128.0),
                ("grad_norm", 0.5),
                ("seconds", 0.2),
                ("overhead", 0.04),
            ):
                chunk.append(_scalar(f"{PREFIX}/{keys.probe_key(name)}", value, step, wall))
            for row, layer in enumerate(names):
                sample = histogram_pool[(row + index) % len(histogram_pool)]
                tag = f"{PREFIX}/histograms/log10_ef_over_f/{layer}"
                chunk.append(_histogram(tag, sample, step, wall))
            if index % 10 == 0:
                tag = f"{PREFIX}/images/direction_cosine"
                chunk.append(_image(tag, image_bytes, step, wall, rng))
            stream.write(b"".join(chunk))
            records += len(chunk)
    runinfo.write(directory, _run_info(names))
    return {"bytes": path.stat().st_size, "events": records}


def _run_info(names: list[str]) -> dict:
    """The run file of a synthetic run with these layer names."""
    return {
        "prefix": PREFIX,
        "settings": {
            "structures": list(STRUCTURES),
            "fisher": "exact",
            "mc_samples": 1,
            "damping": 0.001,
            "damping_mode": "relative",
            "schedule": "every(10)",
            "optimizer": "AdamW",
        },
        "layers": [
            {
                "layer": name,
                "type": "Linear",
                "parameters": [f"{name}.weight", f"{name}.bias"],
                "dimension": 4160,
                "backend": "backpack",
                "measured": True,
                "reason": None,
            }
            for name in names
        ],
        "notes": [],
    }


def write_runs(root: Path, count: int, seed: int = 0) -> dict:
    """Write ``count`` small runs (:data:`SMALL_RUN`) under ``root``, as a sweep leaves them.

    Each is ``root/sweep/lr_{i}/version_0`` with its own values (seed ``seed + i``) and a
    4 kB heat-map image every tenth measurement.

    Returns:
        ``{"bytes": size of every event file together, "events": records written}``.
    """
    layers, measurements = SMALL_RUN
    total = {"bytes": 0, "events": 0}
    for index in range(count):
        directory = root / "sweep" / f"lr_{index:05d}" / "version_0"
        written = write_run(directory, layers, measurements, seed + index, image_bytes=4_000)
        for key in total:
            total[key] += written[key]
    return total


#: Runs ``fisher-monitor report`` and then prints the process's own peak resident memory.
#: ``VmHWM`` belongs to the process's memory map, which ``exec`` replaces; ``ru_maxrss``
#: (of ``wait4``) also counts the parent's memory at the ``fork``, which here is the
#: benchmark harness with torch loaded: hundreds of MB that are not the report's.
_CHILD = """
import sys
from fisher_monitor.report.cli import main
code = main(sys.argv[1:])
try:
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    print(f"fisher-monitor-bench peak_kb {peak}", file=sys.stderr)
except OSError:
    pass
sys.exit(code)
"""


def time_report(run: Path, out_dir: Path) -> dict:
    """Run ``fisher-monitor report`` on ``run`` in a fresh process.

    Returns:
        ``{"seconds", "peak_mb", "returncode"}``: wall time and the child's peak resident
        memory (its ``VmHWM`` on Linux, else ``ru_maxrss``).
    """
    command = [sys.executable, "-c", _CHILD, "report", str(run), "-o", str(out_dir)]
    with tempfile.TemporaryFile() as errors:  # not a pipe: a long stderr cannot block it
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        print(stderr[-2000:], file=sys.stderr)
    scale = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KiB on Linux, bytes on macOS
    peak = usage.ru_maxrss * scale
    for line in stderr.splitlines():
        if line.startswith("fisher-monitor-bench peak_kb "):
            peak = int(line.split()[-1]) * 1024
    return {"seconds": seconds, "peak_mb": peak / 2**20, "returncode": returncode}


def _cases(text: str) -> list[str]:
    """The case names of ``--cases``: ``{layers}x{measurements}`` or ``{count}runs``."""
    cases = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        layers, _, measurements = part.partition("x")
        many = part.endswith("runs") and part[: -len("runs")].isdigit()
        if not (many or (layers.isdigit() and measurements.isdigit())):
            raise SystemExit(
                f"Invalid case {part!r}: use '{{layers}}x{{measurements}}' or '{{count}}runs'."
            )
        cases.append(part)
    return cases


def _write_case(root: Path, case: str) -> tuple[Path, int]:
    """The case's run directory (written unless kept from an earlier call) and its bytes."""
    run = root / f"run_{case}"
    existing = list(run.rglob("events.out.tfevents.*"))
    if existing:  # kept from an earlier call with --keep
        return run, sum(f.stat().st_size for f in existing)
    if case.endswith("runs"):
        return run, write_runs(run, int(case[: -len("runs")]))["bytes"]
    layers, _, measurements = case.partition("x")
    return run, write_run(run, int(layers), int(measurements))["bytes"]


def main(argv: list[str] | None = None) -> list[dict]:
    """Generate each case, time the report on it, print a Markdown table.

    Args:
        argv: Command-line arguments (``None``: ``sys.argv``).

    Returns:
        One row per case: ``layers``, ``measurements``, ``events_mb``, ``seconds``,
        ``peak_mb``, ``returncode``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = [f"{a}x{b}" for a, b in CASES] + [f"{count}runs" for count in RUNS_CASES]
    parser.add_argument("--cases", default=",".join(default))
    parser.add_argument("--keep", type=Path, default=None, help="write the runs here and keep them")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="fisher-report-bench-"))
    rows = []
    try:
        for case in _cases(args.cases):
            run, size = _write_case(root, case)
            result = time_report(run, root / f"report_{case}")
            rows.append({"case": case, "label": report_label(case), "events_mb": size / 2**20})
            rows[-1].update(result)
            if "x" in case:
                layers, _, measurements = case.partition("x")
                rows[-1].update(layers=int(layers), measurements=int(measurements))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print("| case | events | report time | peak memory | goal |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row in rows:
        met = row["seconds"] < GOAL_SECONDS and row["peak_mb"] < GOAL_MEGABYTES
        status = "failed" if row["returncode"] else ("met" if met else "missed")
        print(
            f"| {row['label']} | {row['events_mb']:.0f} MB "
            f"| {row['seconds']:.1f} s | {row['peak_mb']:.0f} MB "
            f"| < {GOAL_SECONDS:.0f} s, < {GOAL_MEGABYTES / 1024:.0f} GB: {status} |"
        )
    return rows


def report_label(case: str) -> str:
    """``"50 layers × 2000 measurements"`` or ``"2000 runs of 3 layers × 12 measurements"``."""
    if case.endswith("runs"):
        layers, measurements = SMALL_RUN
        return f"{case[: -len('runs')]} runs of {layers} layers × {measurements} measurements"
    layers, _, measurements = case.partition("x")
    return f"{layers} layers × {measurements} measurements"


if __name__ == "__main__":
    main()

"""What a default `tensorboard` server shows of a run: queried over its HTTP API.

TensorBoard's default (fast) data loader serves tag descriptions empty, so everything a
user needs to read the charts must reach them another way: the Text "guide" card, chart
titles that carry the meaning and the thresholds, one tag per chart, and a heat map drawn
at the size its card shows it. This test starts a real server, with its defaults, on a
real run and asks it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from pytorch_lightning.loggers import TensorBoardLogger

from fisher_monitor import FisherMonitor
from lightning_helpers import fit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(base: str, path: str, **query: str):
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    return json.loads(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A default TensorBoard on a fresh run; ``(base URL, run name)``."""
    root = tmp_path_factory.mktemp("served")
    fit(
        FisherMonitor(every_n_steps=2, structures=("diag", "block")),
        steps=7,
        logger=TensorBoardLogger(root, name="run"),
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                reason = process.stderr.read().decode(errors="replace")[-2000:]
                pytest.skip(f"tensorboard could not start: {reason}")
            try:
                runs = get(base, "/data/runs")
                tags = get(base, "/data/plugin/scalars/tags")
                if runs and any(tags.get(run) for run in runs):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.skip("tensorboard did not serve the run within 90 s")
            time.sleep(0.5)
        yield base, runs[0]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.slow
def test_the_guide_card_is_served(server):
    base, run = server
    assert "~fisher/guide/text_summary" in get(base, "/data/plugin/text/tags")[run]
    (entry,) = get(base, "/data/plugin/text/text", run=run, tag="~fisher/guide/text_summary")
    text = entry["text"]
    for needed in (
        "overview",
        "≥ 0.9",
        "&lt; 0.5",
        "Smoothing to 0",
        "docs/glossary.md",
        "docs/guide/acting.md",
    ):
        assert needed in text, needed


@pytest.mark.slow
def test_custom_scalars_open_with_an_overview_of_one_tag_per_chart(server):
    base, run = server
    layout = get(base, "/data/plugin/custom_scalars/layout")
    overview = layout["category"][0]
    assert overview["title"].startswith("~fisher: overview")
    assert 1 <= len(overview["chart"]) <= 4
    titles = [chart["title"] for chart in overview["chart"]]
    assert "≥ 0.9 agree, < 0.5 disagree" in titles[0]  # thresholds visible in the title
    assert "> 0.5 differ" in titles[1] and "outside [0.5, 2] off" in titles[2]
    tags = get(base, "/data/plugin/scalars/tags")[run]
    for category in layout["category"]:
        for chart in category["chart"]:
            (pattern,) = chart["multiline"]["tag"]  # one line per chart: never ambiguous
            assert any(re.match(pattern, tag) for tag in tags), (chart["title"], pattern)


@pytest.mark.slow
def test_the_heat_map_is_served_at_the_size_its_card_shows(server):
    base, run = server
    tag = "~fisher/images/direction_cosine"
    assert tag in get(base, "/data/plugin/images/tags")[run]
    entries = get(base, "/data/plugin/images/images", run=run, tag=tag, sample="0")
    url = f"{base}/data/plugin/images/individualImage?{entries[-1]['query']}"
    with urllib.request.urlopen(url, timeout=30) as response:
        png = response.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert 300 <= width <= 360 and height > 150  # TensorBoard's image card is ~350 px wide

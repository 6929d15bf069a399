"""The HTML report in headless Chromium: loads without console errors, renders a non-blank page."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from fisher_monitor.report.cli import main

CHROMIUM = next(
    (
        path
        for name in ("chromium", "chromium-browser", "google-chrome")
        if (path := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian package 'chromium'; .ci/run installs it when it can)",
)


def render(page: Path, screenshot: Path, profile: Path) -> str:
    """Load ``page`` headless, save a screenshot, return Chromium's log (console lines included)."""
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1100,1400",
            f"--screenshot={screenshot}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert screenshot.exists(), result.stderr[-2000:]
    return result.stderr


def console_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line]


def test_console_errors_are_detected(tmp_path):
    """Control: the check below can fail."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<html><body><p>x</p><script>console.error('boom'); missing();</script></body></html>"
    )
    assert len(console_lines(render(page, tmp_path / "broken.png", tmp_path / "profile"))) == 2


def test_report_renders_without_console_errors(plain_run, tmp_path):
    assert main(["report", str(plain_run), "-o", str(tmp_path), "--format", "html"]) == 0
    screenshot = tmp_path / "report.png"
    log = render(tmp_path / "report.html", screenshot, tmp_path / "profile")
    assert console_lines(log) == []
    pixels = imread(screenshot)[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels.std() > 0.05  # not a blank page
    assert (pixels.mean(axis=2) < 0.5).mean() > 0.01  # there is dark text and drawing on it
    # the verdict boxes' colours made it onto the screen (red, amber or green tints)
    reds, greens = pixels[..., 0], pixels[..., 1]
    assert np.any(np.abs(reds - greens) > 0.05)

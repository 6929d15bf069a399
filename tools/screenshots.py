"""Screenshots of the TensorBoard pages a user opens for a run, with headless Chromium.

    python tools/screenshots.py LOGDIR OUTDIR [--pages timeseries,scalars,...]

Starts TensorBoard on a free local port for LOGDIR, waits until it answers, and saves one
PNG per page (Time Series, Scalars, Custom Scalars, Histograms, Images, Text) into OUTDIR
as ``{page}.png``. Needs Chromium (``apt-get install chromium``); pass ``--chromium`` when
it is not on the PATH. Used to check the dashboard a fisher-monitor run produces.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

#: Page name → TensorBoard URL fragment.
PAGES = {
    "timeseries": "timeseries",
    "scalars": "scalars",
    "custom_scalars": "custom_scalars",
    "histograms": "histograms",
    "images": "images",
    "text": "text",
}
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_chromium(given: str | None) -> str:
    """The Chromium executable: ``given``, or the first of the usual names on the PATH."""
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    raise SystemExit(
        "Chromium not found: install it (apt-get install chromium) or pass --chromium PATH."
    )


def start_tensorboard(logdir: Path, port: int, timeout: float = 60.0) -> subprocess.Popen:
    """Start TensorBoard and wait until it serves its front page."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"TensorBoard exited with code {process.returncode}.") from None
            time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"TensorBoard did not answer on port {port} within {timeout:.0f} s.")


def screenshot(chromium: str, url: str, path: Path, size: str, budget_ms: int) -> None:
    """Load ``url`` in headless Chromium and save the window as a PNG."""
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size}",
            f"--screenshot={path}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
        check=True,
    )
    if not path.exists():
        raise SystemExit(f"Chromium wrote no screenshot for {url}.")


def main(argv: list[str] | None = None) -> int:
    """Take the screenshots; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", type=Path, help="TensorBoard log directory")
    parser.add_argument("outdir", type=Path, help="folder for the PNG files")
    parser.add_argument("--pages", default=",".join(PAGES), help="comma-separated pages")
    parser.add_argument("--size", default="1400,1800", help="window size WIDTH,HEIGHT")
    parser.add_argument("--budget-ms", type=int, default=15000, help="virtual time per page")
    parser.add_argument("--chromium", default=None, help="Chromium executable")
    args = parser.parse_args(argv)
    pages = [page for page in args.pages.split(",") if page]
    unknown = [page for page in pages if page not in PAGES]
    if unknown:
        parser.error(f"unknown page(s) {unknown}; choose from {list(PAGES)}")
    if not args.logdir.is_dir():
        parser.error(f"{args.logdir}: no such directory")
    chromium = find_chromium(args.chromium)
    args.outdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tensorboard = start_tensorboard(args.logdir, port)
    try:
        for page in pages:
            path = args.outdir / f"{page}.png"
            url = f"http://127.0.0.1:{port}/#{PAGES[page]}"
            screenshot(chromium, url, path, args.size, args.budget_ms)
            print(f"{page}: {path}")
    finally:
        tensorboard.terminate()
        tensorboard.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

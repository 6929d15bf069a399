"""Screenshots of the TensorBoard pages a user opens for a run, with headless Chromium.

    python tools/screenshots.py LOGDIR OUTDIR [--pages timeseries,scalars,...] [--smoothing 0]
    python tools/screenshots.py runs/quickstart/version_0 docs --readme

Starts TensorBoard on a free local port for LOGDIR, waits until it answers, and saves one
PNG per page (Time Series, Scalars, Custom Scalars, Histograms, Images, Text) into OUTDIR
as ``{page}.png``. ``--smoothing`` sets the Scalars and Custom Scalars pages' smoothing
through their URL (``_smoothingWeight``; the monitor's few points read best at 0).
``--readme`` writes the README's and the documentation's images of a ``make demo`` run
instead: ``demo-dashboard.png`` (Custom Scalars, smoothing 0), ``demo-guide.png`` (the
Text page with the ``~fisher/guide`` card) and ``demo-direction-cosine.png`` (the
report's direction-cosine figure, from ``LOGDIR/report``). Needs Chromium
(``apt-get install chromium``); pass ``--chromium`` when it is not on the PATH.
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


def page_url(port: int, page: str, smoothing: float | None) -> str:
    """The page's URL; the legacy dashboards take their smoothing from the URL's fragment."""
    url = f"http://127.0.0.1:{port}/#{PAGES[page]}"
    if smoothing is not None and page in ("scalars", "custom_scalars"):
        url += f"&_smoothingWeight={smoothing:g}"
    return url


def readme_images(chromium: str, port: int, logdir: Path, outdir: Path, budget_ms: int) -> None:
    """The README's and the documentation's images of a demo run (see the module docstring)."""
    shots = {
        "demo-dashboard.png": (page_url(port, "custom_scalars", 0.0), "1400,1000"),
        "demo-guide.png": (page_url(port, "text", None), "1400,1100"),
    }
    for name, (url, size) in shots.items():
        screenshot(chromium, url, outdir / name, size, budget_ms)
        print(f"{name}: {outdir / name}")
    figure = logdir / "report" / "direction_cosine.png"
    if figure.is_file():
        shutil.copyfile(figure, outdir / "demo-direction-cosine.png")
        print(f"demo-direction-cosine.png: {outdir / 'demo-direction-cosine.png'}")
    else:
        print(f"no {figure}: run the demo (its report draws it) to refresh that image")


def main(argv: list[str] | None = None) -> int:
    """Take the screenshots; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", type=Path, help="TensorBoard log directory")
    parser.add_argument("outdir", type=Path, help="folder for the PNG files")
    parser.add_argument("--pages", default=",".join(PAGES), help="comma-separated pages")
    parser.add_argument("--size", default="1400,1800", help="window size WIDTH,HEIGHT")
    parser.add_argument("--budget-ms", type=int, default=15000, help="virtual time per page")
    parser.add_argument("--chromium", default=None, help="Chromium executable")
    parser.add_argument(
        "--smoothing", type=float, default=None, help="smoothing of the scalar pages (0 to 0.99)"
    )
    parser.add_argument(
        "--readme", action="store_true", help="write the README's images of a demo run"
    )
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
        if args.readme:
            readme_images(chromium, port, args.logdir, args.outdir, args.budget_ms)
            return 0
        for page in pages:
            path = args.outdir / f"{page}.png"
            screenshot(
                chromium, page_url(port, page, args.smoothing), path, args.size, args.budget_ms
            )
            print(f"{page}: {path}")
    finally:
        tensorboard.terminate()
        tensorboard.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

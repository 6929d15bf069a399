"""Real short training runs with FisherMonitor, written once per test session.

The training helpers are imported inside the fixture, so that the tests on synthetic
runs need neither torch nor Lightning.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    from lightning_helpers import TinyClassifier
    from runs import HostileNames, train

    root = tmp_path_factory.mktemp("runs")
    train(root, "plain", TinyClassifier())
    train(root, "mc", TinyClassifier(), fisher="mc", damping=[1e-3, 1e-1])
    train(root, "hostile", HostileNames(), steps=6)
    return root


@pytest.fixture(scope="session")
def plain_run(runs_root) -> Path:
    return runs_root / "plain" / "version_0"


@pytest.fixture(scope="session")
def hostile_run(runs_root) -> Path:
    return runs_root / "hostile" / "version_0"

"""Measured peak memory of one measurement against the memory model's estimate.

Run as a script (a fresh process per case, so that nothing else shares the high-water
mark): ``python tests/memory_probe.py MODEL N STRUCTURES FISHER BACKEND`` prints one JSON
line with the measured peak above the memory in use before the measurement (the rise of
``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux only) and the
estimate of :func:`fisher_monitor.engine.memory.estimate_peak_bytes`. Used by
``tests/test_memory.py`` and to calibrate the model's constants.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

MODELS = ("mlp", "lenet", "vgg", "resnet18")


def make(name: str, size: int):
    """``(model, inputs, targets)`` for a named case (random weights and data)."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        inputs = torch.randn(size, 784)
    elif name == "lenet":
        model = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )
        inputs = torch.randn(size, 1, 28, 28)
    elif name == "vgg":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
        inputs = torch.randn(size, 3, 32, 32)
    elif name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        inputs = torch.randn(size, 3, 32, 32)
    else:
        raise KeyError(f"unknown model {name!r}; choose from {MODELS}")
    return model, inputs, torch.randint(0, 10, (size,))


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match.group(1)) * 1024


def probe(name: str, size: int, structures: str, fisher: str, backend: str) -> dict:
    """Measure once (after a warm-up on two samples) and return measured and estimated bytes."""
    from fisher_monitor.engine import Measurer
    from fisher_monitor.settings import MeasureSettings

    model, inputs, targets = make(name, size)
    settings = MeasureSettings.create(tuple(structures.split(",")), fisher, 1, 1e-3, "relative")
    measurer = Measurer(model, nn.CrossEntropyLoss(), settings, backend=backend)
    measurer(inputs[:2], targets[:2], generator=torch.Generator().manual_seed(0))
    estimate = measurer.estimate_peak_bytes(inputs, size)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    measurement = measurer(inputs, targets, generator=torch.Generator().manual_seed(0))
    peak = _status_kib("VmHWM") - before
    return {
        "model": name,
        "size": size,
        "structures": structures,
        "fisher": fisher,
        "backend": measurement.coverage[0]["backend"],
        "probe": int(measurement["probe/batch_size"]),
        "estimated_fisher": any("sketched columns" in note for note in measurement.notes),
        "measured": peak,
        "estimate": estimate,
        "ratio": estimate / max(peak, 1),
    }


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    name, size, structures, fisher, backend = sys.argv[1:6]
    print(json.dumps(probe(name, int(size), structures, fisher, backend)))

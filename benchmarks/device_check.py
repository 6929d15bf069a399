"""Checks to run on a CUDA machine: results equal the CPU's, the model stays untouched.

Usage: ``python benchmarks/device_check.py`` (exits non-zero on a mismatch). Run before
``python benchmarks/run.py --device cuda`` when a GPU is available.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fisher_monitor import measure  # noqa: E402


def models():
    torch.manual_seed(0)
    yield "mlp", nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)), (20,)
    yield (
        "cnn",
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)),
        (1, 8, 8),
    )


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    failures = 0
    for name, model, shape in models():
        model = model.double()
        inputs = torch.randn(16, *shape, dtype=torch.float64)
        targets = torch.randint(0, 5, (16,))
        kwargs = dict(structures=("diag", "block", "kron"), damping=[1e-3, 1e-1])
        on_cpu = measure(model, nn.CrossEntropyLoss(), inputs, targets, **kwargs)
        gpu_model = model.cuda()
        before = {k: v.clone() for k, v in gpu_model.state_dict().items()}
        rng = torch.cuda.get_rng_state()
        on_gpu = measure(gpu_model, nn.CrossEntropyLoss(), inputs.cuda(), targets.cuda(), **kwargs)
        assert torch.equal(torch.cuda.get_rng_state(), rng), "CUDA RNG state changed"
        for k, v in gpu_model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed"
        worst = 0.0
        for key, value in on_cpu.scalars.items():
            if key == "probe/seconds" or math.isnan(value):
                continue
            error = abs(on_gpu[key] - value) / max(abs(value), 1e-12)
            worst = max(worst, error)
            if error > 1e-6:
                failures += 1
                print(f"MISMATCH {name} {key}: cpu {value!r} gpu {on_gpu[key]!r}")
        # the batch on another device than the model is moved, not an error
        mixed = measure(gpu_model, nn.CrossEntropyLoss(), inputs, targets, **kwargs)
        key = "diag/kl@0.001/all"
        assert math.isclose(mixed[key], on_cpu[key], rel_tol=1e-6), (
            "batch on the CPU, model on CUDA"
        )
        print(
            f"{name}: {len(on_cpu.scalars)} scalars, worst relative difference CPU/GPU {worst:.2e}"
        )
    mc = [
        measure(
            gpu_model,
            nn.CrossEntropyLoss(),
            inputs.cuda(),
            targets.cuda(),
            fisher="mc",
            generator=torch.Generator().manual_seed(3),
        )["block/kl/all"]
        for _ in range(2)
    ]
    assert mc[0] == mc[1], "MC with a fixed generator is not reproducible on CUDA"
    print("MC reproducible on CUDA:", mc[0] == mc[1])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmark of the metric functions on the sizes of the MLP 784-512-256-10.

Times :func:`lowrank_statistics` (exact Fisher, coefficient path), :func:`kronecker_statistics`
and :func:`diagonal_statistics` on factors of a randomly initialised MLP 784-512-256-10
with a probe batch of ``N = 128`` (``C − 1 = 9`` square-root columns per sample, so
``R = 1152``; layer blocks 785 × 512, 513 × 256, 257 × 10), and a plain SGD step of the
same network for scale. Factors and Gram matrices are formed once, outside the timings,
as the engine forms them. Every time is the median of ``--repeats`` runs.

``--package-root DIR`` imports ``fisher_monitor`` from ``DIR`` instead (to time another
checkout the same way); features the other version lacks are skipped.

``--cpu-time`` runs on one thread and reads the thread's CPU clock instead of the wall
clock: the numbers then hold on a machine other processes are using.

Usage: ``python benchmarks/metrics_micro.py [--repeats 9] [--threads 2] [--cpu-time]
[--package-root DIR]``.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial


def median_ms(fn: Callable[[], object], repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def mlp_factors(n: int = 128, seed: int = 0):
    """Per-layer ``(x̃, δ, s)`` of the MLP and the coefficients ``B`` (shared by all layers)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    sizes = [784, 512, 256, 10]
    layers = [nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    x = torch.randn(n, sizes[0])
    y = torch.randint(0, sizes[-1], (n,))
    activations, pre = [], []
    h = x
    for i, layer in enumerate(layers):
        activations.append(h)
        z = layer(h)
        pre.append(z)
        h = torch.relu(z) if i < len(layers) - 1 else z
    logits = h.double().detach()
    p = logits.softmax(dim=1)
    tau = p.sqrt()
    classes = sizes[-1]
    q = torch.linalg.qr(tau.unsqueeze(2), mode="complete").Q[:, :, 1:]
    s_out = tau.unsqueeze(2) * q  # N × C × (C − 1): S_n
    onehot = nn.functional.one_hot(y, classes).double()
    beta = torch.einsum("ncr,nc->nr", q, tau - onehot / tau.gather(1, y.unsqueeze(1)))
    delta_out = (p - onehot).float()
    grads = torch.autograd.grad(h, pre, grad_outputs=delta_out, retain_graph=True)
    columns = classes - 1
    sqrt = [[] for _ in layers]
    for r in range(columns):
        back = torch.autograd.grad(
            h, pre, grad_outputs=s_out[:, :, r].float() / n**0.5, retain_graph=True
        )
        for layer_sqrt, b in zip(sqrt, back, strict=True):
            layer_sqrt.append(b)
    factors = []
    for a, d, s in zip(activations, grads, sqrt, strict=True):
        inputs = torch.cat([a, torch.ones(n, 1)], dim=1).detach()
        factors.append((inputs, d.detach(), torch.stack(s).detach() * n**0.5))
    b_matrix = torch.zeros(columns, n, n, dtype=torch.float64)
    b_matrix[:, torch.arange(n), torch.arange(n)] = beta.T
    return layers, x, y, factors, b_matrix.reshape(columns * n, n)


def grams(inputs, output_grads, sqrt, coefficients):
    """``K_V`` (Hadamard form) and ``K_U = BᵀK_VB``, ``K_UV = BᵀK_V`` in float64."""
    import torch

    n = inputs.shape[0]
    x = inputs.double()
    s = sqrt.double().reshape(-1, sqrt.shape[-1]) / n**0.5  # v columns carry 1/√N
    columns = sqrt.shape[0]
    gram_v = ((s @ s.T).view(columns, n, columns, n) * (x @ x.T).view(1, n, 1, n)).reshape(
        columns * n, columns * n
    )
    gram_uv = coefficients.T @ gram_v
    gram_u = gram_uv @ coefficients
    del torch
    return gram_u, gram_v, gram_uv


def _kron_with_factors(kronecker, root_in, root_out, samples, gram_u, dampings):
    return kronecker.kronecker_statistics(
        root_in.T @ root_in,
        root_out.T @ root_out,
        samples,
        gram_u,
        dampings,
        input_root=root_in,
        output_root=root_out,
    )


def layer_cases(
    lowrank, kronecker, index, factor, coefficients, dampings, shares_ef
) -> list[tuple[str, Callable]]:
    """``(label, call)`` of one layer's block and Kronecker statistics.

    Args:
        lowrank: The ``lowrank`` module of the version timed.
        kronecker: Its ``kronecker`` module.
        index: The layer's index (for the labels).
        factor: The layer's ``(x̃, δ, s)`` (:func:`mlp_factors`).
        coefficients: The coefficients ``B`` shared by all layers.
        dampings: ``{label: relative dampings}``, scaled here by the layer's mean
            eigenvalue.
        shares_ef: Whether this version's Kronecker statistics take the EF solves.
    """
    import torch

    inputs, output_grads, sqrt = factor
    n = coefficients.shape[1]
    out = []
    name = f"layer {index} ({inputs.shape[1]}×{output_grads.shape[1]})"
    gram_u, gram_v, gram_uv = grams(inputs, output_grads, sqrt, coefficients)
    dimension = inputs.shape[1] * output_grads.shape[1]
    trace = float(torch.trace(gram_v))
    scaled = {label: [d * trace / dimension for d in ds] for label, ds in dampings.items()}
    for label, values in scaled.items():
        out.append(
            (
                f"{name} block, {label}",
                partial(
                    lowrank.lowrank_statistics,
                    gram_u,
                    gram_v,
                    gram_uv,
                    dimension,
                    values,
                    coefficients=coefficients,
                ),
            )
        )
    xd = inputs.double()
    root_in = xd / n**0.5
    root_out = sqrt.double().reshape(-1, sqrt.shape[-1]) / n**0.5
    samples = kronecker.OuterSamples(output_grads.double(), xd)
    for label, values in scaled.items():
        # the engine forms A = XᵀX and G = SᵀS where the function needs them
        out.append(
            (
                f"{name} kron, {label}, factors formed",
                partial(_kron_with_factors, kronecker, root_in, root_out, samples, gram_u, values),
            )
        )
        if shares_ef:
            solves = lowrank.empirical_solves(gram_u, values, dimension)
            out.append(
                (
                    f"{name} kron, {label}, roots only, shared EF solves",
                    partial(
                        kronecker.kronecker_statistics,
                        None,
                        None,
                        samples,
                        gram_u,
                        values,
                        input_root=root_in,
                        output_root=root_out,
                        empirical=solves,
                    ),
                )
            )
    return out


def diag_cases(diagonal, factors, n, dampings) -> list[tuple[str, Callable]]:
    """``(label, call)`` of the diagonal statistics of every layer, float64 and float32 in."""
    diag_inputs = []
    for inputs, output_grads, sqrt in factors:
        fisher = (sqrt.square().sum(dim=0) / n).T @ inputs.square()
        empirical = (output_grads.square() / n).T @ inputs.square()
        gradient = output_grads.T @ inputs / n
        diag_inputs.append((fisher.reshape(-1), empirical.reshape(-1), gradient.reshape(-1)))

    def diag_pass(dampings, convert):
        for f, e, g in diag_inputs:
            if convert:
                f, e, g = f.double(), e.double(), g.double()
            diagonal.diagonal_statistics(f, e, g, dampings)

    out = []
    for label, values in dampings.items():
        out.append((f"diag, all layers, float64 in, {label}", partial(diag_pass, values, True)))
        out.append((f"diag, all layers, float32 in, {label}", partial(diag_pass, values, False)))
    return out


def cases(lowrank, kronecker, diagonal, factors, coefficients) -> list[tuple[str, Callable]]:
    """``(label, call)`` for every timed case, on the given modules (any version)."""
    n = coefficients.shape[1]
    kron_params = inspect.signature(kronecker.kronecker_statistics).parameters
    shares_ef = "empirical" in kron_params and hasattr(lowrank, "empirical_solves")
    one, five = [1e-3], [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    dampings = {"1 damping": one, "5 dampings": five}
    out = []
    for index, factor in enumerate(factors):
        out += layer_cases(lowrank, kronecker, index, factor, coefficients, dampings, shares_ef)
    return out + diag_cases(diagonal, factors, n, dampings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--package-root", default=None)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, timed by the thread's CPU clock (robust on a shared machine)",
    )
    args = parser.parse_args(argv)
    if args.package_root:
        sys.path.insert(0, args.package_root)
    from types import SimpleNamespace

    import torch

    import fisher_monitor.structures.diag.statistics as diagonal
    from fisher_monitor.factors import OuterSamples
    from fisher_monitor.structures.block import gram_route
    from fisher_monitor.structures.empirical import empirical_solves
    from fisher_monitor.structures.kron.statistics import kronecker_statistics

    lowrank = SimpleNamespace(
        lowrank_statistics=gram_route.lowrank_statistics,
        empirical_solves=empirical_solves,
        __file__=gram_route.__file__,
    )
    kronecker = SimpleNamespace(
        kronecker_statistics=kronecker_statistics, OuterSamples=OuterSamples
    )

    torch.set_num_threads(1 if args.cpu_time else args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(
        f"fisher_monitor from {lowrank.__file__}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time"
    )
    layers, x, y, factors, coefficients = mlp_factors()

    def step():
        for layer in layers:
            layer.zero_grad()
        h = x
        for i, layer in enumerate(layers):
            h = layer(h)
            if i < len(layers) - 1:
                h = torch.relu(h)
        torch.nn.functional.cross_entropy(h, y).backward()
        with torch.no_grad():
            for layer in layers:
                for p in layer.parameters():
                    p -= 0.01 * p.grad

    step_ms = median_ms(step, args.repeats, clock)
    print(f"plain SGD step: {step_ms:.2f} ms")
    rows = [
        (label, median_ms(fn, args.repeats, clock))
        for label, fn in cases(lowrank, kronecker, diagonal, factors, coefficients)
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'case':{width}s}  {'ms':>9s}  {'steps':>6s}")
    for label, ms in rows:
        print(f"{label:{width}s}  {ms:9.2f}  {ms / step_ms:6.2f}")


if __name__ == "__main__":
    main()

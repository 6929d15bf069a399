"""``measure()``: F against EF on one probe batch, for every layer and the whole network.

See DESIGN.md §2 for the definitions and §3 for the metric names. In short, for a probe
batch of ``N`` samples with per-sample gradients ``g_n`` of the per-sample negative
log-likelihoods ``ℓ_n``:

``g = (1/N) Σ g_n``, ``EF = (1/N) Σ g_n g_nᵀ`` and
``F = (1/N) Σ_n E_{ŷ~p(·|f_n)}[∇ℓ(f_n, ŷ) ∇ℓ(f_n, ŷ)ᵀ]``,

whatever the loss module's reduction (a ``"sum"`` loss is divided back by ``N``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fisher_monitor.batching import batch_on_device, take_samples
from fisher_monitor.curvature.factors import LayerFactors
from fisher_monitor.curvature.functorch_backend import FunctorchNetwork
from fisher_monitor.curvature.losses import LossKind, LossSpec, resolve_loss
from fisher_monitor.curvature.network import (
    LayerInfo,
    PreparedNetwork,
    ShadowNetwork,
    forked_rng,
    full_precision,
    is_lazy,
    seed_from,
)
from fisher_monitor.measurement import Measurement
from fisher_monitor.metrics import (
    LayerStatistics,
    dense_statistics,
    diagonal_statistics,
    finalize,
    kronecker_statistics,
    lowrank_statistics,
    sum_statistics,
)
from fisher_monitor.settings import DampingMode, FisherType, MeasureSettings, Structure

#: Key of the whole network in metric keys.
ALL = "all"
#: Backends of the curvature engine.
BACKENDS = ("auto", "backpack", "functorch")
#: Largest layer whose dense blocks ``keep_blocks=True`` will form.
MAX_KEPT_BLOCK = 8192


def relative_dampings(
    settings: MeasureSettings, trace: float, dimension: int
) -> tuple[list[float], bool]:
    """Per-layer damping values λ_b for one structure.

    Args:
        settings: Validated settings.
        trace: ``tr F_S`` of the layer (structure-specific).
        dimension: ``D_b``.

    Returns:
        The dampings and whether the relative rule had to fall back to absolute values
        (a layer whose Fisher trace is zero or not finite).
    """
    if settings.damping_mode is DampingMode.ABSOLUTE:
        return list(settings.dampings), False
    scale = trace / dimension
    if not (scale > 0 and torch.isfinite(torch.tensor(scale))):
        return list(settings.dampings), True
    return [d * scale for d in settings.dampings], False


class Measurer:
    """Measure F against EF repeatedly on one network, preparing it once.

    ``measure()`` is ``Measurer(...)(inputs, targets)`` followed by :meth:`close`; the
    Lightning callback keeps one alive across training steps.

    Args:
        model: The network (left untouched: see :func:`measure`).
        loss_fn: A supported loss module or name.
        settings: Validated settings.
        dtype: Floating-point type of the curvature computations (float64 by default:
            the damped solves amplify rounding by up to ``1/λ``).
        backend: ``"auto"`` (BackPACK where it can handle the network, ``torch.func``
            otherwise), ``"backpack"`` or ``"functorch"``.
        memory_budget: Bytes a measurement may use at its peak; ``None`` for half the
            memory available (80% of the free GPU memory on CUDA).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | str | LossSpec,
        settings: MeasureSettings,
        dtype: torch.dtype = torch.float64,
        backend: str = "auto",
        memory_budget: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}. Supported: {BACKENDS}.")
        self.model = model
        self.loss = loss_fn if isinstance(loss_fn, LossSpec) else resolve_loss(loss_fn)
        self.settings = settings
        self.dtype = dtype
        self.backend = backend
        self.memory_budget = memory_budget
        self._columns_per_sample = 1
        self._columns_cache: dict[tuple, int] = {}
        self._prepared: ShadowNetwork | None = None

    @property
    def prepared(self) -> ShadowNetwork:
        """The prepared shadow network, rebuilt if the caller replaced its parameters."""
        if self._prepared is None or self._prepared.is_stale():
            if self._prepared is not None:
                self._prepared.close()
            self._prepared = self._prepare()
        return self._prepared

    def _prepare(self) -> ShadowNetwork:
        lazy = [name for name, p in self.model.named_parameters() if is_lazy(p)]
        if lazy:
            raise ValueError(
                f"The network has uninitialised lazy parameters ({', '.join(lazy[:3])}): "
                "their shapes are only known after a first forward pass. Measure after it."
            )
        if self.backend == "functorch":
            return FunctorchNetwork(self.model, self.loss)
        if self.backend == "backpack":
            return PreparedNetwork(self.model, self.loss)
        try:
            return PreparedNetwork(self.model, self.loss)
        except NotImplementedError as error:
            network = FunctorchNetwork(self.model, self.loss)
            reason = str(error).split(". ")[0].replace("fisher-monitor's BackPACK backend ", "")
            network.notes.append(f"BackPACK {reason}: measured with torch.func instead")
            return network

    def __call__(
        self,
        inputs,
        targets: Tensor,
        generator: torch.Generator | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        keep_blocks: bool = False,
    ) -> Measurement:
        """Measure on one probe batch, sub-sampled first if it would not fit in memory.

        The peak memory of the measurement is estimated from the shapes before anything
        large is allocated (see :meth:`estimate_peak_bytes`); a probe batch whose estimate
        exceeds the memory budget is cut to the largest prefix that fits, and a measurement
        that still runs out of memory is retried on half the samples. Both are noted.
        Arguments as for :meth:`_measure_once`.
        """
        start = time.perf_counter()
        prepared = self.prepared
        prepared.sync()
        inputs, targets = batch_on_device(
            inputs, targets, prepared.device, prepared.parameter_dtype
        )
        notes: list[str] = []
        size = targets.shape[0]
        fitting = self._fitting_batch_size(inputs, size)
        if fitting < size:
            estimate = self.estimate_peak_bytes(size, self._columns_per_sample)
            notes.append(
                f"probe sub-sampled from {size} to {fitting} samples to fit the memory budget "
                f"({estimate / 2**30:.1f} GiB estimated for {size})"
            )
            size = fitting
        while True:
            try:
                measurement = self._measure_once(
                    take_samples(inputs, size),
                    targets[:size],
                    generator,
                    all_reduce,
                    keep_blocks,
                )
                break
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
                out_of_memory = isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
                    "out of memory" in str(error) or "can't allocate memory" in str(error)
                )
                if not out_of_memory or size == 1 or all_reduce is not None:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                notes.append(f"ran out of memory with {size} samples; retried with {size // 2}")
                size //= 2
        measurement.notes[:0] = notes
        measurement.scalars["probe/seconds"] = time.perf_counter() - start
        return measurement

    def _fitting_batch_size(self, inputs, size: int) -> int:
        """The largest probe size whose estimated peak memory fits the budget."""
        budget = (
            self.memory_budget
            if self.memory_budget is not None
            else _available_memory(self.prepared.device)
        )
        if budget is None:
            return size
        key = tuple(
            tuple(t.shape[1:]) for t in (inputs if isinstance(inputs, (tuple, list)) else (inputs,))
        )
        if key not in self._columns_cache:  # one forward of one sample, once per input shape
            self._columns_cache[key] = self._output_columns(inputs)
        self._columns_per_sample = self._columns_cache[key]
        if self.estimate_peak_bytes(size, self._columns_per_sample) <= budget:
            return size
        low, high = 1, size
        while low < high:
            middle = (low + high + 1) // 2
            if self.estimate_peak_bytes(middle, self._columns_per_sample) <= budget:
                low = middle
            else:
                high = middle - 1
        if self.estimate_peak_bytes(low, self._columns_per_sample) > budget:
            needed = self.estimate_peak_bytes(1, self._columns_per_sample)
            raise MemoryError(
                f"Even one probe sample needs an estimated {needed / 2**30:.1f} GiB, above the "
                f"memory budget of {budget / 2**30:.1f} GiB. Measure fewer structures (e.g. "
                "structures=('diag',)), fisher='mc', or a sub-network."
            )
        return low

    def _output_columns(self, inputs) -> int:
        """Fisher square-root columns per sample, from the output shape of one sample."""
        settings, prepared = self.settings, self.prepared
        if settings.fisher is FisherType.MC:
            return settings.mc_samples
        first = take_samples(inputs, 1)
        args = first if isinstance(first, (tuple, list)) else (first,)
        network = prepared.network
        with torch.no_grad(), forked_rng(prepared.device, 0), full_precision(prepared):
            output = network(*args)  # one sample, only for its shape; the global RNG is restored
        shape = tuple(output.shape[1:]) if isinstance(output, Tensor) else (1,)
        if self.loss.kind is LossKind.CROSS_ENTROPY:
            classes = shape[0] if shape else 1
            positions = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
            return max(classes - 1, 1) * positions
        if self.loss.kind is LossKind.MSE:
            return int(torch.tensor(shape).prod()) if shape else 1
        return 1

    def estimate_peak_bytes(self, size: int, columns_per_sample: int) -> int:
        """Estimated peak memory of one measurement with ``size`` probe samples.

        Per layer: its factors (outer-product factors for ``Linear`` layers with BackPACK,
        materialised ``U`` and ``V`` otherwise, in the network's type and in float64), the
        Gram or dense matrices of the ``block`` structure (``R × R`` with
        ``R = size · columns_per_sample``, or ``D × D``, four of them), the Kronecker
        factors and the diagonals; the largest layer counts, as layers are processed one
        at a time. The ``torch.func`` backend holds every layer's factors at once.
        """
        settings, prepared = self.settings, self.prepared
        columns = size * columns_per_sample
        functorch = prepared.backend == "functorch"
        largest, held = 0, 0
        for info, module in prepared.layers:
            dim = info.dimension
            weight = getattr(module, "weight", None)
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else (dim, 1)
            out_features, in_features = shape[0], dim // max(shape[0], 1)
            if not functorch and isinstance(module, nn.Linear):
                factors = 8 * (columns * out_features + size * (in_features + out_features))
            else:
                factors = 12 * (size + columns) * dim
            needed = factors + 6 * 8 * dim
            if Structure.BLOCK in settings.structures or Structure.KRON in settings.structures:
                side = columns if dim > max(size, columns) else dim
                needed += 4 * 8 * side * side
            if Structure.KRON in settings.structures:
                needed += 3 * 8 * (out_features**2 + in_features**2)
            largest = max(largest, needed)
            if functorch:
                held += 4 * size * (1 + columns_per_sample) * dim
        return largest + held

    def _measure_once(
        self,
        inputs,
        targets: Tensor,
        generator: torch.Generator | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        keep_blocks: bool = False,
    ) -> Measurement:
        """One measurement on a probe batch already on the network's device.

        Args:
            inputs: Input tensor (or tuple of tensors passed as positional arguments).
            targets: Targets for the loss; the first dimension is the batch.
            generator: Generator for label sampling and dropout masks.
            keep_blocks: Also return every layer's dense ``(F_b, EF_b, g_b)`` in
                :attr:`Measurement.blocks` (layers up to ``MAX_KEPT_BLOCK`` parameters).
            all_reduce: For data-parallel diagonal measurements: a function that sums a
                float64 tensor over all processes. The diagonals (and the loss) are then
                the averages over the union of every process's probe batch, taken before
                any ratio. Only valid with ``structures=("diag",)``.

        Returns:
            The measurement.
        """
        settings = self.settings
        if all_reduce is not None and settings.structures != (Structure.DIAG,):
            raise ValueError("all_reduce is only supported for structures=('diag',).")
        prepared = self.prepared
        statistics: dict[Structure, dict[str, LayerStatistics]] = {
            s: {} for s in settings.structures if s is not Structure.DIAG
        }
        local: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        notes = [
            f"{name}: BatchNorm in train mode measured in eval mode (running statistics)"
            for name in prepared.batchnorm_in_eval
        ]
        notes += list(prepared.notes)
        kron_skipped: list[str] = []
        fallback: set[str] = set()
        blocks: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        if keep_blocks:
            too_large = [
                f"{info.name} (D={info.dimension})"
                for info, _ in prepared.layers
                if info.dimension > MAX_KEPT_BLOCK
            ]
            if too_large:
                raise ValueError(
                    f"keep_blocks=True forms dense D × D blocks, limited to D ≤ {MAX_KEPT_BLOCK}; "
                    f"too large: {', '.join(too_large)}."
                )

        def on_layer(info: LayerInfo, factors: LayerFactors) -> None:
            fisher_diag, empirical_diag = factors.diagonals()
            gradient = factors.mean_gradient()
            # one reduction instead of elementwise checks: NaN and ±inf survive a sum
            if not bool(torch.isfinite(fisher_diag.sum() + empirical_diag.sum() + gradient.sum())):
                raise FloatingPointError(
                    f"Non-finite gradients or curvature in layer {info.name!r}; skipping the "
                    "measurement."
                )
            local[info.name] = (fisher_diag, empirical_diag, gradient)
            dense = factors.dense_blocks() if keep_blocks else None
            if dense is not None:
                blocks[info.name] = tuple(t.detach().cpu() for t in dense)
            if not statistics:
                return
            dampings, fell_back = relative_dampings(
                settings, float(fisher_diag.sum()), info.dimension
            )
            if fell_back:
                fallback.add(info.name)
            gram_u = None
            if Structure.BLOCK in statistics:
                if factors.prefers_dense():
                    block = dense_statistics(
                        *(dense if dense is not None else factors.dense_blocks()), dampings
                    )
                else:
                    gram_u = factors.gram_u()
                    block = _lowrank_block(factors, gram_u, info.dimension, dampings)
                statistics[Structure.BLOCK][info.name] = block
            if Structure.KRON in statistics:
                kron = factors.kronecker()
                if kron is None:
                    kron_skipped.append(f"{info.name} ({info.module_type})")
                    return
                statistics[Structure.KRON][info.name] = kronecker_statistics(
                    kron.input_factor,
                    kron.output_factor,
                    kron.samples,
                    factors.gram_u() if gram_u is None else gram_u,
                    dampings,  # λ_b from tr F_b, as for the other structures
                    input_root=kron.input_root,
                    output_root=kron.output_root,
                )

        result = prepared.run(
            inputs,
            targets,
            exact=settings.fisher is FisherType.EXACT,
            mc_samples=settings.mc_samples,
            seed=seed_from(generator),
            on_layer=on_layer,
            dtype=self.dtype,
        )
        layers = [info for info, _ in prepared.layers if info.name in result.measured]
        loss, batch_size = result.loss, float(result.batch_size)
        if all_reduce is not None:
            all_layers = [info for info, _ in prepared.layers]
            local, loss, batch_size = _reduce_diagonals(
                local, all_layers, loss, batch_size, all_reduce, self.loss.reduction == "sum"
            )
            layers = [info for info in all_layers if info.name in local]
        if Structure.DIAG in settings.structures:
            statistics[Structure.DIAG] = {}
            for info in layers:
                fisher_diag, empirical_diag, gradient = local[info.name]
                dampings, fell_back = relative_dampings(
                    settings, float(fisher_diag.sum()), info.dimension
                )
                if fell_back:
                    fallback.add(info.name)
                statistics[Structure.DIAG][info.name] = diagonal_statistics(
                    fisher_diag, empirical_diag, gradient, dampings
                )
        unused = [info.name for info, _ in prepared.layers if info.name not in result.measured]
        if unused:
            notes.append(f"not measured (no gradient reached them): {', '.join(unused)}")
        if kron_skipped:
            why = (
                "the torch.func backend forms no Kronecker factors"
                if prepared.backend == "functorch"
                else "no Kronecker factorisation for " + ", ".join(kron_skipped)
            )
            notes.append(f"kron: {why}; kron/all covers the other layers")
        if fallback:
            notes.append(
                "relative damping fell back to absolute damping for layers with zero Fisher "
                f"trace: {', '.join(sorted(fallback))}"
            )
        scalars: dict[str, float] = {}
        for structure in settings.structures:
            per_layer = statistics[structure]
            ordered = [info.name for info in layers if info.name in per_layer]
            for name in ordered:
                for metric, value in finalize(per_layer[name], settings.dampings).items():
                    scalars[f"{structure.value}/{metric}/{name}"] = value
            if ordered:
                total = sum_statistics([per_layer[name] for name in ordered])
                for metric, value in finalize(total, settings.dampings).items():
                    scalars[f"{structure.value}/{metric}/{ALL}"] = value
        grad_sq = [local[info.name][2].square().sum() for info in layers]
        scalars["probe/loss"] = loss
        scalars["probe/batch_size"] = batch_size
        scalars["probe/grad_norm"] = float(torch.stack(grad_sq).sum().sqrt()) if grad_sq else 0.0
        return Measurement(
            scalars=scalars,
            layers=layers,
            diagonals={
                info.name: (local[info.name][0].detach().cpu(), local[info.name][1].detach().cpu())
                for info in layers
            },
            settings=settings.as_dict(),
            notes=notes,
            blocks={info.name: blocks[info.name] for info in layers if info.name in blocks},
            coverage=[
                {
                    "layer": info.name,
                    "type": info.module_type,
                    "parameters": list(info.parameter_names),
                    "dimension": info.dimension,
                    "backend": prepared.backend,
                    "measured": info.name in result.measured,
                    "reason": None
                    if info.name in result.measured
                    else "no gradient reached it in this pass",
                }
                for info, _ in prepared.layers
            ],
        )

    def close(self) -> None:
        """Remove BackPACK's hooks from the shadow copy and drop it."""
        if self._prepared is not None:
            self._prepared.close()
            self._prepared = None


def _lowrank_block(factors: LayerFactors, gram_u: Tensor, dimension: int, dampings):
    """Block statistics from Grams, through ``U = VB`` when the coefficients check out.

    The exact Fisher writes every per-sample gradient in its own square-root columns
    (``U = VB``); using that identity avoids the ``1/λ`` cancellations of the Woodbury
    formulas. It is used only if ``BᵀK_VB`` reproduces the directly formed ``K_U`` (it does
    not, for example, when a probability underflowed in the network's precision).
    """
    gram_v = factors.gram_v()
    coefficients = factors.coefficient_matrix()
    if coefficients is not None:
        # B is block-sparse (column n holds sample n's β at rows r·N + n): BᵀK_V and
        # BᵀK_VB as gathers, not dense products
        beta = coefficients.view(-1, factors.num_samples, factors.num_samples).diagonal(
            dim1=1, dim2=2
        )  # (R_n, N)
        n, columns = factors.num_samples, beta.shape[0]
        gram_uv = torch.einsum("rn,rnk->nk", beta, gram_v.view(columns, n, -1))
        rebuilt = torch.einsum("nrm,rm->nm", gram_uv.view(n, columns, n), beta)
        scale = torch.diagonal(gram_u).abs().max()
        if bool((rebuilt - gram_u).abs().max() <= 1e-5 * scale):
            return lowrank_statistics(
                rebuilt, gram_v, gram_uv, dimension, dampings, coefficients=coefficients
            )
    return lowrank_statistics(gram_u, gram_v, factors.gram_uv(), dimension, dampings)


def _available_memory(device: torch.device) -> int | None:
    """Half of the memory available now (CUDA: free device memory; Linux: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        return None
    return None


def _reduce_diagonals(local, all_layers, loss, batch_size, all_reduce, summed_loss: bool):
    """Average diagonals and gradients over all processes, weighted by batch size.

    Every process contributes every layer of the network (zeros for a layer no gradient
    reached there), so all of them pass tensors of the same size to ``all_reduce``. The
    loss is averaged the same way for a ``"mean"`` loss and added up for a ``"sum"`` loss,
    as the loss of the joined batch would be.

    Returns:
        The reduced ``(diag F, diag EF, g)`` of the layers measured somewhere, the loss of
        the joined batch, and the joined batch size.
    """
    device = next(iter(local.values()))[0].device if local else torch.device("cpu")
    dtype = torch.float64
    head = torch.tensor(
        [batch_size, loss if summed_loss else loss * batch_size, 1.0 if local else 0.0],
        dtype=dtype,
        device=device,
    )
    parts = [head]
    for info in all_layers:
        measured = info.name in local
        parts.append(torch.tensor([1.0 if measured else 0.0], dtype=dtype, device=device))
        for index in range(3):
            if measured:
                parts.append(local[info.name][index].detach().to(dtype).reshape(-1) * batch_size)
            else:
                parts.append(torch.zeros(info.dimension, dtype=dtype, device=device))
    total = all_reduce(torch.cat(parts))
    total_size = float(total[0])
    joined_loss = float(total[1]) if summed_loss else float(total[1]) / total_size
    offset = 3
    reduced = {}
    for info in all_layers:
        measured_somewhere = float(total[offset]) > 0
        offset += 1
        tensors = []
        for _ in range(3):
            tensors.append(total[offset : offset + info.dimension] / total_size)
            offset += info.dimension
        if measured_somewhere:
            reduced[info.name] = tuple(tensors)
    return reduced, joined_loss, total_size


def measure(
    model: nn.Module,
    loss_fn: nn.Module | str,
    inputs,
    targets: Tensor,
    *,
    structures: Sequence[str] | str = ("diag", "block"),
    backend: str = "auto",
    fisher: str = "exact",
    mc_samples: int = 1,
    damping: float | Sequence[float] = 1e-3,
    damping_mode: str = "relative",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    keep_blocks: bool = False,
    memory_budget: int | None = None,
) -> Measurement:
    """Compare the Fisher and the empirical Fisher of ``model`` on one probe batch.

    The model is left exactly as it was: the computation runs on a *shadow copy* (new
    module objects carrying BackPACK's hooks, parameters sharing the caller's storage,
    cloned buffers), so the caller's parameters, ``.grad``, buffers, train/eval modes
    and hooks are untouched. The global RNG state is restored afterwards: label sampling
    (``fisher="mc"``) and dropout masks use a seed drawn from ``generator``.

    Args:
        model: The network. Layers are modules that own trainable parameters, named by
            their qualified names in ``model``.
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (reduction
            ``"mean"`` or ``"sum"``), or ``"cross_entropy"``, ``"mse"``,
            ``"bce_with_logits"``.
        inputs: Input batch (a tensor, or a tuple of tensors passed as arguments).
        targets: Targets of the batch.
        structures: Any of ``"diag"``, ``"block"``, ``"kron"``.
        backend: ``"auto"`` uses BackPACK when it can handle the whole network and
            ``torch.func`` otherwise (LayerNorm, attention, GELU, arbitrary functional
            code); ``"backpack"`` or ``"functorch"`` force one. ``Measurement.coverage``
            and ``notes`` say which was used. The ``torch.func`` backend forms no
            Kronecker factors.
        fisher: ``"exact"`` (exact loss-Hessian square root) or ``"mc"`` (sampled labels).
        mc_samples: Sampled labels per input for ``fisher="mc"``.
        damping: λ (relative or absolute), or a sequence of values; with more than one,
            damped metrics are reported for each under ``{metric}@{value}``.
        damping_mode: ``"relative"``: λ_b = damping · tr(F_b)/D_b per layer (and
            structure); ``"absolute"``: λ_b = damping.
        generator: Generator that seeds label sampling and dropout masks. ``None`` draws
            a fresh seed from the operating system (the global RNG is never consumed).
        dtype: Type of the curvature arithmetic (float64 by default).
        keep_blocks: Also return each layer's dense ``(F_b, EF_b, g_b)`` in
            ``Measurement.blocks`` (small layers only; for teaching and plotting).
        memory_budget: Peak bytes the measurement may use (``None``: half the available
            memory). A probe batch estimated to need more is sub-sampled, with a note.

    Returns:
        The :class:`Measurement`.

    Raises:
        ValueError: For invalid settings, an unsupported loss option, or a batch whose
            shape does not fit the loss.
        NotImplementedError: For a network BackPACK cannot handle (the message names the
            module and lists what is supported).
    """
    settings = MeasureSettings.create(structures, fisher, mc_samples, damping, damping_mode)
    measurer = Measurer(
        model, loss_fn, settings, dtype=dtype, backend=backend, memory_budget=memory_budget
    )
    try:
        return measurer(inputs, targets, generator=generator, keep_blocks=keep_blocks)
    finally:
        measurer.close()

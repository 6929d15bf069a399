"""``measure()`` and :class:`Measurer`: F against EF on one probe batch, per layer and overall.

In short, for a probe batch of ``N`` samples with per-sample gradients ``g_n`` of the
per-sample negative log-likelihoods ``ℓ_n``:
``g = (1/N) Σ g_n``, ``EF = (1/N) Σ g_n g_nᵀ`` and
``F = (1/N) Σ_n E_{ŷ~p(·|f_n)}[∇ℓ(f_n, ŷ) ∇ℓ(f_n, ŷ)ᵀ]``, whatever the loss module's
reduction (a ``"sum"`` loss is divided back by ``N``). The definitions, the structures and
every metric are on the theory page (``docs/theory.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from fisher_monitor import validation
from fisher_monitor.audit import update_cosines
from fisher_monitor.backends import (
    BACKENDS,
    LABELS,
    Backend,
    UnsupportedNetworkError,
    auto_order,
    check_backend,
    fallback,
    is_backend_failure,
    is_backpack_failure,
    prepare,
)
from fisher_monitor.backends.pass_context import OutputAdapter, seed_from
from fisher_monitor.batching import batch_on_device, model_inputs, take_samples
from fisher_monitor.engine import cost, memory
from fisher_monitor.engine.exact_solves import DEFAULT_SOLVES
from fisher_monitor.engine.pipeline import (
    MAX_KEPT_BLOCK,
    MeasureOptions,
    measure_once,
    plan_measurement,
)
from fisher_monitor.engine.profile import profile
from fisher_monitor.factors import PassSize
from fisher_monitor.layers import is_lazy
from fisher_monitor.likelihoods import Likelihood, resolve_loss
from fisher_monitor.linalg import Workspace, shared_workspace, using_workspace
from fisher_monitor.measurement import Measurement
from fisher_monitor.settings import FisherType, MeasureSettings


class Measurer:
    """Measure F against EF repeatedly on one network, preparing it once.

    ``measure()`` is ``Measurer(...)(inputs, targets)`` followed by :meth:`close`; the
    Lightning callback keeps one alive across training steps.

    Args:
        model: The network (left untouched: see :func:`measure`).
        loss_fn: A supported loss module or name, or a :class:`~fisher_monitor.likelihoods.
            Likelihood`.
        settings: Validated settings.
        dtype: Floating-point type of the curvature computations (float64 by default:
            the damped solves amplify rounding by up to ``1/λ``).
        backend: ``"auto"`` (BackPACK where it can handle the network, else the autograd
            backend, else ``torch.func``), ``"backpack"``, ``"autograd"`` or ``"functorch"``.
        memory_budget: Bytes a measurement may use at its peak (an int, or a size such as
            ``"2GB"`` or ``"512MiB"``); ``None`` for half the memory available (80% of the
            free GPU memory on CUDA).
        estimator: ``"auto"``, ``"exact"`` or ``"sketch"`` (see :func:`measure`).
        outputs: The loss's input from the network's output (see :func:`measure`).
        solve_budget: Training steps the exact-Fisher solves may cost (see :func:`measure`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | str | Likelihood,
        settings: MeasureSettings,
        dtype: torch.dtype = torch.float64,
        backend: str = "auto",
        memory_budget: int | str | None = None,
        estimator: str = "auto",
        outputs: OutputAdapter | None = None,
        solve_budget: float | None = None,
    ):
        validation.check_model(model)
        dtype = validation.check_dtype(dtype)
        self.model = model
        self.likelihood = resolve_loss(loss_fn)
        self.settings = settings
        self.dtype = dtype
        self.backend = check_backend(backend)
        self.memory_budget = validation.check_memory_budget(memory_budget)
        self.estimator = cost.check_estimator(estimator)
        if outputs is not None and not callable(outputs):
            raise TypeError(
                f"Invalid outputs: {outputs!r}. Pass a function from the network's output to "
                "the loss's input, e.g. `outputs=lambda out: out.logits`, or None."
            )
        self.outputs = outputs
        budget = validation.check_solve_budget(solve_budget)
        self.solves = (
            DEFAULT_SOLVES if budget is None else replace(DEFAULT_SOLVES, budget_steps=budget)
        )
        self._prepared: Backend | None = None
        #: Buffers reused by every measurement of the prepared network (Gram matrices,
        #: factorisations): no allocation of their size in the hot path.
        self.workspace = Workspace()

    @property
    def prepared(self) -> Backend:
        """The prepared backend, rebuilt if the caller replaced its parameters."""
        if self._prepared is None or self._prepared.is_stale():
            self.close()
            lazy = [name for name, p in self.model.named_parameters() if is_lazy(p)]
            if lazy:
                raise ValueError(
                    "The network has uninitialised lazy parameters "
                    f"({', '.join(lazy[:3])}): their shapes are only known after a first "
                    "forward pass. Measure after it."
                )
            self._prepared = prepare(self.model, self.likelihood, self.backend, self.outputs)
        return self._prepared

    def __call__(
        self,
        inputs,
        targets: Tensor,
        generator: torch.Generator | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        keep_blocks: bool = False,
        keep_directions: bool = False,
        update: Mapping[str, Tensor] | None = None,
    ) -> Measurement:
        """Measure on one probe batch, sub-sampled first if it would not fit in memory.

        Args:
            inputs: The network's inputs (a tensor, a tuple of positional ones, a mapping of
                keyword ones, or :class:`~fisher_monitor.batching.ModelInputs`).
            targets: Targets for the loss; the first dimension is the batch.
            generator: Generator for label sampling and dropout masks (``None``: a fresh
                seed from the operating system; the global RNG is never consumed).
            all_reduce: For data-parallel diagonal measurements: a function that sums a
                float64 tensor over all processes. The diagonals (and the loss) are then
                the averages over the union of every process's probe batch, taken before
                any ratio. Only valid with ``structures=("diag",)``.
            keep_blocks: Also return every layer's dense ``(F_b, EF_b, g_b)`` in
                :attr:`Measurement.blocks` (layers up to ``MAX_KEPT_BLOCK`` parameters).
            keep_directions: Also return ``(A⁻¹g, B⁻¹g)`` per structure, damping and layer
                in :attr:`Measurement.directions` (implied by ``update``).
            update: An update direction per parameter (e.g. the difference of two state
                dicts), keyed by the names of :attr:`LayerInfo.parameter_names`: adds the
                step-audit cosines ``{structure}/update_{nat,ef,grad}_cosine/{layer}``.

        Returns:
            The measurement. The probe batch is sub-sampled (with a note) when its
            estimated peak memory exceeds the budget, and a measurement that runs out of
            memory is retried on half the samples (with a note).
        """
        validation.check_generator(generator)
        start = time.perf_counter()
        options = MeasureOptions(
            seed=seed_from(generator),
            all_reduce=all_reduce,
            keep_blocks=keep_blocks,
            keep_directions=keep_directions or update is not None,
            dtype=self.dtype,
            estimator=self.estimator,
            memory_budget=self.memory_budget,
            solves=self.solves,
        )
        while True:
            try:
                with using_workspace(self.workspace):
                    measurement = self._measure(inputs, targets, options)
                break
            except Exception as error:
                self._next_backend(error, options)
        if update is not None:
            measurement.scalars.update(update_cosines(measurement, update))
        measurement.scalars["probe/seconds"] = time.perf_counter() - start
        return measurement

    def _next_backend(self, error: Exception, options: MeasureOptions) -> None:
        """After a backend failed at run time, prepare the next one (``backend="auto"``).

        Never under data parallelism (``all_reduce``): every process must enter the same
        collectives, and one process retrying alone would break their order.

        Raises:
            Exception: ``error`` itself when it is not the backend's own failure (bad input,
                non-finite values, memory) or no other backend may be tried.
        """
        failed = self._prepared.backend if self._prepared is not None else None
        order = auto_order()
        if failed is None or not is_backend_failure(error) or failed not in order[:-1]:
            raise error
        if options.all_reduce is not None:
            raise error
        if self.backend != "auto":
            if failed == "backpack" and is_backpack_failure(error):
                raise RuntimeError(
                    f"BackPACK failed on this network ({error}). BackPACK computes some "
                    "Jacobians (average pooling, embeddings) in the default dtype, which fails "
                    "for a float64 network under a float32 default. Use backend='auto' or "
                    "'functorch', or torch.set_default_dtype(torch.float64)."
                ) from error
            raise error
        # the backend's own limitation on this network: the next one measures it from now on
        self.close()
        reason = error.reason if isinstance(error, UnsupportedNetworkError) else _first_line(error)
        why = f"{LABELS[failed]} failed on this network ({reason})"
        self._prepared = fallback(self.model, self.likelihood, failed, why, self.outputs)

    def _measure(self, inputs, targets: Tensor, options: MeasureOptions) -> Measurement:
        prepared = self.prepared
        notes = prepared.sync()
        inputs, targets = batch_on_device(
            inputs, targets, prepared.device, prepared.parameter_dtype
        )
        size = batch = targets.shape[0]
        plan = self._plan(inputs, size, options)
        fitting = self._fitting_batch_size(inputs, size, plan)
        if fitting < size:
            estimate = self._peak_bytes(inputs, size, plan)
            notes.append(
                f"probe sub-sampled from {size} to {fitting} samples to fit the memory budget "
                f"({validation.format_bytes(estimate)} estimated for {size})"
            )
            size = fitting
            plan = self._plan(inputs, size, options)
        while True:
            try:
                measurement = measure_once(
                    prepared,
                    self.settings,
                    take_samples(inputs, size, batch),
                    targets[:size],
                    options,
                    plan,
                )
                break
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
                if not memory.is_out_of_memory(error) or size == 1 or options.all_reduce:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                notes.append(f"ran out of memory with {size} samples; retried with {size // 2}")
                size //= 2
                plan = self._plan(inputs, size, options)
        measurement.notes[:0] = notes
        return measurement

    def _plan(self, inputs, size: int, options: MeasureOptions) -> cost.CostPlan:
        """The cost model's plan for ``size`` samples: the exact Fisher or an estimator.

        Made once per measurement (again only when the probe is cut to fit the memory).
        """
        return plan_measurement(self.prepared, self.settings, inputs, size, options)

    def _pass_size(self, inputs, size: int, plan: cost.CostPlan) -> PassSize:
        """The pass the plan implies for ``size`` samples."""
        fisher = self.settings.fisher is FisherType.EXACT and plan.sketch is None
        if plan.sketch is not None:
            columns = plan.sketch.columns
        elif fisher:
            columns = plan.exact_columns
        else:
            columns = self.settings.mc_samples
        itemsize = profile(self.prepared, inputs).itemsize
        return PassSize(size, columns, fisher, len(self.settings.dampings), itemsize)

    def _peak_bytes(self, inputs, size: int, plan: cost.CostPlan) -> int:
        return memory.estimate_peak_bytes(
            self.prepared,
            plan.structures,
            profile(self.prepared, inputs),
            self._pass_size(inputs, size, plan),
        )

    def _fitting_batch_size(self, inputs, size: int, plan: cost.CostPlan) -> int:
        """The largest probe the memory budget allows with this plan (the budget's note)."""
        budget = (
            self.memory_budget
            if self.memory_budget is not None
            else memory.available_memory(self.prepared.device)
        )
        if budget is None:
            return size
        return memory.fitting_batch_size(
            lambda count: self._peak_bytes(inputs, count, plan),
            size,
            budget,
            [structure.name for structure in plan.structures],
            self.settings.fisher.value,
        )

    def estimate_peak_bytes(self, inputs, size: int | None = None) -> int:
        """Estimated peak memory of measuring ``size`` samples shaped like ``inputs``.

        Args:
            inputs: A probe batch (its first sample is run once to profile the network).
            size: Probe samples (default: the batch's size).
        """
        prepared = self.prepared
        batch = torch.zeros(model_inputs(inputs).batch_size() or 1)
        inputs = batch_on_device(inputs, batch, prepared.device, prepared.parameter_dtype)[0]
        size = batch.shape[0] if size is None else size
        options = MeasureOptions(
            seed=0, estimator=self.estimator, memory_budget=self.memory_budget, solves=self.solves
        )
        return self._peak_bytes(inputs, size, self._plan(inputs, size, options))

    def close(self) -> None:
        """Remove BackPACK's hooks from the shadow copy and drop it (and the workspace)."""
        if self._prepared is not None:
            self._prepared.close()
            self._prepared = None
            self.workspace = Workspace()


def _first_line(error: BaseException) -> str:
    """``"Type: first line of the message"``, cut to 160 characters (for a note)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:160]


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
    keep_directions: bool = False,
    update: Mapping[str, Tensor] | None = None,
    memory_budget: int | str | None = None,
    estimator: str = "auto",
    outputs: OutputAdapter | None = None,
    solve_budget: float | None = None,
) -> Measurement:
    """Compare the Fisher and the empirical Fisher of ``model`` on one probe batch.

    The model is left exactly as it was: the computation runs on a *shadow copy* (new
    module objects carrying BackPACK's hooks, parameters sharing the caller's storage,
    cloned buffers), so the caller's parameters, ``.grad``, buffers, train/eval modes
    and hooks are untouched. The global RNG state is restored afterwards: label sampling
    (``fisher="mc"``) and dropout masks use a seed drawn from ``generator``. The work
    buffers (Gram matrices, factorisations, fused diagonals) stay with the calling thread
    for its next call while they hold at most
    :data:`~fisher_monitor.linalg.SHARED_WORKSPACE_BYTES` (64 MiB), so that repeated
    calls do not fault in fresh pages; results never share them.

    Args:
        model: The network. Layers are modules that own trainable parameters, named by
            their qualified names in ``model`` (``torch.compile`` wrappers looked through).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (reduction
            ``"mean"`` or ``"sum"``), or ``"cross_entropy"``, ``"mse"``,
            ``"bce_with_logits"``.
        inputs: Input batch: a tensor, a tuple of tensors (positional arguments), a mapping
            (keyword arguments, e.g. ``{"input_ids": ..., "attention_mask": ...}``) or
            :class:`~fisher_monitor.batching.ModelInputs`. Tensors whose first dimension is
            the batch are split per sample; others are passed to every sample as they are.
        targets: Targets of the batch, one row per sample (e.g. ``(N, T)`` token labels for
            ``(N, C, T)`` logits).
        structures: Any of ``"diag"``, ``"block"``, ``"kron"``.
        backend: ``"auto"`` uses BackPACK when it can handle the network (single-input
            modules it lacks, such as LayerNorm or GELU, are pulled back by ``torch.func``
            inside its pass), else the autograd backend (module hooks and batched backward
            passes: functional code between layers, attention, tied weights, Hugging Face
            and timm models), else ``torch.func`` through the whole network;
            ``"backpack"``, ``"autograd"`` or ``"functorch"`` force one.
            ``Measurement.coverage`` and ``notes`` say which was used. The ``torch.func``
            backend forms no Kronecker factors.
        fisher: ``"exact"`` (exact loss-Hessian square root) or ``"mc"`` (sampled labels).
        mc_samples: Sampled labels per input for ``fisher="mc"``.
        damping: λ (relative or absolute), or a sequence of values; with more than one,
            damped metrics are reported for each under ``{metric}@{value}``.
        damping_mode: ``"relative"``: λ_b = damping · tr(F_b)/D_b per layer;
            ``"absolute"``: λ_b = damping.
        generator: Generator that seeds label sampling and dropout masks. ``None`` draws
            a fresh seed from the operating system (the global RNG is never consumed).
        dtype: Type of the curvature arithmetic (float64 by default).
        keep_blocks: Also return each layer's dense ``(F_b, EF_b, g_b)`` in
            ``Measurement.blocks`` (small layers only; for teaching and plotting).
        keep_directions: Also return ``(A⁻¹g, B⁻¹g)`` per structure, damping and layer in
            ``Measurement.directions``.
        update: A parameter update (name → tensor, e.g. ``θ_after − θ_before`` from two
            state dicts, names as in ``Measurement.layers[i].parameter_names``): adds the
            cosines of the update with the natural-gradient step, the EF step and the
            negative gradient, ``{structure}/update_{nat,ef,grad}_cosine/{layer}``.
        memory_budget: Peak bytes the measurement may use, an int or a size such as
            ``"2GB"`` (``None``: half the available memory). A probe batch estimated to need
            more is sub-sampled, with a note.
        estimator: ``"auto"`` measures the exact Fisher while it is affordable and a sketch
            of it (random combinations of its square-root columns, with standard errors
            under ``…_se`` keys) when many classes would make it too slow or too large;
            ``"exact"`` or ``"sketch"`` force one (``docs/theory.md#estimators``).
        outputs: The loss's input from what the network returns, e.g.
            ``lambda out: out.logits.transpose(1, 2)`` for a language model's ``(N, T, C)``
            logits. ``None`` takes a tensor as it is, the ``logits`` of a ``ModelOutput`` or
            of a mapping, or the first element of a tuple.
        solve_budget: Under a sketch, the four ``block`` metrics that need ``(F + λI)⁻¹``
            (``kl``, ``direction_cosine``, ``nat_grad_cosine``, ``nat_projection``) come
            from exact-Fisher solves, which can cost thousands of training steps. They run
            while the cost model, and then their measured pace, expects at most this many
            training steps of work for them (``None``: 40,000; ``0``: never;
            ``float("inf")``: always); otherwise those metrics are left out, with a note
            giving the cost (``docs/theory.md#matrix-free``).

    Returns:
        The :class:`Measurement`.

    Raises:
        ValueError: For invalid settings, an unsupported loss option, or a batch whose
            shape does not fit the loss.
        NotImplementedError: For a network the chosen backend cannot handle (the
            message names the module and lists what is supported).
        FloatingPointError: For a non-finite loss or gradient, or a metric outside its
            mathematical range by more than rounding (``NumericalError``).
    """
    validation.check_generator(generator)
    settings = MeasureSettings.create(structures, fisher, mc_samples, damping, damping_mode)
    measurer = Measurer(
        model,
        loss_fn,
        settings,
        dtype=dtype,
        backend=backend,
        memory_budget=memory_budget,
        estimator=estimator,
        outputs=outputs,
        solve_budget=solve_budget,
    )
    with shared_workspace() as workspace:  # buffers kept for the next call (small ones)
        measurer.workspace = workspace
        try:
            return measurer(
                inputs,
                targets,
                generator=generator,
                keep_blocks=keep_blocks,
                keep_directions=keep_directions,
                update=update,
            )
        finally:
            measurer.close()


__all__ = [
    "BACKENDS",
    "MAX_KEPT_BLOCK",
    "Measurer",
    "UnsupportedNetworkError",
    "measure",
]

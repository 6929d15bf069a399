"""Audit the optimizer the user runs: its step and its preconditioner against F and the EF.

Two questions, answered with pure tensor maths on a :class:`Measurement` (no Lightning,
no BackPACK): how far is the step the optimizer really took from the natural-gradient
step, and how well does the diagonal curvature an adaptive optimizer implies match the
Fisher's or the empirical Fisher's diagonal? The definitions below are the contract; the
theory page of the documentation (``docs/theory.md``) explains them at more length.

**Step audit** (:func:`update_cosines`). Let Δθ = θ_after − θ_before be the update one
``optimizer.step()`` applied (with gradient accumulation: the step after the accumulated
micro-batches), g the mean probe gradient at θ_before, and, for a structure S and a
damping λ_b, A = F_S + λ_b I and B = EF_S + λ_b I restricted to layer b (the same λ_b the
metrics use). Per layer b (coordinates of its parameters in ``named_parameters`` order)::

    update_nat_cosine   = cos(Δθ_b, −A⁻¹g_b)
    update_ef_cosine    = cos(Δθ_b, −B⁻¹g_b)
    update_grad_cosine  = cos(Δθ_b, −g_b)          with cos(u, v) = ⟨u, v⟩ / (‖u‖ ‖v‖)

and for ``all`` the vectors of the layers are concatenated (A and B block-diagonal with
each layer's λ_b): cos_all = Σ_b ⟨Δθ_b, v_b⟩ / (Σ_b ‖Δθ_b‖² · Σ_b ‖v_b‖²)^½ — inner
products and squared norms add up; it is never an average of the per-layer cosines. A
zero update (or a zero direction) has no direction: its cosine is NaN.

*What the update contains besides a preconditioned gradient.* g is the gradient of the
probe batch: the training batch of the measured step, possibly sub-sampled to fit the
memory budget, or a fixed probe set. The optimizer builds Δθ from its own mini-batch
gradient ĝ (the full training batch, averaged over accumulated micro-batches) and adds:

- momentum: Δθ ∝ −Σ_k β^k ĝ_{t−k} (after preconditioning, for Adam-like optimizers), so
  past gradients at past parameters enter;
- weight decay: L2 decay (``torch.optim.Adam``'s or ``SGD``'s ``weight_decay``) adds λθ to
  ĝ before anything else (and so also enters an adaptive optimizer's second moment);
  AdamW's decoupled decay adds −ηλθ to Δθ directly;
- gradient clipping: clipping the *global* norm (Lightning's ``gradient_clip_val`` with
  ``"norm"``) multiplies every coordinate by the same factor and leaves all these cosines
  unchanged; clipping per tensor or by value changes the direction;
- a learning-rate schedule only scales Δθ (per parameter group): cosines are unchanged,
  except for ``all`` when the groups' learning rates differ.

All of these are part of the applied update, and each lowers the cosines with any pure
preconditioned-gradient direction: a cosine below 1 measures the whole step, not only the
preconditioner. Two exact anchors: plain SGD (no momentum, decay or clipping) on the probe
batch itself gives ``update_grad_cosine = 1``; a step −η A⁻¹g gives
``update_nat_cosine = 1``.

**Preconditioner audit** (:func:`preconditioner_audit`). An adaptive optimizer divides
its (momentum) step coordinate-wise by a denominator d, so it behaves like a
preconditioner with diagonal curvature ∝ d (the learning rate absorbs the scale). With ĝ_t
the gradient the optimizer received at its step t (after clipping, with L2 weight decay
added), and state read *after* step t — which holds exactly the d that step divided by,
because each of these optimizers updates its moments before dividing (read before the
step it is the previous step's)::

    Adam, AdamW, NAdam   d = √(v_t / (1 − β₂ᵗ)) + ε,   v_t = β₂ v_{t−1} + (1 − β₂) ĝ_t²
                         (``exp_avg_sq``; Adam/AdamW with ``amsgrad``: max_{s≤t} v_s,
                         ``max_exp_avg_sq``)
    RAdam                d = (√v_t + ε) / √(1 − β₂ᵗ); only steps with ρ_t > 5 use it,
                         ρ_t = ρ_∞ − 2tβ₂ᵗ/(1 − β₂ᵗ), ρ_∞ = 2/(1 − β₂) − 1
    Adamax               d = u_t = max(β₂ u_{t−1}, |ĝ_t| + ε)       (``exp_inf``)
    Adagrad              d = √s_t + ε,  s_t = s_0 + Σ_{k≤t} ĝ_k²     (``sum``)
    RMSprop              d = √a_t + ε,  a_t = α a_{t−1} + (1 − α) ĝ_t²   (``square_avg``);
                         centered: d = √(a_t − m_t²) + ε, m_t = α m_{t−1} + (1 − α) ĝ_t
                         (``grad_avg``)
    Adafactor            d = √max(V̂_t, ε₁²): V̂_t = R_t C_t / mean(R_t) for matrices
                         (``row_var``, ``col_var``), V̂_t = ``variance`` for vectors

The optimizer is recognised from its state keys (in the order Adafactor, the Adam family,
Adamax, RMSprop, Adagrad; RAdam, whose keys are Adam's, by its class), so subclasses and
other libraries' optimizers that keep the same state with the same meaning are audited
too. The scale-free comparison per layer b, and for ``all`` with the vectors concatenated,
is::

    preconditioner_fisher_cosine = cos(d_b, √diag F_b)
    preconditioner_ef_cosine     = cos(d_b, √diag EF_b)

Both vectors are non-negative, so these cosines lie in [0, 1], and unrelated positive
vectors already have a sizable one (≈ 0.75 for independent uniform entries): compare the
two with each other, not with zero, and read them with the histograms of
log10(d / √diag F). √diag F and √diag EF are estimates from the probe batch; the EF, an
average of N rank-one terms, is the noisier one, and estimation noise typically lowers
the cosines, so a small probe understates them (a fixed, larger probe set gives steadier
values). Within ``all``, each parameter group's denominator is taken as it is (a group's
learning rate is not folded in); Adafactor's per-tensor relative step size and update
clipping are not part of d, so for it only the per-tensor shape of d is meaningful.

**Mini-batch second moments are not the EF.** For a mini-batch of B probe samples drawn
with replacement, g_B = (1/B) Σ_j g_{n_j} has mean g and covariance (EF − g gᵀ)/B, so::

    E[g_B g_Bᵀ] = g gᵀ + (EF − g gᵀ)/B,   diag: E[g_B²] = g² + (diag EF − g²)/B

(drawn without replacement from N samples, the covariance term is multiplied by
(N − B)/(N − 1)). Adam's v̂ is an exponential average over steps of ĝ_t², so it tracks
E[g_B²] along the recent trajectory, not diag EF: with B = 1 the two agree; for large B,
v̂ follows g² wherever g_i² ≳ diag EF_i / B and follows diag EF / B only where gradient
noise dominates the mean. A low ``preconditioner_ef_cosine`` with a high cosine between d
and √E[g_B²] (:func:`minibatch_second_moment`, with the training batch size) means the
optimizer does track the EF, mixed with the squared mean gradient as the batch size
dictates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fisher_monitor import keys
from fisher_monitor.curvature.layers import LayerInfo
from fisher_monitor.measurement import Measurement

__all__ = [
    "PreconditionerAudit",
    "has_second_moment",
    "minibatch_second_moment",
    "preconditioner_audit",
    "update_cosines",
]


def _dampings(settings: Mapping) -> list[float]:
    damping = settings.get("damping", 1e-3)
    if isinstance(damping, (list, tuple)):
        return [float(value) for value in damping]
    return [float(damping)]


def _cosine(inner: float, norm_sq_a: float, norm_sq_b: float) -> float:
    """⟨a, b⟩ / (‖a‖ ‖b‖) from the inner product and squared norms; NaN when either is 0."""
    denominator = math.sqrt(norm_sq_a * norm_sq_b)
    if not denominator > 0:
        return float("nan")
    return inner / denominator


def _flat_update(update: Mapping[str, Tensor], layer, device: torch.device) -> Tensor:
    pieces = []
    for name, shape in zip(layer.parameter_names, layer.shapes, strict=True):
        value = torch.as_tensor(update[name])
        if value.numel() != math.prod(shape):
            raise ValueError(
                f"update[{name!r}] has shape {tuple(value.shape)!r}, but the parameter has shape "
                f"{tuple(shape)!r}. Give θ_after − θ_before of that parameter."
            )
        pieces.append(value.detach().reshape(-1).to(device=device, dtype=torch.float64))
    return torch.cat(pieces)


def update_cosines(measurement: Measurement, update: Mapping[str, Tensor]) -> dict[str, float]:
    """Cosines between an applied update and the natural-gradient, EF and gradient steps.

    For every structure in ``measurement.directions``, every damping λ of the
    measurement and every measured layer b plus ``all`` (see the module docstring for
    the definitions and what an applied update contains)::

        {structure}/update_nat_cosine{@λ}/{b}  = cos(Δθ_b, −A⁻¹g_b),  A = F_S + λ_b I
        {structure}/update_ef_cosine{@λ}/{b}   = cos(Δθ_b, −B⁻¹g_b),  B = EF_S + λ_b I
        {structure}/update_grad_cosine/{b}     = cos(Δθ_b, −g_b)

    where the ``@λ`` suffix appears only when several dampings were measured. ``all``
    concatenates the layers of the structure (inner products and squared norms add up).

    Args:
        measurement: A measurement taken with ``keep_directions=True`` at θ_before: it
            supplies g_b (``measurement.gradient``) and (A⁻¹g_b, B⁻¹g_b)
            (``measurement.directions``).
        update: Per qualified parameter name (as in ``LayerInfo.parameter_names``), the
            applied update θ_after − θ_before of that parameter. Entries for parameters
            outside the measured layers are ignored.

    Returns:
        The cosines, keyed as above (NaN where the update or the direction is zero).

    Raises:
        ValueError: When ``measurement`` holds no directions, when ``update`` lacks a
            measured parameter or has the wrong number of elements for one.
    """
    dampings = _dampings(measurement.settings)
    suffixes = [keys.damping_suffix(value, len(dampings) > 1) for value in dampings]
    layers = _updated_layers(measurement, update, dampings)
    index = _update_inner_products(measurement, layers, update)

    result: dict[str, float] = {}
    column = 3
    for structure, per_damping in measurement.directions.items():
        present = [layer.name for layer in layers if layer.name in per_damping[0]]
        for suffix in suffixes:
            total = [0.0] * 7
            for name in present:
                row = index[name]
                values = [*row[:3], *row[column : column + 4]]
                total = [a + b for a, b in zip(total, values, strict=True)]
                _put_update(result, structure, name, suffix, values)
            if present:
                _put_update(result, structure, keys.ALL, suffix, total)
            column += 4
    return result


def _updated_layers(
    measurement: Measurement, update: Mapping[str, Tensor], dampings: list[float]
) -> list[LayerInfo]:
    """The measured layers that have directions, after checking ``measurement`` and ``update``.

    Raises:
        ValueError: As documented in :func:`update_cosines`.
    """
    if not measurement.directions:
        raise ValueError(
            "The measurement holds no preconditioned directions. Measure with "
            "keep_directions=True to audit an update."
        )
    for structure, per_damping in measurement.directions.items():
        if len(per_damping) != len(dampings):
            raise ValueError(
                f"measurement.directions[{structure!r}] holds {len(per_damping)} damping "
                f"entries, but the settings list {len(dampings)} dampings {dampings!r}."
            )
    in_directions = {
        name for per_damping in measurement.directions.values() for name in per_damping[0]
    }
    layers = [layer for layer in measurement.layers if layer.name in in_directions]
    missing = [name for layer in layers for name in layer.parameter_names if name not in update]
    if missing:
        raise ValueError(
            f"update has no entry for the measured parameters {missing!r}. Give "
            "θ_after − θ_before for every parameter of the measured layers "
            "(Measurement.layers[i].parameter_names)."
        )
    return layers


def _update_inner_products(
    measurement: Measurement, layers: list[LayerInfo], update: Mapping[str, Tensor]
) -> dict[str, list[float]]:
    """Per layer b, the inner products the cosines of :func:`update_cosines` are made of.

    The row of layer b is ``‖Δθ_b‖², ⟨Δθ_b, g_b⟩, ‖g_b‖²`` followed, per structure and
    damping (in ``measurement.directions`` order), by ``⟨Δθ_b, A⁻¹g_b⟩, ‖A⁻¹g_b‖²,
    ⟨Δθ_b, B⁻¹g_b⟩, ‖B⁻¹g_b‖²`` (zeros where the structure has no direction for b), in
    float64. All rows come to the CPU in one transfer.
    """
    rows: list[Tensor] = []
    for layer in layers:
        gradient = measurement.gradient[layer.name]
        delta = _flat_update(update, layer, gradient.device)
        gradient = gradient.to(torch.float64)
        parts = [delta @ delta, delta @ gradient, gradient @ gradient]
        for per_damping in measurement.directions.values():
            for directions in per_damping:
                if layer.name not in directions:
                    parts.extend(torch.zeros(4, dtype=torch.float64, device=delta.device))
                    continue
                natural, empirical = (
                    v.to(device=delta.device, dtype=torch.float64) for v in directions[layer.name]
                )
                parts.extend(
                    [delta @ natural, natural @ natural, delta @ empirical, empirical @ empirical]
                )
        rows.append(torch.stack(parts))
    sums = torch.stack(rows).cpu().tolist() if rows else []
    return {layer.name: row for layer, row in zip(layers, sums, strict=True)}


def _put_update(
    result: dict[str, float], structure: str, layer: str, suffix: str, values: Sequence[float]
) -> None:
    delta_sq, delta_grad, grad_sq, delta_nat, nat_sq, delta_ef, ef_sq = values
    # cos(Δθ, −v) = −⟨Δθ, v⟩ / (‖Δθ‖ ‖v‖)
    result[keys.metric_key(structure, "update_nat_cosine", layer, suffix)] = _cosine(
        -delta_nat, delta_sq, nat_sq
    )
    result[keys.metric_key(structure, "update_ef_cosine", layer, suffix)] = _cosine(
        -delta_ef, delta_sq, ef_sq
    )
    result[keys.metric_key(structure, "update_grad_cosine", layer)] = _cosine(
        -delta_grad, delta_sq, grad_sq
    )


def minibatch_second_moment(
    diag_ef: Tensor, gradient: Tensor, batch_size: int, population: int | None = None
) -> Tensor:
    """Expected squared mini-batch gradient, coordinate-wise: what Adam's v̂ tracks.

    For a mini-batch of B samples drawn with replacement from the N probe samples, with
    per-sample gradients g_n, g = (1/N) Σ g_n and diag EF = (1/N) Σ g_n²::

        E[g_B²] = g² + (diag EF − g²) / B

    and, drawn without replacement (``population=N``), the second term is multiplied by
    (N − B)/(N − 1), the finite-population correction.

    Args:
        diag_ef: diag EF (per-sample average of squared per-sample gradients).
        gradient: The mean gradient g, same shape.
        batch_size: B ≥ 1.
        population: N for draws without replacement (B ≤ N, N ≥ 2); ``None`` for draws
            with replacement.

    Returns:
        E[g_B²], same shape as ``diag_ef``.

    Raises:
        ValueError: For a batch size below 1 or above the population.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r}. Give an integer ≥ 1.")
    factor = 1.0 / batch_size
    if population is not None:
        if not isinstance(population, int) or population < max(2, batch_size):
            raise ValueError(
                f"Invalid population: {population!r}. Give the number of samples N ≥ 2 the "
                f"batches are drawn from without replacement (N ≥ batch_size = {batch_size})."
            )
        factor *= (population - batch_size) / (population - 1)
    squared = gradient * gradient
    return squared + (diag_ef - squared) * factor


@dataclass
class PreconditionerAudit:
    """The diagonal preconditioner of an adaptive optimizer against √diag F and √diag EF.

    Attributes:
        name: The optimizer's class name, e.g. ``"AdamW"``.
        scalars: ``"optimizer/preconditioner_fisher_cosine/{layer}"`` and
            ``"optimizer/preconditioner_ef_cosine/{layer}"`` per audited layer and for
            ``all`` (empty when no measured parameter has optimizer state yet).
        log_ratios: Per audited layer, log10(d / √diag F) (float32, CPU) over the entries
            where both are positive and finite.
        denominators: Per audited layer, the denominator d (float64, CPU) over the
            audited coordinates (``named_parameters`` order, parameters without state
            left out).
        denominator: The formula of d for this optimizer, e.g. ``"√(v/(1−β₂ᵗ)) + ε"``.
        notes: What was skipped and why (parameters outside the optimizer, no state yet
            before the first step, a RAdam step that used no second moment).
    """

    name: str
    scalars: dict[str, float]
    log_ratios: dict[str, Tensor]
    denominators: dict[str, Tensor] = field(default_factory=dict)
    denominator: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        """The notes as one line (empty when there are none)."""
        return " ".join(self.notes)


def _float(value) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _step(state: Mapping) -> float | None:
    return _float(state["step"]) if "step" in state else None


def _adam(state, group, param) -> Tensor | None:
    second = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
    if second is None:
        second = state.get("exp_avg_sq")
    step = _step(state)
    if second is None or not step:
        return None
    correction = 1.0 - _float(group["betas"][1]) ** step
    return (second.double() / correction).sqrt() + _float(group["eps"])


def _radam(state, group, param) -> Tensor | None:
    step = _step(state)
    if "exp_avg_sq" not in state or not step:
        return None
    correction = 1.0 - _float(group["betas"][1]) ** step
    return (state["exp_avg_sq"].double().sqrt() + _float(group["eps"])) / math.sqrt(correction)


def _adamax(state, group, param) -> Tensor | None:
    if "exp_inf" not in state or not _step(state):
        return None
    return state["exp_inf"].double().clone()


def _adagrad(state, group, param) -> Tensor | None:
    if "sum" not in state or not _step(state):
        return None
    return state["sum"].double().sqrt() + _float(group["eps"])


def _rmsprop(state, group, param) -> Tensor | None:
    if "square_avg" not in state or not _step(state):
        return None
    second = state["square_avg"].double()
    if group.get("centered") and "grad_avg" in state:
        mean = state["grad_avg"].double()
        second = second - mean * mean
    return second.sqrt() + _float(group["eps"])


def _adafactor(state, group, param) -> Tensor | None:
    if not _step(state):
        return None
    eps1 = group["eps"][0]
    eps1 = torch.finfo(param.dtype).eps if eps1 is None else _float(eps1)
    if state.get("row_var") is not None and state.get("col_var") is not None:
        rows, cols = state["row_var"].double(), state["col_var"].double()
        variance = (rows @ cols) / rows.mean(dim=-2, keepdim=True).clamp(min=eps1)
    elif state.get("variance") is not None:
        variance = state["variance"].double()
    else:
        return None
    return variance.clamp(min=eps1 * eps1).sqrt()


@dataclass(frozen=True)
class _Rule:
    """How to read an optimizer's denominator from its state."""

    state_key: str
    denominator: str
    compute: Callable[[Mapping, Mapping, Tensor], Tensor | None]
    group_keys: tuple[str, ...]


_ADAM = _Rule("exp_avg_sq", "√(v/(1−β₂ᵗ)) + ε", _adam, ("betas", "eps"))
_ADAM_AMSGRAD = _Rule("max_exp_avg_sq", "√(max v/(1−β₂ᵗ)) + ε", _adam, ("betas", "eps"))
_RADAM = _Rule("exp_avg_sq", "(√v + ε)/√(1−β₂ᵗ)", _radam, ("betas", "eps"))
_ADAMAX = _Rule("exp_inf", "u = max(β₂u, |g| + ε)", _adamax, ("betas",))
_ADAGRAD = _Rule("sum", "√(Σg²) + ε", _adagrad, ("eps",))
_RMSPROP = _Rule("square_avg", "√(EMA g²) + ε", _rmsprop, ("eps",))
_RMSPROP_CENTERED = _Rule("square_avg", "√(EMA g² − (EMA g)²) + ε", _rmsprop, ("eps",))
_ADAFACTOR = _Rule("step", "√max(RC/mean R, ε₁²)", _adafactor, ("eps",))

#: State keys -> rule, in the order they are tried.
_BY_STATE_KEY: tuple[tuple[tuple[str, ...], _Rule], ...] = (
    (("row_var", "variance"), _ADAFACTOR),
    (("max_exp_avg_sq",), _ADAM_AMSGRAD),
    (("exp_avg_sq",), _ADAM),
    (("exp_inf",), _ADAMAX),
    (("square_avg",), _RMSPROP),
    (("sum",), _ADAGRAD),
)


def _known_classes() -> tuple[tuple[type, _Rule], ...]:
    pairs = [
        (torch.optim.RAdam, _RADAM),
        (torch.optim.Adam, _ADAM),
        (torch.optim.AdamW, _ADAM),
        (torch.optim.NAdam, _ADAM),
        (torch.optim.Adamax, _ADAMAX),
        (torch.optim.Adagrad, _ADAGRAD),
        (torch.optim.RMSprop, _RMSPROP),
    ]
    adafactor = getattr(torch.optim, "Adafactor", None)
    if adafactor is not None:
        pairs.append((adafactor, _ADAFACTOR))
    return tuple(pairs)


def _rule_of(optimizer: torch.optim.Optimizer) -> _Rule | None:
    by_class = next((r for cls, r in _known_classes() if isinstance(optimizer, cls)), None)
    state_keys = {key for state in optimizer.state.values() for key in state}
    if by_class is _RADAM:
        rule = _RADAM
    else:
        rule = next(
            (r for names, r in _BY_STATE_KEY if any(n in state_keys for n in names)), by_class
        )
    if rule is _ADAM and any(g.get("amsgrad") for g in optimizer.param_groups):
        rule = _ADAM_AMSGRAD
    if rule is _RMSPROP and any(g.get("centered") for g in optimizer.param_groups):
        rule = _RMSPROP_CENTERED
    if rule is None or not all(
        k in group for group in optimizer.param_groups for k in rule.group_keys
    ):
        return None
    return rule


def has_second_moment(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`preconditioner_audit` recognises the optimizer's second moment.

    Known ``torch.optim`` classes are recognised before their first step; other
    optimizers only once their state holds one of the recognised keys.
    """
    return _rule_of(_unwrap(optimizer)) is not None


def _unwrap(optimizer):
    # Lightning's LightningOptimizer wraps the user's optimizer in a subclass named
    # "Lightning{name}" of both classes; recognised here without importing Lightning
    wrapped = any(c.__name__ == "LightningOptimizer" for c in type(optimizer).__mro__)
    if wrapped and isinstance(getattr(optimizer, "_optimizer", None), torch.optim.Optimizer):
        return optimizer._optimizer
    return optimizer


def _radam_rho(group, step: float) -> float:
    beta2 = _float(group["betas"][1])
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    return rho_inf - 2.0 * step * beta2**step / (1.0 - beta2**step)


def preconditioner_audit(
    optimizer: torch.optim.Optimizer,
    parameters: Mapping[str, nn.Parameter],
    measurement: Measurement,
) -> PreconditionerAudit | None:
    """Compare an adaptive optimizer's diagonal preconditioner with √diag F and √diag EF.

    Reads the denominator d the optimizer divides its step by (the table in the module
    docstring says which for each optimizer; read after ``optimizer.step()`` it is the
    one that step used) and returns, per measured layer b and for ``all`` (the layers'
    vectors concatenated)::

        optimizer/preconditioner_fisher_cosine/{b} = cos(d_b, √diag F_b)
        optimizer/preconditioner_ef_cosine/{b}     = cos(d_b, √diag EF_b)

    with diag F and diag EF from ``measurement.diagonals``, and per layer the histogram
    values log10(d_b / √diag F_b) over the entries where both are positive and finite.
    The optimizer's state, its parameters and the measurement are only read.

    Args:
        optimizer: The optimizer (a Lightning ``LightningOptimizer`` is unwrapped).
        parameters: Per qualified parameter name (as in ``LayerInfo.parameter_names``),
            the parameter object the optimizer holds.
        measurement: The measurement (at the parameters the optimizer's state belongs to).

    Returns:
        ``None`` when the optimizer keeps no recognised second moment (SGD, LBFGS, …).
        Otherwise the audit; its ``scalars`` are empty and its ``notes`` say why when no
        measured parameter has state yet (before the first step). Parameters absent from
        the optimizer's param groups, or without state, are left out with a note.

    Raises:
        ValueError: When ``parameters`` lacks a parameter of a measured layer.
    """
    optimizer = _unwrap(optimizer)
    rule = _rule_of(optimizer)
    if rule is None:
        return None
    name = type(optimizer).__name__
    layers = [layer for layer in measurement.layers if layer.name in measurement.diagonals]
    missing = [n for layer in layers for n in layer.parameter_names if n not in parameters]
    if missing:
        raise ValueError(
            f"parameters has no entry for the measured parameters {missing!r}. Map every "
            "qualified parameter name of the measured layers to the parameter object the "
            "optimizer holds, e.g. dict(model.named_parameters())."
        )
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}

    skipped = _Skipped()
    audit = PreconditionerAudit(name, {}, {}, denominator=rule.denominator)
    totals = [0.0] * 5
    for layer in layers:
        found = _layer_denominator(optimizer, rule, groups, parameters, layer, skipped)
        if found is None:
            continue
        denominator, index = found
        fisher, empirical = measurement.diagonals[layer.name]
        values = _audit_layer(audit, layer.name, denominator, fisher, empirical, index)
        totals = [a + b for a, b in zip(totals, values, strict=True)]
    if audit.scalars:
        _put_preconditioner(audit.scalars, keys.ALL, totals)
    audit.notes += _skipped_notes(name, skipped, audited=bool(audit.scalars))
    return audit


@dataclass
class _Skipped:
    """What :func:`preconditioner_audit` left out, for its notes."""

    not_in_optimizer: list[str] = field(default_factory=list)
    without_state: list[str] = field(default_factory=list)
    radam_warmup: set[float] = field(default_factory=set)


def _layer_denominator(
    optimizer: torch.optim.Optimizer,
    rule: _Rule,
    groups: Mapping[int, Mapping],
    parameters: Mapping[str, nn.Parameter],
    layer: LayerInfo,
    skipped: _Skipped,
) -> tuple[Tensor, Tensor] | None:
    """The denominator d of one layer over its audited coordinates.

    A parameter outside the optimizer's param groups, or without state, is left out and
    recorded in ``skipped``, as is the step of a RAdam update that used no second moment
    (ρ_t ≤ 5).

    Returns:
        ``(d, index)``: d (float64, CPU) of the audited parameters, concatenated in
        ``named_parameters`` order, and their coordinates in the layer's flat vector; or
        ``None`` when no parameter of the layer is audited.
    """
    kept, pieces, offset = [], [], 0
    for parameter_name, shape in zip(layer.parameter_names, layer.shapes, strict=True):
        size = math.prod(shape)
        coordinates = slice(offset, offset + size)
        offset += size
        parameter = parameters[parameter_name]
        group = groups.get(id(parameter))
        if group is None:
            skipped.not_in_optimizer.append(parameter_name)
            continue
        state = optimizer.state.get(parameter, {})
        denominator = rule.compute(state, group, parameter) if state else None
        if denominator is None:
            skipped.without_state.append(parameter_name)
            continue
        if rule is _RADAM and _radam_rho(group, _step(state)) <= 5.0:
            skipped.radam_warmup.add(_step(state))
        kept.append(coordinates)
        pieces.append(denominator.detach().reshape(-1).cpu())
    if not pieces:
        return None
    return torch.cat(pieces), torch.cat([torch.arange(s.start, s.stop) for s in kept])


def _audit_layer(
    audit: PreconditionerAudit,
    layer: str,
    denominator: Tensor,
    fisher: Tensor,
    empirical: Tensor,
    index: Tensor,
) -> list[float]:
    """Record one layer's cosines, log-ratios and denominator in ``audit``.

    With d the denominator and √F, √EF the roots of the diagonals (negative rounding
    clamped to 0) on the same coordinates (``index``), the cosines of :func:`preconditioner_audit`
    are made of ``⟨d, d⟩, ⟨d, √F⟩, ⟨√F, √F⟩, ⟨d, √EF⟩, ⟨√EF, √EF⟩`` (float64); the
    histogram values are log10(d / √F) where finite.

    Returns:
        Those five sums, which add up over layers to the ``all`` cosines.
    """
    fisher_root = fisher.double().cpu()[index].clamp(min=0).sqrt()
    empirical_root = empirical.double().cpu()[index].clamp(min=0).sqrt()
    values = torch.stack(
        [
            denominator @ denominator,
            denominator @ fisher_root,
            fisher_root @ fisher_root,
            denominator @ empirical_root,
            empirical_root @ empirical_root,
        ]
    ).tolist()
    _put_preconditioner(audit.scalars, layer, values)
    ratio = (torch.log10(denominator) - torch.log10(fisher_root)).float()
    audit.log_ratios[layer] = ratio[torch.isfinite(ratio)]
    audit.denominators[layer] = denominator
    return values


def _skipped_notes(name: str, skipped: _Skipped, audited: bool) -> list[str]:
    """The notes of :func:`preconditioner_audit` on what it left out and why."""
    notes = []
    if skipped.not_in_optimizer:
        notes.append(
            f"Parameters not in {name}'s param groups were left out of the preconditioner "
            f"audit: {skipped.not_in_optimizer!r}."
        )
    if skipped.without_state and not audited:
        notes.append(
            f"{name} has no state yet for the measured parameters (before its first step, "
            "or they received no gradient): no preconditioner to audit."
        )
    elif skipped.without_state:
        notes.append(
            f"Parameters without {name} state (no gradient yet) were left out of the "
            f"preconditioner audit: {skipped.without_state!r}."
        )
    if skipped.radam_warmup:
        notes.append(
            f"RAdam step {int(max(skipped.radam_warmup))} used no second moment (ρ_t ≤ 5, a "
            "momentum-SGD step): the audited denominator is the one later steps will use."
        )
    return notes


def _put_preconditioner(scalars: dict[str, float], layer: str, values: Sequence[float]) -> None:
    denominator_sq, with_fisher, fisher_sq, with_empirical, empirical_sq = values
    scalars[keys.optimizer_key("preconditioner_fisher_cosine", layer)] = _cosine(
        with_fisher, denominator_sq, fisher_sq
    )
    scalars[keys.optimizer_key("preconditioner_ef_cosine", layer)] = _cosine(
        with_empirical, denominator_sq, empirical_sq
    )

"""The preconditioner audit: the diagonal curvature an adaptive optimizer implies.

An adaptive optimizer divides
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
from fisher_monitor.audit.step import cosine_from_sums
from fisher_monitor.layers import LayerInfo
from fisher_monitor.measurement import Measurement


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
    scalars[keys.optimizer_key("preconditioner_fisher_cosine", layer)] = cosine_from_sums(
        with_fisher, denominator_sq, fisher_sq
    )
    scalars[keys.optimizer_key("preconditioner_ef_cosine", layer)] = cosine_from_sums(
        with_empirical, denominator_sq, empirical_sq
    )


__all__ = [
    "PreconditionerAudit",
    "has_second_moment",
    "minibatch_second_moment",
    "preconditioner_audit",
]

"""The step audit: the update the optimizer applied against F and the EF.

Let Δθ = θ_after − θ_before be the update one
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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fisher_monitor import keys
from fisher_monitor.layers import LayerInfo
from fisher_monitor.measurement import Measurement


def _dampings(settings: Mapping) -> list[float]:
    damping = settings.get("damping", 1e-3)
    if isinstance(damping, (list, tuple)):
        return [float(value) for value in damping]
    return [float(damping)]


def cosine_from_sums(inner: float, norm_sq_a: float, norm_sq_b: float) -> float:
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
    result[keys.metric_key(structure, "update_nat_cosine", layer, suffix)] = cosine_from_sums(
        -delta_nat, delta_sq, nat_sq
    )
    result[keys.metric_key(structure, "update_ef_cosine", layer, suffix)] = cosine_from_sums(
        -delta_ef, delta_sq, ef_sq
    )
    result[keys.metric_key(structure, "update_grad_cosine", layer)] = cosine_from_sums(
        -delta_grad, delta_sq, grad_sq
    )


__all__ = ["cosine_from_sums", "update_cosines"]

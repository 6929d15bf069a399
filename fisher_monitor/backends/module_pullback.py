"""Per-sample pull-backs through one module (or the whole network) with ``torch.func``.

For a module called on a batch with arguments ``a`` and loss-side columns ``c_{r,n}`` at
its outputs, the pull-back of its own parameters ``θ`` is ``J_θ(a_n)ᵀ c_{r,n}`` per sample
``n`` and column ``r``: ``vmap`` over the samples of a ``vjp`` of the module's function of
``θ`` (its other parameters and buffers fixed), ``vmap`` again over the columns. This is
the rule for any parametrised module without a structured one (normalisations, attention
modules, custom layers), and, with the whole network as the module, for parameters used
outside any module call (a class token, a weight used through ``F.linear``).

Arguments whose first dimension is not the batch (a ``(1, T)`` position index, flags) are
the same for every sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten

from fisher_monitor.batching import ModelInputs, is_batched

#: ``select(raw_output) -> tensors``: the module outputs the columns belong to.
OutputSelection = Callable[[object], list[Tensor]]


def flat_tensors(output: object) -> list[Tensor]:
    """Every tensor of a (nested) module output, in ``tree_flatten`` order."""
    leaves, _ = tree_flatten(output)
    return [leaf for leaf in leaves if isinstance(leaf, Tensor)]


def parameter_pullbacks(
    module: nn.Module,
    arguments: ModelInputs,
    trainable: dict[str, Tensor],
    columns: list[Tensor],
    batch: int,
    select: OutputSelection,
) -> dict[str, Tensor]:
    """``J_θ(n)ᵀ c_{r,n}`` per trainable parameter: ``(R, N, *shape)`` each.

    Args:
        module: The module (hook-free while this runs: the caller disables its captures).
        arguments: The module's arguments for the whole batch (detached).
        trainable: The parameters to differentiate, by their name in ``module``.
        columns: Per selected output, the columns ``(R, N, *output[1:])``.
        batch: ``N``.
        select: The selected outputs of the module's raw output, matching ``columns``.

    Returns:
        The pull-backs, by parameter name.
    """
    fixed = {
        name: value.detach()
        for name, value in [*module.named_parameters(), *module.named_buffers()]
        if name not in trainable
    }
    static = {k: v for k, v in arguments.kwargs.items() if not is_batched(v, batch)}
    batched_args = tuple(a if is_batched(a, batch) else None for a in arguments.args)
    batched = (
        tuple(a for a in batched_args if a is not None),
        {k: v for k, v in arguments.kwargs.items() if k not in static},
    )
    positions = [i for i, a in enumerate(batched_args) if a is not None]

    def one(sample, sample_columns):
        def outputs_of(params):
            args = list(arguments.args)
            for index, value in zip(positions, sample[0], strict=True):
                args[index] = value.unsqueeze(0)
            keywords = {**static, **{k: v.unsqueeze(0) for k, v in sample[1].items()}}
            raw = functional_call(module, {**params, **fixed}, tuple(args), keywords)
            return tuple(t.squeeze(0) for t in select(raw))

        _, pullback = vjp(outputs_of, trainable)
        return vmap(lambda column: pullback(tuple(column))[0])(sample_columns)

    sample_columns = tuple(c.transpose(0, 1) for c in columns)  # (N, R, …) each
    with torch.enable_grad():
        try:
            found = vmap(one, randomness="same")(batched, sample_columns)
        except RuntimeError as error:  # data-dependent control flow and the like
            if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error):
                raise
            found = _one_at_a_time(one, batched, sample_columns, batch)
    return {name: value.transpose(0, 1).detach() for name, value in found.items()}


def _one_at_a_time(one, batched, sample_columns, batch: int) -> dict[str, Tensor]:
    results = [
        one(
            (tuple(a[n] for a in batched[0]), {k: v[n] for k, v in batched[1].items()}),
            tuple(c[n] for c in sample_columns),
        )
        for n in range(batch)
    ]
    return {name: torch.stack([r[name] for r in results]) for name in results[0]}


__all__ = ["OutputSelection", "flat_tensors", "parameter_pullbacks"]

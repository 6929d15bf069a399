"""The ``torch.func`` backend: the same per-layer factors for networks BackPACK cannot handle.

Per sample n, with ``J_n`` the Jacobian of the network output ``f_n`` with respect to the
trainable parameters (never formed), one vector-Jacobian product per loss-side column
(:mod:`fisher_monitor.likelihoods`, float64 closed forms cast to the network's type) gives
the Fisher's square-root columns ``J_nᵀ S_n`` (exact) or ``J_nᵀ ∇_f ℓ(f_n, ŷ_m)/√M``
(Monte-Carlo, with the observed residual as one more column); the per-sample gradients
follow as for the BackPACK backend (:class:`~fisher_monitor.factors.ColumnSplit`).
The loss side is computed inside the transform from the very output it differentiates, so
dropout masks and the loss side always agree.

``vmap`` runs this over samples, in chunks so that memory stays bounded, and over columns.
Any module ``torch.func`` can differentiate works: attention, LayerNorm, GELU, residual
connections, functional calls, parametrizations, scalar parameters. Each layer then gets
:class:`~fisher_monitor.factors.MaterializedFactors`, so all metrics except the
Kronecker structure (which needs layer inputs) are computed exactly as for BackPACK.
"""

from __future__ import annotations

import textwrap
import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from fisher_monitor.backends.base import Backend, LayerCallback
from fisher_monitor.backends.pass_context import (
    OutputAdapter,
    PassResult,
    call_network,
    check_loss,
    check_outputs,
    forked_rng,
    full_precision,
    select_logits,
)
from fisher_monitor.batching import ModelInputs, is_batched, map_tensors, model_inputs
from fisher_monitor.factors import ColumnSplit, MaterializedFactors, PassSize
from fisher_monitor.likelihoods import LOSS_SIDE_DTYPE, Likelihood, loss_side
from fisher_monitor.likelihoods.base import SATURATED_NOTE, coefficients_are_finite

#: Samples per vmap chunk by default; the memory guard may choose fewer.
DEFAULT_CHUNK = 16
#: Saved activations per layer output inside one ``vmap`` chunk.
ACTIVATION_COPIES = 3


class FunctorchNetwork(Backend):
    """A shadow copy measured with ``torch.func`` (no hooks, no BackPACK).

    Args:
        model: The caller's network (left untouched).
        likelihood: The likelihood of the loss.
        chunk_size: Samples per ``vmap`` chunk (bounds the memory of one chunk);
            ``None`` for :data:`DEFAULT_CHUNK`.
    """

    backend = "functorch"

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood,
        outputs: OutputAdapter | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__(model, likelihood, outputs)
        self.network = self.copy_root
        self.loss_module = likelihood.make_module()
        self.chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
        self._loop_reason: str | None = None

    def run(  # noqa: D102 - see Backend.run
        self,
        inputs,
        targets: Tensor,
        exact: bool,
        mc_samples: int,
        seed: int,
        on_layer: LayerCallback,
        dtype: torch.dtype = torch.float64,
        likelihood: Likelihood | None = None,
    ) -> PassResult:
        likelihood = self.likelihood if likelihood is None else likelihood
        inputs = model_inputs(inputs)
        batch_size = targets.shape[0]
        notes: list[str] = []
        with forked_rng(self.device, seed), full_precision(self.device, notes):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # vmap's notes on in-place and randomness
                with torch.no_grad():
                    outputs = call_network(self.network, inputs, self.outputs)
                    likelihood.check_batch(outputs, targets)
                    loss = self.loss_module(outputs, targets)
                check_loss(loss)
                noise = None if exact else likelihood.draw_noise(outputs, mc_samples)
                observed = not exact or not coefficients_are_finite(likelihood, outputs, targets)
                if exact and observed:
                    notes.append(SATURATED_NOTE)
                per_parameter, coefficients, fisher_columns = self._pullbacks(
                    likelihood, inputs, targets, exact, noise, observed
                )
        if self._loop_reason is not None:
            notes.append(self._loop_reason)
        split = ColumnSplit(fisher_columns, coefficients)
        measured = []
        for info, _ in reversed(self.layers):  # output layer first, as BackPACK delivers
            # (N, R, D_b): every parameter flattened, 0-d ones included
            flat = torch.cat(
                [
                    per_parameter[name].reshape(batch_size, per_parameter[name].shape[1], -1)
                    for name in info.parameter_names
                ],
                dim=2,
            ).transpose(0, 1)  # (R, N, D_b), the columns carry 1/√N
            if not flat.any():
                continue  # no gradient reaches this layer
            measured.append(info.name)
            sqrt = split.fisher(flat).reshape(-1, flat.shape[2])
            factors = MaterializedFactors(split.per_sample(flat), sqrt, dtype)
            factors.coefficients = coefficients
            on_layer(info, factors)
            del flat, sqrt
        methods = dict.fromkeys(measured, "pull-backs through the whole network (torch.func)")
        return PassResult(float(loss), batch_size, measured, notes, methods)

    def pass_bytes(
        self, size: PassSize, activations: int, largest_activation: int, dimension: int
    ) -> int:
        """Every layer's pull-backs (and their concatenation) and ``vmap`` over a chunk."""
        n, rn, s = size.samples, size.pass_columns, size.itemsize
        pullbacks = 2 * n * rn * dimension * s
        return pullbacks + ACTIVATION_COPIES * min(n, self.chunk_size) * (rn + 1) * activations * s

    def _pullbacks(
        self,
        likelihood: Likelihood,
        inputs: ModelInputs,
        targets: Tensor,
        exact: bool,
        noise: Tensor | None,
        observed: bool,
    ):
        """Vector-Jacobian products of every loss-side column, per trainable parameter.

        Returns:
            Per parameter name ``(N, R, *shape)`` (columns divided by ``√N``), the
            coefficients ``β`` (exact Fisher) and the number of Fisher columns.
        """
        network = self.network
        batch_size = targets.shape[0]
        trainable = {n: p.detach() for n, p in network.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in network.named_parameters() if not p.requires_grad}
        buffers = dict(network.named_buffers())
        select = self.outputs or select_logits
        # keyword arguments without the batch dimension (masks of shape (1, T), flags, None)
        # are the same for every sample
        static = {k: v for k, v in inputs.kwargs.items() if not is_batched(v, batch_size)}
        args = (inputs.args, {k: v for k, v in inputs.kwargs.items() if k not in static})

        def one_sample(params, sample_args, target, sample_noise):
            def output_of(p):
                positional = tuple(a.unsqueeze(0) for a in sample_args[0])
                keywords = {**static, **{k: v.unsqueeze(0) for k, v in sample_args[1].items()}}
                raw = functional_call(network, ({**p, **frozen}, buffers), positional, keywords)
                selected = select(raw)
                check_outputs(selected, raw)
                return selected

            output, pullback = vjp(output_of, params)
            side = loss_side(
                likelihood,
                output,
                target.unsqueeze(0),
                exact,
                None if noise is None else sample_noise.unsqueeze(0),
                observed=observed if exact else None,
            )
            columns = side.columns[0].T.reshape(-1, *output.shape) / batch_size**0.5
            pulled = vmap(lambda c: pullback(c)[0])(columns.to(output.dtype))
            beta = side.coefficients[0] if side.coefficients is not None else columns.new_zeros(0)
            return pulled, beta

        chunks, betas = [], []
        for start in range(0, batch_size, self.chunk_size):
            stop = min(start + self.chunk_size, batch_size)
            chunk_args = map_tensors(args, lambda t, start=start, stop=stop: t[start:stop])
            chunk_noise = (
                noise[start:stop]
                if noise is not None
                else torch.zeros(stop - start, device=targets.device)
            )
            pulled, beta = self._chunk(
                one_sample, trainable, chunk_args, targets[start:stop], chunk_noise
            )
            chunks.append({n: t.detach() for n, t in pulled.items()})
            betas.append(beta.to(LOSS_SIDE_DTYPE))
        per_parameter = {n: torch.cat([c[n] for c in chunks]) for n in trainable}
        first = next(iter(per_parameter.values()))
        columns = first.shape[1]
        if not observed:
            return per_parameter, torch.cat(betas), columns
        return per_parameter, None, columns - 1

    def _chunk(self, one_sample, trainable, chunk_args, chunk_targets, chunk_noise):
        if self._loop_reason is None:
            try:
                return vmap(one_sample, in_dims=(None, 0, 0, 0), randomness="different")(
                    trainable, chunk_args, chunk_targets, chunk_noise
                )
            except RuntimeError as error:  # data-dependent control flow and the like
                if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error):
                    raise  # the caller retries on fewer samples
                first = textwrap.shorten(str(error).splitlines()[0], 100, placeholder=" …")
                self._loop_reason = (
                    "torch.func measured the probe samples one at a time: it could not batch "
                    f"the forward pass over samples ({first}). The numbers are the same, but "
                    "each measurement costs about one forward and backward pass per probe "
                    "sample. To make it faster, pass probe_size=16, or write forward so that "
                    "it works on one sample as on a batch (no shape-dependent Python "
                    "branches, no .item(), no in-place writes into tensors made inside "
                    "forward); see docs/guide/models.md#fallback"
                )
        results = [
            one_sample(
                trainable,
                map_tensors(chunk_args, lambda t, i=i: t[i]),
                chunk_targets[i],
                chunk_noise[i],
            )
            for i in range(chunk_targets.shape[0])
        ]
        pulled = {n: torch.stack([r[0][n] for r in results]) for n in results[0][0]}
        return pulled, torch.stack([r[1] for r in results])


__all__ = ["DEFAULT_CHUNK", "FunctorchNetwork"]

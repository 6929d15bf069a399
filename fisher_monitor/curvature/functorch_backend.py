"""The ``torch.func`` backend: the same per-layer factors for networks BackPACK cannot handle.

Per sample n, with ``J_n`` the Jacobian of the network output ``f_n`` with respect to the
trainable parameters (never formed), one vector-Jacobian product per column gives

- the per-sample gradient ``g_n = J_nᵀ ∇_f ℓ(f_n, y_n)`` at the observed label, and
- the Fisher's square-root columns ``J_nᵀ S_n`` with ``S_n S_nᵀ = ∇²_f ℓ_n`` (exact, see
  :meth:`LossSpec.sqrt_hessian`), or ``J_nᵀ ∇_f ℓ(f_n, ŷ_m)/√M`` for labels ``ŷ_m`` drawn
  from the model (Monte-Carlo).

``vmap`` runs this over samples, in chunks so that memory stays bounded, and over columns.
Any module ``torch.func`` can differentiate works: LayerNorm, attention, GELU, residual
connections, functional calls. Each layer then gets :class:`MaterializedFactors`, so all
metrics except the Kronecker structure (which needs layer inputs) are computed exactly as
for the BackPACK backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from fisher_monitor.curvature.factors import LayerFactors, MaterializedFactors
from fisher_monitor.curvature.losses import LossSpec
from fisher_monitor.curvature.network import (
    LayerInfo,
    PassResult,
    ShadowNetwork,
    check_outputs,
    forked_rng,
    full_precision,
    lazy,
)

#: Samples per vmap chunk by default; the memory guard may choose fewer.
DEFAULT_CHUNK = 16


class FunctorchNetwork(ShadowNetwork):
    """A shadow copy measured with ``torch.func`` (no hooks, no BackPACK).

    Args:
        model: The caller's network (left untouched).
        loss: Validated loss specification.
        chunk_size: Samples per ``vmap`` chunk (bounds the memory of one chunk).
    """

    backend = "functorch"

    def __init__(self, model: nn.Module, loss: LossSpec, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(model, loss)
        self.network = self._copy_root
        self.loss_module = loss.make_module()
        self.chunk_size = chunk_size
        self._loop_over_samples = False

    def run(
        self,
        inputs,
        targets: Tensor,
        exact: bool,
        mc_samples: int,
        seed: int,
        on_layer: Callable[[LayerInfo, LayerFactors], None],
        dtype: torch.dtype = torch.float64,
    ) -> PassResult:
        """Compute every layer's factors and hand them to ``on_layer`` (see PreparedNetwork.run)."""
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        batch_size = targets.shape[0]
        network, spec = self.network, self.loss
        trainable = {n: p.detach() for n, p in network.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in network.named_parameters() if not p.requires_grad}
        buffers = {n: b for n, b in network.named_buffers()}
        with forked_rng(self.device, seed), full_precision(self), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's notes on in-place and randomness
            with torch.no_grad():
                outputs = network(*args)
                check_outputs(outputs)
                spec.check_batch(outputs, targets)
                loss = self.loss_module(outputs, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"The probe loss is {loss.item()!r}; skipping the measurement."
                )
            noise = None if exact else spec.draw_noise(outputs, mc_samples)
            coefficients = lazy(spec.sqrt_coefficients, outputs, targets) if exact else None

            def one_sample(params, sample_args, target, sample_noise):
                def output_of(p):
                    batched = tuple(a.unsqueeze(0) for a in sample_args)
                    out = functional_call(network, ({**p, **frozen}, buffers), batched)
                    return out.squeeze(0)

                output, pullback = vjp(output_of, params)
                columns = [spec.observed_gradient(output, target).reshape(-1, 1)]
                if exact:
                    columns.append(spec.sqrt_hessian(output))
                else:
                    columns.append(spec.sampled_gradients(output, sample_noise))
                cotangents = torch.cat(columns, dim=1).T.reshape(-1, *output.shape)
                return vmap(lambda c: pullback(c)[0])(cotangents)

            chunks = []
            for start in range(0, batch_size, self.chunk_size):
                stop = min(start + self.chunk_size, batch_size)
                chunk_args = tuple(a[start:stop] for a in args)
                chunk_targets = targets[start:stop]
                chunk_noise = (
                    noise[start:stop]
                    if noise is not None
                    else torch.zeros(stop - start, device=targets.device)
                )
                if not self._loop_over_samples:
                    try:
                        result = vmap(one_sample, in_dims=(None, 0, 0, 0), randomness="different")(
                            trainable, chunk_args, chunk_targets, chunk_noise
                        )
                    except RuntimeError as error:  # data-dependent control flow and the like
                        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(
                            error
                        ):
                            raise  # the caller retries on fewer samples
                        self._loop_over_samples = True
                        self.notes.append(
                            "torch.func could not vectorise the forward pass over samples "
                            f"({str(error).splitlines()[0][:120]}); samples are processed one "
                            "at a time"
                        )
                if self._loop_over_samples:
                    per_sample = [
                        one_sample(
                            trainable,
                            tuple(a[i] for a in chunk_args),
                            chunk_targets[i],
                            chunk_noise[i],
                        )
                        for i in range(stop - start)
                    ]
                    result = {n: torch.stack([r[n] for r in per_sample]) for n in per_sample[0]}
                chunks.append({n: t.detach() for n, t in result.items()})
        measured = []
        scale_v = batch_size**-0.5  # F = (1/N) Σ_n V_n V_nᵀ
        for info, _ in reversed(self.layers):  # output layer first, as BackPACK delivers
            per_layer = [torch.cat([c[name] for c in chunks]) for name in info.parameter_names]
            flat = torch.cat([t.flatten(start_dim=2) for t in per_layer], dim=2)  # (N, 1 + R, D)
            per_sample = flat[:, 0]
            sqrt = flat[:, 1:].transpose(0, 1).reshape(-1, flat.shape[2]) * scale_v
            if not per_sample.any() and not sqrt.any():
                continue  # no gradient reaches this layer
            measured.append(info.name)
            factors = MaterializedFactors(per_sample, sqrt, dtype)
            factors.sqrt_coefficients = coefficients
            on_layer(info, factors)
            del per_layer, flat, per_sample, sqrt
        return PassResult(loss=float(loss), batch_size=batch_size, measured=measured)

"""What the cost and memory models know about a layer and a pass, before any work is done.

One sample's forward pass (:mod:`fisher_monitor.engine.profile`) records each layer's
:class:`LayerShape`; a measurement's :class:`PassSize` says how many samples and loss-side
columns the pass backpropagates. The factor representations
(:mod:`fisher_monitor.factors`) and the structures (:mod:`fisher_monitor.structures`)
answer their own work and memory from these two, so the models never branch on a
structure or a factor type.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bytes per number of the curvature arithmetic (float64).
CURVATURE_BYTES = 8


@dataclass(frozen=True)
class LayerShape:
    """One measured layer, per sample.

    Attributes:
        name: The layer's name.
        form: How the backend represents its factors: ``"outer"`` (``Linear`` on BackPACK,
            one position), ``"shared"`` (convolutions and sequence ``Linear`` layers on
            BackPACK) or ``"materialised"`` (any other layer, and every layer on
            ``torch.func``); see :data:`~fisher_monitor.backends.base.FACTOR_FORMS`.
        positions: ``T``, output positions sharing the weight (1 without a weight matrix).
        inputs: ``I = D/O``, input features with the bias column.
        outputs: ``O``, output features (``D`` for a layer without a weight matrix).
        dimension: ``D``, trainable parameters.
        elements: The layer's output elements for one sample.
        forward_flops: Floating-point operations of the layer's forward for one sample.
    """

    name: str
    form: str
    positions: int
    inputs: int
    outputs: int
    dimension: int
    elements: int
    forward_flops: float


@dataclass(frozen=True)
class PassSize:
    """The size of one measurement's pass.

    Attributes:
        samples: ``N``, probe samples.
        columns: Fisher columns per sample: ``R_n`` of the exact Fisher, ``M`` sampled
            labels, or the sketch's ``k``.
        exact: Whether the Fisher side is the exact factor, factorised as such (``False``
            for Monte-Carlo labels and sketches).
        dampings: Number of damping values.
        itemsize: Bytes per number of the network.
    """

    samples: int
    columns: int
    exact: bool
    dampings: int = 1
    itemsize: int = 4

    @property
    def pass_columns(self) -> int:
        """Loss-side columns per sample the pass backpropagates.

        The observed residual travels as one more column when the Fisher side is not the
        exact factor.
        """
        return self.columns if self.exact else self.columns + 1

    @property
    def rank(self) -> int:
        """``R = N·R_n``, the Fisher factor's columns."""
        return self.samples * self.columns

    def prefers_dense(self, shape: LayerShape) -> bool:
        """Whether ``D × D`` blocks are smaller than the Gram matrices (the dense route)."""
        return shape.dimension <= max(self.samples, self.rank)


__all__ = ["CURVATURE_BYTES", "LayerShape", "PassSize"]

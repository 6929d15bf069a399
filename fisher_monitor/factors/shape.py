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
class Rates:
    """What each kind of work costs, in *units*: operations of a float32 matrix product.

    The cost model (:mod:`fisher_monitor.engine.cost`) adds the work of a measurement in
    these units and divides by a plain training step's (three forward passes of matrix
    products, in the same units), so a rate says how many float32 matrix-product
    operations one operation of that kind costs on this machine class. Calibrated on the
    benchmarks' 2-core AMD EPYC machines with torch's MKL (``benchmarks/metrics_micro.py
    --calibrate`` measures them; ``make bench`` checks the model's estimate against the
    measured time of every case).

    Attributes:
        gemm64: A float64 matrix-product operation.
        cholesky32: One of the ``k³/3`` operations of a float32 Cholesky factorisation.
        cholesky64: The same in float64.
        inverse32: One of the ``2k³/3`` operations of a float32 triangular inverse.
        inverse64: The same in float64.
        eigh32: Per ``k³`` of a float32 symmetric eigendecomposition of order ``k``.
        eigh64: The same in float64.
        svd64: Per ``m·n²`` of a float64 singular value decomposition of an ``m × n`` matrix
            (``m ≥ n``).
        entry: One elementwise float64 operation on one entry (memory-bound passes).
        layer: Per layer and structure: the interpreter's share (small layers).
        measurement: Per measurement: planning, notes, metrics.
        step: Per training step besides its matrix products (the interpreter, the
            optimizer's update), and ``step_layer`` per layer.
        gemm32_rate: Float32 matrix-product operations per second on one thread; with
            ``t`` threads, ``t^0.85`` times that (to state costs in seconds).
    """

    gemm64: float = 1.9
    cholesky32: float = 1.75
    cholesky64: float = 4.8
    inverse32: float = 1.1
    inverse64: float = 2.0
    eigh32: float = 12.0
    eigh64: float = 25.0
    svd64: float = 40.0
    entry: float = 90.0
    layer: float = 2.5e7
    measurement: float = 2.5e8
    step: float = 1.5e7
    step_layer: float = 2e6
    gemm32_rate: float = 8.6e10


#: The rates of this machine class (see :class:`Rates`).
RATES = Rates()


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


__all__ = ["CURVATURE_BYTES", "RATES", "LayerShape", "PassSize", "Rates"]

"""The result of one measurement: metric values, diagonals, notes and coverage."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from fisher_monitor.curvature.layers import LayerInfo


@dataclass
class Measurement:
    """The result of one measurement.

    Attributes:
        scalars: Metric values under ``"{structure}/{metric}/{layer}"`` (docs/theory.md#keys),
            including ``"{structure}/{metric}/all"``, plus ``"probe/loss"``,
            ``"probe/batch_size"``, ``"probe/grad_norm"`` and ``"probe/seconds"``.
        layers: The measured layers in forward (``named_modules``) order.
        diagonals: Per layer name, ``(diag F, diag EF)`` as float64 CPU tensors in
            ``named_parameters`` order.
        settings: The settings used (plain data).
        notes: Things the user should know about this measurement (e.g. a BatchNorm
            layer measured in eval mode, a layer without Kronecker factors).
        coverage: Per layer: ``{"layer", "type", "parameters", "dimension", "backend",
            "measured", "reason"}`` — which parameters were measured, by which backend
            (``"backpack"`` or ``"functorch"``), and why a layer was not.
        blocks: With ``keep_blocks=True``: per layer name, the dense ``(F_b, EF_b, g_b)``
            (``D_b × D_b``, ``D_b × D_b``, ``D_b``) as float64 CPU tensors; else empty.
        gradient: Per layer name, the mean probe gradient ``g_b`` (``D_b``, float64, in
            ``named_parameters`` order, on the network's device).
        directions: With ``keep_directions=True``: per structure name, one dict per damping
            value (in the order of the settings' dampings) mapping each layer name to
            ``(A⁻¹g, B⁻¹g)`` with ``A = F_S + λI`` and ``B = EF_S + λI`` restricted to
            the layer (float64, ``D_b`` each, ``named_parameters`` order); else empty.
    """

    scalars: dict[str, float]
    layers: list[LayerInfo]
    diagonals: dict[str, tuple[Tensor, Tensor]]
    settings: dict
    notes: list[str] = field(default_factory=list)
    blocks: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    coverage: list[dict] = field(default_factory=list)
    gradient: dict[str, Tensor] = field(default_factory=dict)
    directions: dict[str, list[dict[str, tuple[Tensor, Tensor]]]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        """Return the scalar stored under ``key``.

        Raises:
            KeyError: With a hint listing similar keys.
        """
        try:
            return self.scalars[key]
        except KeyError:
            parts = key.split("/")
            similar = [k for k in self.scalars if parts and k.startswith(parts[0] + "/")][:8]
            raise KeyError(f"No scalar {key!r}. Similar keys: {similar}") from None

    def __contains__(self, key: object) -> bool:
        return key in self.scalars

    @property
    def layer_names(self) -> list[str]:
        """Names of the measured layers, forward order."""
        return [layer.name for layer in self.layers]

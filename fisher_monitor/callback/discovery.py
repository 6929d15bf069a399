"""Which network and which loss the monitor measures, found on the LightningModule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fisher_monitor.likelihoods import (
    SUPPORTED_LOSSES,
    Likelihood,
    UnsupportedLossError,
    resolve_loss,
)

NetworkArgument = str | Callable[[Any], nn.Module] | None


def find_network(pl_module: nn.Module, network: NetworkArgument) -> nn.Module:
    """The network to measure.

    Args:
        pl_module: The LightningModule.
        network: ``None`` for the module itself (or, when it defines no ``forward``, the one
            submodule holding all trainable parameters), an attribute name (dotted paths
            allowed), or a callable ``module -> nn.Module``.

    Returns:
        The network.

    Raises:
        ValueError: When nothing fitting is found; the message says what to pass.
    """
    if network is None:
        return _default_network(pl_module)
    if isinstance(network, str):
        target: Any = pl_module
        for part in network.split("."):
            if not hasattr(target, part):
                raise ValueError(
                    f"`FisherMonitor(network={network!r})`: "
                    f"{type(pl_module).__name__} has no attribute {part!r}."
                )
            target = getattr(target, part)
    else:
        target = network(pl_module)
    if not isinstance(target, nn.Module):
        raise ValueError(
            f"`FisherMonitor(network={network!r})` gave a {type(target).__name__}, "
            "not an nn.Module."
        )
    return target


def _default_network(pl_module: nn.Module) -> nn.Module:
    if overrides_forward(pl_module):
        return pl_module
    # no forward(): measure the one submodule that holds every trainable parameter
    trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
    holders = [
        child
        for _, child in pl_module.named_children()
        if trainable and {id(p) for p in child.parameters() if p.requires_grad} == trainable
    ]
    if len(holders) == 1:
        return holders[0]
    raise ValueError(
        f"`FisherMonitor` cannot measure {type(pl_module).__name__}: it defines no "
        "forward() and no single submodule holds all its trainable parameters. Pass "
        "`network='<attribute>'` or `network=lambda module: ...`."
    )


def find_loss(pl_module: nn.Module, loss_fn: nn.Module | str | None) -> Likelihood:
    """The negative log-likelihood to measure.

    Args:
        pl_module: The LightningModule.
        loss_fn: A supported loss module or name, or ``None`` to find the one attribute of
            ``pl_module`` holding a supported loss module.

    Returns:
        The validated loss.

    Raises:
        ValueError: When no loss, several, or an unsupported one is found.
    """
    if loss_fn is not None:
        return resolve_loss(loss_fn)
    candidates = {**vars(pl_module), **dict(pl_module.named_children())}
    found = {
        name: value
        for name, value in candidates.items()
        if isinstance(value, nn.Module) and type(value).__name__ in SUPPORTED_LOSSES
    }
    owner = type(pl_module).__name__
    if len(found) == 1:
        ((name, module),) = found.items()
        try:
            return resolve_loss(module)
        except UnsupportedLossError as error:
            raise ValueError(
                f"`FisherMonitor` found the loss `{name}` on {owner} but cannot use it: {error}"
            ) from None
    if len(found) > 1:
        raise ValueError(
            f"`FisherMonitor` found several losses on {owner} ({sorted(found)}). Pass the "
            "negative log-likelihood to monitor as `loss_fn=`."
        )
    raise ValueError(
        f"`FisherMonitor` found no loss module on {owner}: it looks for an attribute holding "
        "a CrossEntropyLoss, MSELoss or BCEWithLogitsLoss. Pass "
        "`loss_fn=nn.CrossEntropyLoss()` (or 'cross_entropy', 'mse', 'bce_with_logits')."
    )


def overrides_forward(module: nn.Module) -> bool:
    """Whether a LightningModule subclass defines its own ``forward``."""
    base_forwards = set()
    for namespace in ("pytorch_lightning", "lightning.pytorch"):
        try:
            base = __import__(namespace, fromlist=["LightningModule"]).LightningModule
        except ImportError:  # pragma: no cover - either namespace may be missing
            continue
        base_forwards.add(base.forward)
    return type(module).forward not in base_forwards


def network_name(pl_module: nn.Module, network: nn.Module) -> str:
    """A readable name, e.g. ``"TinyClassifier.net (Sequential)"`` or ``"TinyClassifier"``."""
    owner = type(pl_module).__name__
    if network is pl_module:
        return owner
    path = next((name for name, m in pl_module.named_modules() if m is network and name), None)
    kind = type(network).__name__
    return f"{owner}.{path} ({kind})" if path else kind

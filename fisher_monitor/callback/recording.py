"""Recording one training step: which loss ``training_step`` computes, on what, from what.

The monitor watches the first training step it would measure, without changing it:

- a ``TorchFunctionMode`` sees every call of a ``torch.nn.functional`` loss (also when a
  loss module such as ``nn.CrossEntropyLoss`` or a library's code calls it), with its
  input, its target and its options, and whether the network was running at the time;
  it follows a ``reduction="none"`` loss to the ``mean()`` or ``sum()`` that reduces it,
  and remembers which batch entry each tensor derived from the batch by indexing,
  reshaping or casting came from;
- forward hooks on the candidate networks see their arguments and their outputs.

Every call goes through to PyTorch unchanged, so the step computes exactly what it would
without the monitor; the hooks and the mode are removed when the recording stops (before
the step's backward pass, or at the end of the step), and the recorded tensors are dropped
once the recipe is derived from them (:mod:`fisher_monitor.callback.recipe`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

#: The functional losses the recipe can use, by their names.
SUPPORTED_FUNCTIONS = (
    "cross_entropy",
    "nll_loss",
    "mse_loss",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy",
)
#: Other losses of ``torch.nn.functional``, recorded to name them when they are the loss.
OTHER_FUNCTIONS = (
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "kl_div",
    "poisson_nll_loss",
    "gaussian_nll_loss",
    "soft_margin_loss",
    "multilabel_soft_margin_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "margin_ranking_loss",
    "hinge_embedding_loss",
    "cosine_embedding_loss",
    "triplet_margin_loss",
    "ctc_loss",
)
_LOSSES = {getattr(F, name): name for name in SUPPORTED_FUNCTIONS + OTHER_FUNCTIONS}
#: Operations that keep a tensor "the same data": their result derives from their input.
_DERIVING = frozenset(
    "__getitem__ reshape view view_as reshape_as flatten unflatten squeeze unsqueeze "
    "contiguous clone detach to type type_as long int float double half bfloat16 bool "
    "cuda cpu pad narrow select".split()
)
#: Operations that only look at a tensor (never decide how an unreduced loss is reduced).
_LOOKING = frozenset("__get__ size dim numel detach __len__ __format__ __repr__".split())

Step = tuple[str, Any]  # ("key", name), ("index", i) or ("attr", name)
Path = tuple[Step, ...]


@dataclass
class NetworkCall:
    """One call of a watched module during the step.

    Attributes:
        index: Order in which the calls started.
        name: The module's qualified name in the LightningModule (``""``: itself).
        module: The module.
        args: Positional arguments as the caller passed them.
        kwargs: Keyword arguments as the caller passed them.
        output: What ``forward`` returned (``None`` until it returned).
        done: Whether it returned.
    """

    index: int
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    output: Any = None
    done: bool = False


@dataclass
class LossCall:
    """One call of a ``torch.nn.functional`` loss during the step.

    Attributes:
        function: Its name, e.g. ``"cross_entropy"``.
        input: The loss's input (logits, log-probabilities, predictions).
        target: Its target.
        options: Its other keyword arguments (``reduction``, ``ignore_index``, …).
        inside: Indices of the watched network calls that were running.
        training: Whether gradients flow into it (a training loss, not a logged metric).
        reduced_by: For ``reduction="none"``: ``"mean"`` or ``"sum"`` when the next
            operation on the result reduced all of it, else that operation's name.
    """

    function: str
    input: Any
    target: Any
    options: dict[str, Any]
    inside: tuple[int, ...]
    training: bool
    reduced_by: str | None = None

    def text(self) -> str:
        """``F.cross_entropy(…, ignore_index=0)``: the options that differ from the defaults."""
        defaults = _defaults(self.function)
        shown = [
            f"{key}={'<tensor>' if isinstance(value, Tensor) else repr(value)}"
            for key, value in self.options.items()
            if key not in ("size_average", "reduce") and not _is_default(value, defaults, key)
        ]
        return f"F.{self.function}({', '.join(['…', *shown])})"


def _defaults(function: str) -> dict[str, Any]:
    parameters = inspect.signature(getattr(F, function)).parameters
    return {name: p.default for name, p in parameters.items()}


def _is_default(value: Any, defaults: dict[str, Any], key: str) -> bool:
    default = defaults.get(key, inspect.Parameter.empty)
    if isinstance(value, Tensor) or isinstance(default, Tensor):
        return value is default
    return value is None if default is None else value == default


@dataclass
class Recording:
    """What one training step did (see the module docstring).

    Attributes:
        batch: The training batch.
        step: ``trainer.global_step``.
        calls: The watched modules' calls, in the order they started.
        losses: The loss calls, in order.
        batch_paths: ``id(tensor) → path`` of every tensor of the batch.
        origins: ``id(tensor) → path`` of the batch entry a tensor was derived from.
        error: A failure of the recording itself (never raised into the step).
        buffers: ``(module, name, value)`` of every buffer when the step started (the
            forward pass updates some: BatchNorm statistics, spectral-norm vectors).
    """

    batch: Any
    step: int
    calls: list[NetworkCall] = field(default_factory=list)
    losses: list[LossCall] = field(default_factory=list)
    batch_paths: dict[int, Path] = field(default_factory=dict)
    origins: dict[int, Path] = field(default_factory=dict)
    error: str | None = None
    buffers: list[tuple[nn.Module, str, Tensor]] = field(default_factory=list, repr=False)
    #: Tensors whose ids are keys above, kept alive so that no id is reused.
    kept: list[Tensor] = field(default_factory=list, repr=False)


def walk_tensors(value: Any, path: Path = (), depth: int = 0) -> Iterator[tuple[Path, Tensor]]:
    """Every tensor with its path, three levels into mappings, tuples, lists, dataclasses."""
    if isinstance(value, Tensor):
        yield path, value
        return
    if depth >= 3:
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from walk_tensors(item, (*path, ("key", key)), depth + 1)
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from walk_tensors(item, (*path, ("index", index)), depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            attribute = getattr(value, item.name, None)
            yield from walk_tensors(attribute, (*path, ("attr", item.name)), depth + 1)


def fetch(value: Any, path: Path) -> Any:
    """The entry of ``value`` at ``path``."""
    for kind, name in path:
        value = getattr(value, name) if kind == "attr" else value[name]
    return value


def path_text(root: str, path: Path) -> str:
    """``batch["input_ids"]``, ``batch[0]``, ``output.logits``."""
    text = root
    for kind, name in path:
        text += f".{name}" if kind == "attr" else f"[{name!r}]"
    return text


class _Spy(TorchFunctionMode):
    """Sees every torch call of the step and hands it to the recorder, unchanged."""

    def __init__(self, recorder: StepRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        recording = self.recorder.recording
        if recording is not None and recording.error is None:
            try:
                self.recorder.observe(func, args, kwargs, result)
            except Exception as error:  # noqa: BLE001 - never break the user's step
                recording.error = f"{type(error).__name__}: {error}"
        return result


class StepRecorder:
    """Records one training step (see the module docstring); :meth:`stop` always cleans up."""

    def __init__(self) -> None:
        self.recording: Recording | None = None
        self._mode: _Spy | None = None
        self._handles: list[Any] = []
        self._open: list[int] = []
        self._unreduced: dict[int, LossCall] = {}

    @property
    def active(self) -> bool:
        """Whether a step is being recorded."""
        return self._mode is not None

    def start(
        self, modules: Mapping[str, nn.Module], batch: Any, step: int, owner: nn.Module
    ) -> None:
        """Start recording: hooks on ``modules`` (name → module) and the function mode.

        Args:
            modules: The candidate networks, by qualified name.
            batch: The step's batch.
            step: ``trainer.global_step``.
            owner: The module whose buffers are kept as they are now (the LightningModule).
        """
        self.stop()
        recording = Recording(batch, step)
        with torch.no_grad():
            recording.buffers = [
                (module, name, buffer.detach().clone())
                for module in owner.modules()
                for name, buffer in module._buffers.items()
                if buffer is not None
            ]
        for path, tensor in walk_tensors(batch):
            recording.batch_paths.setdefault(id(tensor), path)
            recording.origins.setdefault(id(tensor), path)
        self.recording, self._open, self._unreduced = recording, [], {}
        for name, module in modules.items():
            self._handles.append(
                module.register_forward_pre_hook(
                    self._pre_hook(name), with_kwargs=True, prepend=True
                )
            )
            self._handles.append(
                module.register_forward_hook(self._hook, with_kwargs=True, always_call=True)
            )
        self._mode = _Spy(self)
        self._mode.__enter__()

    def stop(self) -> Recording | None:
        """Stop recording and remove everything it added; the recording (``None``: none)."""
        mode, self._mode = self._mode, None
        if mode is not None:
            _exit_mode(mode)
        for handle in self._handles:
            handle.remove()
        self._handles, self._open, self._unreduced = [], [], {}
        recording, self.recording = self.recording, None
        return recording if mode is not None else None

    # ------------------------------------------------------------------ observation

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            recording = self.recording
            if recording is not None:
                call = NetworkCall(len(recording.calls), name, module, args, dict(kwargs))
                recording.calls.append(call)
                self._open.append(call.index)

        return hook

    def _hook(self, module, args, kwargs, output) -> None:
        recording = self.recording
        if recording is None or not self._open:
            return
        call = recording.calls[self._open.pop()]
        call.output, call.done = output, True

    def observe(self, func, args: tuple, kwargs: dict[str, Any], result: Any) -> None:
        """One torch call of the step, after it ran."""
        recording = self.recording
        assert recording is not None
        try:
            name = _LOSSES.get(func)
        except TypeError:  # an unhashable callable: not a loss function
            name = None
        if name is not None:
            self._loss(name, args, kwargs, result)
            return
        if self._unreduced and args and isinstance(args[0], Tensor):
            self._reduction(func, args, kwargs)
        if getattr(func, "__name__", None) in _DERIVING and isinstance(result, Tensor):
            first = next((a for a in args if isinstance(a, Tensor)), None)
            origin = recording.origins.get(id(first)) if first is not None else None
            if origin is not None and id(result) not in recording.origins:
                recording.origins[id(result)] = origin
                recording.kept.append(result)

    def _loss(self, name: str, args: tuple, kwargs: dict[str, Any], result: Any) -> None:
        recording = self.recording
        assert recording is not None
        values = list(args[:2]) + [None] * (2 - len(args[:2]))
        source, target = values
        options = {k: v for k, v in kwargs.items() if k not in ("input", "target")}
        source = kwargs.get("input", source)
        target = kwargs.get("target", target)
        training = isinstance(source, Tensor) and source.requires_grad and torch.is_grad_enabled()
        call = LossCall(name, source, target, options, tuple(self._open), training)
        recording.losses.append(call)
        if options.get("reduction") == "none" and isinstance(result, Tensor):
            self._unreduced[id(result)] = call
            recording.kept.append(result)

    def _reduction(self, func, args: tuple, kwargs: dict[str, Any]) -> None:
        call = self._unreduced.get(id(args[0]))
        name = getattr(func, "__name__", repr(func))
        if call is None or name in _LOOKING:
            return
        whole = len(args) == 1 and not {k for k in kwargs if k != "dtype"}
        call.reduced_by = name if (name in ("mean", "sum") and whole) else name + "(…)"
        del self._unreduced[id(args[0])]


@contextmanager
def buffers_at_start(recording: Recording | None) -> Iterator[None]:
    """Let the modules hold the buffers they had when the recorded step started.

    The step's measurement runs after its forward pass (before its backward pass), which
    updated some buffers; the measurement must see them as a measurement at the start of
    the step does. The modules' buffer *entries* are pointed at the copies and back, so the
    tensors the step's forward pass used (and may have saved for its backward pass) are
    never written to.
    """
    if recording is None or not recording.buffers:
        yield
        return
    current = [(module, name, module._buffers.get(name)) for module, name, _ in recording.buffers]
    try:
        for module, name, value in recording.buffers:
            module._buffers[name] = value
        yield
    finally:
        for module, name, value in current:
            module._buffers[name] = value


def _exit_mode(mode: TorchFunctionMode) -> None:
    """Leave ``mode`` if it is the innermost function mode (else the user's code left one on)."""
    from torch._C import _get_function_stack_at, _len_torch_function_stack

    depth = _len_torch_function_stack()
    if depth and _get_function_stack_at(depth - 1) is mode:
        mode.__exit__(None, None, None)


__all__ = [
    "LossCall",
    "buffers_at_start",
    "NetworkCall",
    "Recording",
    "StepRecorder",
    "fetch",
    "path_text",
    "walk_tensors",
]

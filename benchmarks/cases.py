"""What ``make bench`` measures: the models, the configurations, the cases and the targets.

The networks themselves are built in :mod:`benchmarks.models`; their specs (batch, scale,
configurations) are here.

A *case* is one subprocess of the harness, named ``{model}/{what}``:

- ``{model}/{config}`` (``default``, ``diag-exact``, ``diag-mc``, ``block-exact``,
  ``block-mc``, ``kron-exact``, ``kron-mc``): one-shot ``measure()`` and a prepared
  :class:`~fisher_monitor.engine.Measurer` call, against warm plain SGD steps, and the peak
  memory each adds;
- ``{model}/callback``: a real ``Trainer.fit`` with ``FisherMonitor`` (default configuration)
  logging to a ``TensorBoardLogger``;
- ``{model}/backpack-{extension}``: BackPACK's own extensions on the same batch, the floor
  the exact and Monte-Carlo structures build on (models BackPACK handles);
- ``fit/{digits,cnn}``: a real ``Trainer.fit`` on scikit-learn's digits with a default
  ``FisherMonitor()`` and the same fit without it: the measurements it got, the share of
  the time it reports, and the wall-clock time it added;
- ``report/{layers}x{measurements}``: ``fisher-monitor report`` on a synthetic run
  (``benchmarks/report_scale.py``);
- ``report/{count}runs``: ``fisher-monitor report`` on a parent directory of ``count``
  small synthetic runs (a sweep): a table of every run, figures for the runs that matter.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks.models import (
    GPT,
    TransformerLM,
    UNet,
    digits_cnn,
    digits_mlp,
    mlp,
    mobilenet_v3,
    regnet,
    resnet18,
    vision_transformer,
)

#: Configurations: name -> (structures, fisher). ``default`` is what ``measure()`` and the
#: callback do without arguments.
CONFIGS: dict[str, tuple[tuple[str, ...], str]] = {
    "default": (("diag", "block"), "exact"),
    "diag-exact": (("diag",), "exact"),
    "diag-mc": (("diag",), "mc"),
    "block-exact": (("block",), "exact"),
    "block-mc": (("block",), "mc"),
    "kron-exact": (("kron",), "exact"),
    "kron-mc": (("kron",), "mc"),
}

#: BackPACK extensions timed as floors: name -> (extension class names, what they compute).
FLOORS: dict[str, tuple[tuple[str, ...], str]] = {
    "backpack-diag-exact": (("DiagGGNExact", "SumGradSquared"), "diag F (exact) and diag EF"),
    "backpack-diag-mc": (("DiagGGNMC", "SumGradSquared"), "diag F (1 MC label) and diag EF"),
    "backpack-kflr": (("KFLR",), "Kronecker factors of F (exact)"),
    "backpack-kfac": (("KFAC",), "Kronecker factors of F (1 MC label)"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A model at the scale users train it, with its batch.

    Attributes:
        name: Short name used in case names (``mlp``, ``resnet18``, ...).
        title: What it is, for the tables.
        build: Builds the network (seeded by the caller).
        input_shape: Shape of one input (tokens: ``(length,)`` with ``vocabulary`` set).
        classes: Number of classes (vocabulary for a language model).
        batch_size: Training and probe batch size.
        vocabulary: For token inputs, the number of tokens; ``0`` for float inputs.
        fitted: Train on the probe batch first until it is fitted (loss below
            ``fitted_loss``): the regime where the EF's residuals vanish.
        configs: The configurations measured on this model.
        floors: The BackPACK floors timed on this model.
        callback: Whether ``{name}/callback`` exists.
        fitted_loss: The loss below which a ``fitted`` model counts as fitted.
        per_pixel: Image inputs with a label per pixel (segmentation).
    """

    name: str
    title: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int
    batch_size: int
    vocabulary: int = 0
    fitted: bool = False
    configs: tuple[str, ...] = tuple(CONFIGS)
    floors: tuple[str, ...] = ()
    callback: bool = True
    fitted_loss: float = 1e-3
    per_pixel: bool = False

    def batch(self, size: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
        """A fixed random batch ``(inputs, targets)`` (Gaussian inputs or random tokens)."""
        generator = torch.Generator().manual_seed(seed)
        size = size or self.batch_size
        if self.vocabulary:
            inputs = torch.randint(
                0, self.vocabulary, (size, *self.input_shape), generator=generator
            )
            targets = torch.randint(0, self.classes, (size, *self.input_shape), generator=generator)
        else:
            inputs = torch.randn(size, *self.input_shape, generator=generator)
            shape = (size, *self.input_shape[1:]) if self.per_pixel else (size,)
            targets = torch.randint(0, self.classes, shape, generator=generator)
        return inputs, targets


_MLP_FLOORS = tuple(FLOORS)
#: The models users train beyond our own (torchvision CNNs, a ViT, a UNet): the default
#: measurement and the diagonal alone.
_ZOO_CONFIGS = ("default", "diag-exact")

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "mlp",
            "MLP 784-512-256-10, batch 128, at initialisation",
            lambda: mlp(784, 512, 256, 10),
            (784,),
            10,
            128,
            floors=_MLP_FLOORS,
        ),
        ModelSpec(
            "mlp-fitted",
            "MLP 784-512-256-10, batch 128, fitted to its batch (loss < 1e-3)",
            lambda: mlp(784, 512, 256, 10),
            (784,),
            10,
            128,
            fitted=True,
            configs=("default", "diag-exact", "block-exact", "kron-exact"),
            callback=False,
        ),
        ModelSpec(
            "mlp-c100",
            "MLP 784-256-100, batch 128",
            lambda: mlp(784, 256, 100),
            (784,),
            100,
            128,
            floors=_MLP_FLOORS,
            callback=False,
        ),
        ModelSpec(
            "mlp-c1000",
            "MLP 784-256-1000, batch 128",
            lambda: mlp(784, 256, 1000),
            (784,),
            1000,
            128,
            floors=_MLP_FLOORS,
        ),
        ModelSpec(
            "resnet18",
            "torchvision ResNet-18, 10 classes, 3×32×32, batch 32",
            resnet18,
            (3, 32, 32),
            10,
            32,
            floors=("backpack-diag-exact", "backpack-diag-mc"),
        ),
        ModelSpec(
            "transformer",
            "transformer LM: 2 encoder layers, d_model 128, 4 heads, vocabulary 8000, "
            "sequence 32, batch 8, cross-entropy over every position",
            lambda: TransformerLM(8000),
            (32,),
            8000,
            8,
            vocabulary=8000,
        ),
        ModelSpec(
            "mobilenet-v3",
            "torchvision MobileNetV3-Small, 10 classes, 3×32×32, batch 32",
            mobilenet_v3,
            (3, 32, 32),
            10,
            32,
            configs=_ZOO_CONFIGS,
            callback=False,
        ),
        ModelSpec(
            "regnet",
            "torchvision RegNetY-400MF, 10 classes, 3×32×32, batch 32",
            regnet,
            (3, 32, 32),
            10,
            32,
            configs=_ZOO_CONFIGS,
            callback=False,
        ),
        ModelSpec(
            "vit",
            "torchvision VisionTransformer, 4 layers of width 128, 4×4 patches of 3×32×32, "
            "10 classes, batch 32",
            vision_transformer,
            (3, 32, 32),
            10,
            32,
            configs=_ZOO_CONFIGS,
            callback=False,
        ),
        ModelSpec(
            "unet",
            "UNet (3 levels, width 16), per-pixel cross-entropy over 3 classes, 3×32×32, batch 8",
            UNet,
            (3, 32, 32),
            3,
            8,
            configs=_ZOO_CONFIGS,
            callback=False,
            per_pixel=True,
        ),
        ModelSpec(
            "gpt-v50257",
            "GPT-style LM: 2 pre-norm blocks, width 32, 2 heads, vocabulary 50,257 (GPT-2's), "
            "sequence 16, batch 4, cross-entropy over every position",
            lambda: GPT(50257),
            (16,),
            50257,
            4,
            vocabulary=50257,
            configs=("default",),
            callback=False,
        ),
        ModelSpec(
            "tiny",
            "MLP 20-16-5, batch 8 (the harness's own test)",
            lambda: mlp(20, 16, 5),
            (20,),
            5,
            8,
            floors=("backpack-diag-mc",),
        ),
    )
}


@dataclass(frozen=True)
class FitSpec:
    """A real ``Trainer.fit`` of scikit-learn's digits with a default ``FisherMonitor()``.

    Attributes:
        name: ``fit/{name}``.
        title: What it is, for the tables.
        build: Builds the network (seeded by the caller).
        image: Whether the inputs are ``1 × 8 × 8`` images (else 64 features).
        steps: Optimizer steps of the fit.
        batch_size: Training batch size.
    """

    name: str
    title: str
    build: Callable[[], nn.Module]
    image: bool
    steps: int
    batch_size: int = 64


FITS: dict[str, FitSpec] = {
    spec.name: spec
    for spec in (
        FitSpec("digits", "MLP 64-128-128-10 on digits, 4,000 Adam steps", digits_mlp, False, 4000),
        FitSpec(
            "cnn", "CNN (2 conv, 2 linear) on digits, 1,500 Adam steps", digits_cnn, True, 1500
        ),
        FitSpec(
            "tiny",
            "MLP 64-128-128-10 on digits, 60 steps (the harness's own test)",
            digits_mlp,
            False,
            60,
        ),
    )
}
#: Fits of a full run (``tiny`` only for the harness's test).
FIT_CASES = ("digits", "cnn")

#: The model zoo's rows (``--cases 'mobilenet-v3/*,regnet/*,vit/*,unet/*'``).
ZOO_MODELS = ("mobilenet-v3", "regnet", "vit", "unet", "gpt-v50257")
#: Models whose measurement takes minutes: their cases get the long cases' time limit.
LONG_MODELS = ("gpt-v50257",)
#: Models of a full run, in order (``tiny`` is only for the harness's test).
DEFAULT_MODELS = (
    "mlp",
    "mlp-fitted",
    "mlp-c100",
    "mlp-c1000",
    "resnet18",
    "transformer",
    *ZOO_MODELS,
)
#: Report-at-scale cases of a full run and of ``--quick``.
REPORT_CASES = ("50x2000", "2000runs")
QUICK_REPORT_CASES = ("10x100",)
#: ``--quick``: the MLP's configurations, its callback and a small report.
QUICK_CASES = (
    "mlp/default",
    "mlp/diag-mc",
    "mlp/diag-exact",
    "mlp/block-exact",
    "mlp/kron-exact",
    "mlp/callback",
    *(f"report/{case}" for case in QUICK_REPORT_CASES),
)


@dataclass(frozen=True)
class Case:
    """One unit of work of the harness, run in its own process.

    Attributes:
        name: ``{model}/{what}``.
        kind: ``"measure"``, ``"callback"``, ``"floor"``, ``"fit"`` or ``"report"``.
        model: Model name (``fit``/``report`` for those cases).
        what: Configuration, ``callback``, floor name, fit, or ``{layers}x{measurements}``.
    """

    name: str
    kind: str
    model: str
    what: str

    def to_dict(self) -> dict:
        """Plain data, to hand to the worker process."""
        return {"name": self.name, "kind": self.kind, "model": self.model, "what": self.what}


def all_cases(models=DEFAULT_MODELS, report_cases=REPORT_CASES, fits=FIT_CASES) -> list[Case]:
    """Every case of the given models, then the fits and the report cases, in table order."""
    cases = []
    for name in models:
        spec = MODELS[name]
        cases += [Case(f"{name}/{config}", "measure", name, config) for config in spec.configs]
        if spec.callback:
            cases.append(Case(f"{name}/callback", "callback", name, "default"))
        cases += [Case(f"{name}/{floor}", "floor", name, floor) for floor in spec.floors]
    cases += [Case(f"fit/{what}", "fit", "fit", what) for what in fits]
    cases += [Case(f"report/{what}", "report", "report", what) for what in report_cases]
    return cases


def parse_case(name: str) -> Case:
    """The case called ``name`` (any model, including ``tiny``; any report size).

    Raises:
        ValueError: For an unknown model or configuration, naming what exists.
    """
    model, _, what = name.partition("/")
    if model == "fit":
        if what not in FITS:
            raise ValueError(f"Invalid fit case: {name!r}. Supported: {tuple(FITS)}.")
        return Case(name, "fit", "fit", what)
    if model == "report":
        layers, _, measurements = what.partition("x")
        many = what.endswith("runs") and what[: -len("runs")].isdigit()
        if not (many or (layers.isdigit() and measurements.isdigit())):
            raise ValueError(
                f"Invalid report case: {name!r}. Use 'report/{{layers}}x{{steps}}' or "
                "'report/{count}runs'."
            )
        return Case(name, "report", "report", what)
    if model not in MODELS:
        raise ValueError(f"Invalid model in case {name!r}. Supported: {tuple(MODELS)}.")
    if what in CONFIGS:
        return Case(name, "measure", model, what)
    if what == "callback":
        return Case(name, "callback", model, "default")
    if what in FLOORS:
        return Case(name, "floor", model, what)
    allowed = (*CONFIGS, "callback", *FLOORS)
    raise ValueError(f"Invalid case {name!r}: {what!r} is none of {allowed}.")


def select(patterns: str | None, quick: bool = False) -> list[Case]:
    """The cases a run covers.

    Args:
        patterns: Comma-separated case names or shell patterns (``mlp/*``, ``*/default``,
            ``report/*``); a bare model name means all its cases. Patterns match the cases
            of a full run; name other models (``tiny``) or report sizes (``report/20x500``)
            explicitly. ``None``: every case of a full run, or of the quick set.
        quick: Without ``patterns``, the quick set :data:`QUICK_CASES`.

    Raises:
        ValueError: When a pattern matches nothing, naming the cases that exist.
    """
    if patterns is None:
        return [parse_case(name) for name in QUICK_CASES] if quick else all_cases()
    known = all_cases(DEFAULT_MODELS, (*REPORT_CASES, *QUICK_REPORT_CASES))
    chosen: dict[str, Case] = {}
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        model = pattern.partition("/")[0]
        if model in MODELS and model not in DEFAULT_MODELS:
            pool = all_cases((model,), ())
        else:
            pool = known
        if pattern in MODELS:
            pattern = f"{pattern}/*"
        if any(character in pattern for character in "*?["):
            matches = [case for case in pool if fnmatch.fnmatchcase(case.name, pattern)]
        else:
            matches = [parse_case(pattern)]
        if not matches:
            names = ", ".join(case.name for case in known)
            raise ValueError(f"No case matches {pattern!r}. Cases: {names}.")
        for case in matches:
            chosen.setdefault(case.name, case)
    return list(chosen.values())


@dataclass(frozen=True)
class Target:
    """A goal of the issue, checked against one case.

    Attributes:
        label: What the row says.
        case: The case it reads (``"*"``: every measured case, for the cost model's target).
        bound: Largest ratio allowed (``measure()`` one-shot; Lightning steps for the
            callback); for report cases, seconds; with ``relative_to``, the largest ratio
            to that case's; for the cost model, the largest factor between estimate and
            measurement; for fits, the smallest factor of measurements over the baseline's.
        full_probe: Also require the whole probe batch (no sub-sampling).
        max_relative_se: Also require every standard error below this share of its value.
        megabytes: For report cases, the peak-memory bound.
        relative_to: A case (BackPACK's floor) whose ratio this case's is divided by.
    """

    label: str
    case: str
    bound: float
    full_probe: bool = False
    max_relative_se: float | None = None
    megabytes: float | None = None
    relative_to: str | None = None


TARGETS: tuple[Target, ...] = (
    Target(
        "MLP, one-shot `measure()`, diag MC",
        "mlp/diag-mc",
        1.5,
        relative_to="mlp/backpack-diag-mc",
    ),
    Target(
        "MLP, one-shot `measure()`, diag exact",
        "mlp/diag-exact",
        1.5,
        relative_to="mlp/backpack-diag-exact",
    ),
    Target("MLP, block exact, at initialisation", "mlp/block-exact", 30),
    Target("MLP, block exact, fitted", "mlp-fitted/block-exact", 30),
    Target("MLP, kron exact, at initialisation", "mlp/kron-exact", 20),
    Target("MLP, kron exact, fitted", "mlp-fitted/kron-exact", 20),
    Target("MLP, callback default with its logging (Lightning steps)", "mlp/callback", 25),
    Target("cost model: estimate within 1.3× of the measured `Measurer` call", "*", 1.3),
    Target(
        "default `FisherMonitor()`: digits, 4,000 steps, measurements × today's",
        "fit/digits",
        2.0,
    ),
    Target("default `FisherMonitor()`: CNN, 1,500 steps, measurements × today's", "fit/cnn", 2.0),
    Target(
        "digits fit: reported monitor time within 10% of the wall-clock increase",
        "fit/digits#accounting",
        0.1,
    ),
    Target(
        "CNN fit: reported monitor time within 10% of the wall-clock increase",
        "fit/cnn#accounting",
        0.1,
    ),
    Target(
        "MLP C = 1000, default, full probe of 128, standard errors < 5%",
        "mlp-c1000/default",
        30,
        full_probe=True,
        max_relative_se=0.05,
    ),
    Target(
        "ResNet-18 32×32 batch 32, diag exact, no sub-sampling", "resnet18/diag-exact", 10, True
    ),
    Target("ResNet-18 32×32 batch 32, default, no sub-sampling", "resnet18/default", 30, True),
    Target("transformer LM, vocabulary 8000, default", "transformer/default", 30),
    Target("torchvision MobileNetV3-Small, default", "mobilenet-v3/default", 30),
    Target("torchvision RegNetY-400MF, default", "regnet/default", 30),
    Target("UNet, per-pixel cross-entropy, default", "unet/default", 30),
    Target("report, 50 layers × 2000 measurements", "report/50x2000", 60, megabytes=1024),
    Target("report, 2000 small runs (a sweep)", "report/2000runs", 60, megabytes=1024),
)

"""Issue 21, item 7: every bad argument is refused at construction, naming the argument.

Fuzzed over every argument of ``FisherMonitor`` and of ``measure()``: a value is either
accepted or refused with a ``ValueError``/``TypeError`` whose message names the argument,
never an error from deep inside (``'NoneType' object is not iterable``, ``Invalid damping
value '0'``, ``Overflow when unpacking long long``, ``'int' object has no attribute
'device'``). The cases the issue names are checked one by one.
"""

from __future__ import annotations

import inspect
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fisher_monitor import FisherMonitor, measure

#: What a message must name, per argument (some arguments are named in the singular).
NAMED = {
    "structures": r"structures?\b",
    "loss_fn": r"loss",
    "damping": r"damping",
}
#: Arguments that accept any callable: fuzzing them with callables is not misuse.
CALLABLES = {"schedule", "network", "batch_to_inputs_targets"}

ANY = st.deferred(
    lambda: st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.binary(max_size=6),
        st.sampled_from(
            [
                "diag",
                "block",
                "exact",
                "mc",
                "auto",
                "relative",
                "1GB",
                "0.1",
                "1" * 400 + "GB",
                "-1MiB",
                "~fisher/block/direction_cosine/all",
                "block/direction_cosine/all",
                "cross_entropy",
                2**64,
                2**63,
                -1,
                0,
                np.float64(0.1),
                np.int64(3),
                np.array(0.1),
            ]
        ),
        st.builds(lambda: torch.tensor(0.1)),
        st.builds(lambda: torch.ones(3)),
        st.builds(lambda: (torch.randn(4, 2), torch.zeros(3, dtype=torch.long))),
        st.builds(lambda: (torch.randn(4, 2), torch.zeros(4, dtype=torch.long))),
        st.builds(object),
        st.lists(ANY, max_size=3),
        st.tuples(ANY, ANY),
        st.dictionaries(st.text(max_size=4), ANY, max_size=2),
    )
)
ARGUMENTS = [name for name in inspect.signature(FisherMonitor).parameters if name not in ("self",)]


def refused_properly(error: Exception, name: str) -> bool:
    pattern = NAMED.get(name, re.escape(name))
    # a memory budget too small for one sample is valid but cannot be met: MemoryError
    kinds = (
        (ValueError, TypeError, MemoryError) if name == "memory_budget" else (ValueError, TypeError)
    )
    return isinstance(error, kinds) and re.search(pattern, str(error))


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(ARGUMENTS), value=ANY)
def test_any_value_of_any_argument_is_accepted_or_refused_by_name(name, value):
    if name in CALLABLES and callable(value):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            FisherMonitor(**{name: value})
    except Exception as error:  # noqa: BLE001 - what kind of error is the point
        assert refused_properly(error, name), f"{name}={value!r}: {type(error).__name__}: {error}"


MEASURE_ARGUMENTS = [
    "structures",
    "backend",
    "fisher",
    "mc_samples",
    "damping",
    "damping_mode",
    "generator",
    "dtype",
    "memory_budget",
    "estimator",
    "solve_budget",
]


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(6, 3)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(MEASURE_ARGUMENTS),
    value=ANY
    | st.sampled_from(
        [torch.float16, torch.bfloat16, torch.int32, torch.complex64, torch.float32, "float64"]
    ),
)
def test_measure_arguments_are_accepted_or_refused_by_name(problem, name, value):
    model, inputs = problem
    targets = torch.tensor([0, 1, 0, 1, 1, 0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            measure(model, "cross_entropy", inputs, targets, **{name: value})
    except Exception as error:  # noqa: BLE001
        assert refused_properly(error, name), f"{name}={value!r}: {type(error).__name__}: {error}"


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(structures=None), ValueError, r"Invalid structures: None\. Use one of"),
        (dict(damping="0.1"), TypeError, r"Invalid damping: '0\.1' is a string"),
        (dict(damping=torch.tensor(0.1)), TypeError, r"Invalid damping: tensor\(0\.1000\)"),
        (dict(seed=2**64), ValueError, r"Invalid seed: 18446744073709551616\. Use an integer"),
        (dict(prog_bar=5), ValueError, r"Invalid prog_bar: 5"),
        (
            dict(probe_data=(torch.randn(5, 4), torch.zeros(3, dtype=torch.long))),
            ValueError,
            r"Invalid probe_data: inputs of shape \(5, 4\) and targets of shape \(3,\) disagree",
        ),
        (
            dict(probe_data=(torch.randn(5, 4), [0, 1, 2, 0, 1])),
            ValueError,
            r"Invalid probe_data: its targets are a list",
        ),
        (
            dict(probe_data=(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))),
            ValueError,
            r"Invalid probe_data: it holds 0 samples",
        ),
        (dict(memory_budget="1" * 400 + "GB"), ValueError, r"Invalid memory_budget"),
    ],
)
def test_the_issues_cases_at_construction(arguments, error, message):
    with pytest.raises(error, match=message):
        FisherMonitor(**arguments)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(generator=5), TypeError, r"Invalid generator: 5\. Pass a torch\.Generator"),
        (dict(structures=None), ValueError, r"Invalid structures: None"),
        (dict(damping="0.1"), TypeError, r"Invalid damping: '0\.1' is a string"),
        (dict(dtype=torch.float16), ValueError, r"Invalid dtype: torch\.float16\. .*float64"),
        (dict(dtype=torch.int32), ValueError, r"Invalid dtype: torch\.int32"),
        (dict(dtype="float64"), TypeError, r"Invalid dtype: 'float64'"),
    ],
)
def test_the_issues_cases_of_measure(problem, arguments, error, message):
    model, inputs = problem
    with pytest.raises(error, match=message):
        measure(model, "cross_entropy", inputs, torch.zeros(6, dtype=torch.long), **arguments)


def test_a_model_with_integer_parameters_names_the_dtype(problem):
    class Quantised(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2, 3, dtype=torch.int8), requires_grad=False)

        def forward(self, x):
            return x @ self.weight.float().T

    _, inputs = problem
    with pytest.raises(ValueError, match=r"parameter \('weight' is torch\.int8\)"):
        measure(Quantised(), "cross_entropy", inputs, torch.zeros(6, dtype=torch.long))

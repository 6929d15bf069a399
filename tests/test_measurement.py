"""``Measurement`` for people: a short repr, mapping access, plain data and a table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fisher_monitor import measure


@pytest.fixture(scope="module")
def measurement():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    inputs, targets = torch.randn(32, 64), torch.randint(0, 10, (32,))
    return measure(model, nn.CrossEntropyLoss(), inputs, targets)


def test_repr_is_short_and_names_the_headline(measurement):
    text = repr(measurement)
    assert len(text) < 300 and "\n" not in text
    assert "block/all" in text and "direction_cosine=" in text and "'0'" in text
    value = measurement["block/direction_cosine/all"]
    assert f"direction_cosine={value:.3f}" in text


def test_mapping_access(measurement):
    keys = measurement.keys()
    assert list(measurement) == keys and len(measurement) == len(keys)
    assert "block/kl/all" in measurement
    assert measurement.get("block/kl/all") == measurement["block/kl/all"]
    assert measurement.get("nope", 1.5) == 1.5
    assert dict(measurement.items()) == measurement.scalars


def test_key_error_is_built_from_the_real_parts(measurement):
    with pytest.raises(KeyError) as caught:
        measurement["block/direction_cosin/all"]
    message = str(caught.value)
    assert "Did you mean 'block/direction_cosine/all'" in message
    assert "['block', 'diag']" in message and "'all'" in message and "'2'" in message


def test_to_dict_is_plain_json(measurement):
    data = measurement.to_dict()
    text = json.dumps(data)  # no tensors inside
    assert json.loads(text)["scalars"]["block/kl/all"] == measurement["block/kl/all"]
    assert [layer["name"] for layer in data["layers"]] == ["0", "2"]
    assert data["layers"][0]["dimension"] == 64 * 32 + 32


def test_table_has_a_row_per_layer_and_all(measurement):
    table = measurement.table()
    lines = table.splitlines()
    assert lines[0].split()[0] == "layer" and "D (parameters)" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["0", "2", "all"]
    assert "2,080" in lines[2]  # dimensions as whole numbers
    assert f"{measurement['block/direction_cosine/2']:.3f}" in lines[3]
    diag = measurement.table("diag")
    assert f"{measurement['diag/direction_cosine/all']:.3f}" in diag.splitlines()[-1]
    with pytest.raises(ValueError, match="Invalid structure: 'kron'"):
        measurement.table("kron")

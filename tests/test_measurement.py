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


def test_html_table_for_notebooks(measurement):
    """Issue 22, item 7: a Measurement shows itself as a table in a notebook."""
    page = measurement._repr_html_()
    assert page.startswith("<table><caption>fisher-monitor measurement: block structure")
    assert page.count("<tr>") == 1 + 3  # headings, the two layers and `all`
    assert "<td>2,080</td>" in page and "cos(F̃⁻¹g, ẼF⁻¹g)" in page
    value = measurement["block/direction_cosine/all"]
    assert f"<td>{value:.3f}</td>" in page
    assert "docs/glossary.md" in page


def test_html_escapes_names_and_notes():
    from fisher_monitor.measurement import Measurement

    m = Measurement(
        scalars={"diag/trace_ratio/<b>x</b>": 1.0, "diag/trace_ratio/all": 1.0},
        layers=[],
        diagonals={},
        settings={"structures": ["diag"], "damping": 1e-3},
        notes=["<script>alert(1)</script>"],
    )
    page = m._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_to_dataframe_needs_pandas_and_says_how_to_install_it(measurement, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_pandas(name, *args, **kwargs):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_pandas)
    with pytest.raises(ImportError, match=r"needs pandas.*pip install pandas"):
        measurement.to_dataframe()


def test_to_dataframe_long_and_per_layer(measurement):
    pandas = pytest.importorskip("pandas", reason="pandas is an optional dependency")
    frame = measurement.to_dataframe()
    assert list(frame.columns) == [
        "key",
        "structure",
        "metric",
        "layer",
        "damping",
        "value",
        "stderr",
    ]
    assert len(frame) == len([k for k in measurement if "_se" not in k.split("/")[1]])
    row = frame.set_index("key").loc["block/kl/all"]
    assert row["value"] == measurement["block/kl/all"] and row["structure"] == "block"
    assert row["metric"] == "kl" and row["layer"] == "all"
    assert frame.set_index("key").loc["probe/loss"]["structure"] == "probe"
    table = measurement.to_dataframe("block")
    assert isinstance(table, pandas.DataFrame) and list(table.index) == ["0", "2", "all"]
    assert table.loc["all", "direction_cosine"] == measurement["block/direction_cosine/all"]
    assert table.loc["0", "dimension"] == 64 * 32 + 32
    with pytest.raises(ValueError, match=r"Invalid structure: 'kron'"):
        measurement.to_dataframe("kron")


def test_to_dataframe_keeps_standard_errors():
    pytest.importorskip("pandas", reason="pandas is an optional dependency")
    from fisher_monitor.measurement import Measurement

    m = Measurement(
        scalars={
            "block/trace_ratio/all": 0.5,
            "block/trace_ratio_se/all": 0.01,
            "block/trace_ratio/fc": 0.4,
        },
        layers=[],
        diagonals={},
        settings={"structures": ["block"], "damping": 1e-3},
    )
    frame = m.to_dataframe().set_index("key")
    assert frame.loc["block/trace_ratio/all", "stderr"] == 0.01
    assert frame["stderr"].isna().sum() == 1 and len(frame) == 2
    table = m.to_dataframe("block")
    assert table.loc["all", "trace_ratio_se"] == 0.01

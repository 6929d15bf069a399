"""The per-layer text table shared by the report and ``Measurement.table()``."""

from __future__ import annotations

from fisher_monitor.tables import (
    LAYER_COLUMNS,
    format_number,
    format_value,
    layer_rows,
    layer_table,
    row_cells,
)


def test_numbers_are_formatted_for_reading():
    assert format_number(26000.0, "dimension") == "26,000"  # a whole number, not 2.6e+04
    assert format_number(0.93456, "direction_cosine") == "0.935"
    assert format_number(-0.1, "direction_cosine") == "-0.100"
    assert format_number(1.2345, "trace_ratio") == "1.23"
    assert format_number(123456.0, "kl") == "1.23e+05"
    assert format_number(2e-5, "kl") == "2.00e-05"
    assert format_number(0.0, "kl") == "0"
    assert format_number(float("nan")) == format_number(None) == "–"
    assert format_value(0.5, 0.0123, "direction_cosine") == "0.500 ± 0.012"
    assert format_value(0.5, float("nan"), "direction_cosine") == "0.500"
    assert format_value(None, 0.1) == "–"


def test_rows_read_the_damping_suffix_only_for_damped_metrics():
    values = {
        "block/trace_ratio/fc1": 1.5,  # not damped: no suffix
        "block/direction_cosine@0.1/fc1": 0.25,
        "block/direction_cosine@0.001/fc1": 0.75,
        "block/direction_cosine_se@0.1/fc1": 0.05,
        "block/kl@0.1/all": 3.0,
        "diag/kl@0.1/all": 99.0,
    }
    rows = layer_rows(values, ["fc1"], "block", "@0.1", dimensions={"fc1": 10, "all": 10})
    fc1, total = rows
    assert fc1["layer"] == "fc1" and total["layer"] == "all"
    assert fc1["trace_ratio"] == 1.5 and fc1["direction_cosine"] == 0.25
    assert fc1["direction_cosine_se"] == 0.05 and "kl_se" not in fc1
    assert total["kl"] == 3.0 and fc1["dimension"] == 10 and fc1["kl"] is None
    cells = row_cells(fc1)
    assert cells[:3] == ["fc1", "10", "0.250 ± 0.05"] and cells[4] == "–"


def test_text_table_has_named_columns_and_the_whole_network_last():
    values = {f"diag/{c.metric}/{layer}": 0.5 for c in LAYER_COLUMNS for layer in ("a", "all")}
    values["diag/dimension/a"] = values["diag/dimension/all"] = 1234.0
    text = layer_table(values, ["a"], "diag")
    heading, rule, first, last = text.splitlines()
    for column in LAYER_COLUMNS:
        assert column.heading in heading
    assert set(rule) <= {"-", " "}
    assert first.split()[:3] == ["a", "1,234", "0.500"] and last.startswith("all")

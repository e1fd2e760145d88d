"""Tests of the `filter` transformation and its Arrow evaluation."""

from __future__ import annotations

from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pytest
from edge_batches import EDGES, NO_NAN, rows

import dataflare.transforms.filter as filter_module
from dataflare.plugin.interface import ConfigError, FieldNotFoundError
from dataflare.transforms.expressions import to_polars
from dataflare.transforms.filter import FilterTransform

# Rows of each batch that the filter converts to Polars: none when Arrow
# evaluates the condition, EDGES only when NaN in a float comparison makes
# that batch fall back, and both batches for conditions left to Polars.
ARROW: list[int] = []
NAN_ON_POLARS = [EDGES.num_rows]
POLARS = [EDGES.num_rows, NO_NAN.num_rows]
CONDITIONS = [
    ("i > 15", ARROW),
    ("i >= j", ARROW),
    ("i = j", ARROW),
    ("i <> j", ARROW),
    ("i != 5", ARROW),
    ("i - j > 0", ARROW),  # wraps around at the int64 extremes, as in Polars
    ("i + j < 0", ARROW),
    ("i * j > 0", ARROW),
    ("-i > 0", ARROW),
    ("small + 1 > 0", ARROW),  # int8 arithmetic wraps
    ("small * 2 < 0", ARROW),
    ("0 - u > 100", ARROW),  # uint8 arithmetic wraps
    ("u - 1 < 5", ARROW),
    ("f > 1", NAN_ON_POLARS),
    ("f = g", NAN_ON_POLARS),
    ("f < g OR f IS NULL", NAN_ON_POLARS),
    ("f * 2 > g", NAN_ON_POLARS),
    ("s = 'JFK'", ARROW),
    ("ls >= 'a'", ARROW),
    ("s = 'é'", ARROW),
    ("b", ARROW),
    ("b AND c", ARROW),
    ("b OR c", ARROW),
    ("NOT b", ARROW),
    ("NOT (i > 3)", ARROW),
    ("b = TRUE", ARROW),
    ("i IS NULL", ARROW),
    ("s IS NOT NULL AND i BETWEEN 1 AND 16", ARROW),
    ("i > 1 AND s IS NOT NULL OR NOT c", ARROW),
    ('"i" > 1', ARROW),
    ("_event_time IS NOT NULL AND i > 0", ARROW),
    ("small > 1000", POLARS),  # Polars widens the literal's type
    ("i > f", POLARS),  # mixed types
    ("s = ls", POLARS),
    ("f > 1.5", POLARS),  # decimal literal
    ("i / 2 > 3", POLARS),
    ("i % 2 = 0", POLARS),
    ("i IN (5, 16)", POLARS),
    ("CAST(i AS DOUBLE) > 2", POLARS),
    ("upper(s) = 'JFK'", POLARS),
    ("EXTRACT(hour FROM _event_time) > 3", POLARS),
]


def make(context: Any, condition: str) -> FilterTransform:
    transform = FilterTransform(FilterTransform.Config(condition=condition), context)
    transform.output_schema([EDGES.schema])
    transform.open()
    return transform


def count_conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the row count of every batch the filter converts to Polars."""
    rows: list[int] = []

    def counting(batch: pa.RecordBatch) -> pl.DataFrame:
        if batch.num_rows:  # type checks on no rows are not counted
            rows.append(batch.num_rows)
        return to_polars(batch)

    monkeypatch.setattr(filter_module, "to_polars", counting)
    return rows


@pytest.mark.parametrize(("condition", "converted"), CONDITIONS)
def test_filter_arrow_matches_polars(
    context: Any, monkeypatch: pytest.MonkeyPatch, condition: str, converted: list[int]
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(filter_module, "from_tree", lambda *args: None)
        polars_path = make(context, condition)
        expected = [rows(polars_path.process(b), b.schema) for b in (EDGES, NO_NAN)]
    expected_counts = context.counters["filtered"]
    context.counters.clear()

    transform = make(context, condition)
    conversions = count_conversions(monkeypatch)
    got = [rows(transform.process(b), b.schema) for b in (EDGES, NO_NAN)]

    assert got == expected
    assert context.counters["filtered"] == expected_counts
    assert conversions == converted


@pytest.mark.parametrize(
    "condition",
    [
        "i > 15",
        "i >= j AND s IS NOT NULL",
        "f > 1",
        "f = g",
        "NOT (f < g)",
        "s = 'JFK' OR b",
        "small > 3 AND u < 100",
        "b AND c",
    ],
)
def test_filter_matches_duckdb(context: Any, condition: str) -> None:
    edges = pa.Table.from_batches([EDGES])  # noqa: F841 - read by DuckDB by name
    expected = duckdb.execute(f"SELECT id FROM edges WHERE {condition} ORDER BY id")

    out = make(context, condition).process(EDGES)

    got = pa.Table.from_batches(out, schema=EDGES.schema).column("id").to_pylist()
    assert got == [row[0] for row in expected.fetchall()]


def test_filter_counts_null_as_false(context: Any) -> None:
    [out] = make(context, "i > 0").process(EDGES)

    assert out.column("id").to_pylist() == [0, 2, 5, 7, 8]
    assert context.counters["filtered"] == 4


def test_filter_keeps_whole_batch(context: Any) -> None:
    transform = make(context, "id >= 0")

    [out] = transform.process(NO_NAN)

    assert out.equals(NO_NAN)
    assert context.counters["filtered"] == 0


def test_filter_constant_conditions(context: Any) -> None:
    assert make(context, "TRUE").process(EDGES) == [EDGES]
    assert make(context, "FALSE").process(EDGES) == []
    assert make(context, "NULL").process(EDGES) == []
    assert context.counters["filtered"] == 2 * EDGES.num_rows


def test_filter_new_schema_recompiles(context: Any) -> None:
    transform = make(context, "i > 15")
    wider = pa.RecordBatch.from_pydict({"i": pa.array([20, 3], pa.int32())})

    [first] = transform.process(EDGES)
    [second] = transform.process(wider)

    assert first.column("id").to_pylist() == [0, 5]
    assert second.to_pylist() == [{"i": 20}]


def test_filter_invalid_conditions(context: Any) -> None:
    cases: list[tuple[str, type[Exception], str]] = [
        ("dep_delay >", ValueError, "invalid SQL expression 'dep_delay >'"),
        ("ii > 1", FieldNotFoundError, "field 'ii' in condition not found"),
        ("s > 5", ConfigError, r"invalid expression 's > 5': .* \(field types: s: "),
        ("i + 1", ConfigError, "gives Int64, not true or false"),
    ]
    for condition, error, message in cases:
        with pytest.raises(error, match=message):
            make(context, condition)


@pytest.mark.parametrize(
    ("dtype", "values", "literal"),
    [
        (pa.int8(), [-128, 5, None, 127], "5"),
        (pa.int16(), [-300, 5, None, 300], "-300"),
        (pa.int32(), [-(2**31), 5, None, 2**31 - 1], "5"),
        (pa.uint16(), [0, 5, None, 65535], "65535"),
        (pa.uint64(), [0, 5, None, 2**64 - 1], "5"),
        (pa.float32(), [-1.5, 5.0, None, 16777216.0], "16777216"),
        (pa.string(), ["a", "JFK", None, "é"], "'JFK'"),
        (pa.large_string(), ["a", "JFK", None, "é"], "'é'"),
        (pa.bool_(), [True, False, None, True], "TRUE"),
    ],
)
def test_filter_literal_types(
    context: Any,
    monkeypatch: pytest.MonkeyPatch,
    dtype: pa.DataType,
    values: list[Any],
    literal: str,
) -> None:
    batch = pa.RecordBatch.from_pydict({"v": pa.array(values, dtype)})
    frame = to_polars(batch)
    conversions = count_conversions(monkeypatch)

    for op in ("=", "<", ">="):
        condition = f"v {op} {literal}"
        transform = FilterTransform(
            FilterTransform.Config(condition=condition), context
        )
        transform.open()
        out = transform.process(batch)
        expected = frame.filter(pl.sql_expr(condition)).to_arrow()

        assert rows(out, batch.schema) == expected.to_pylist(), condition
    assert conversions == []


@pytest.mark.parametrize(
    "condition", ["i > 0", "i >= j AND s IS NOT NULL", "b", "s = 'JFK' OR b", "f > 1"]
)
def test_filter_small_batches_match_duckdb(context: Any, condition: str) -> None:
    """Every run of adjacent EDGES rows as its own batch, as DuckDB filters it.

    Batches this small are sliced where the kept rows are adjacent and
    filtered otherwise; both must keep the rows DuckDB keeps.
    """
    edges = pa.Table.from_batches([EDGES])  # noqa: F841 - read by DuckDB by name
    kept = {
        row[0]
        for row in duckdb.execute(f"SELECT id FROM edges WHERE {condition}").fetchall()
    }
    transform = make(context, condition)
    for start in range(EDGES.num_rows):
        for length in range(1, EDGES.num_rows - start + 1):
            part = EDGES.slice(start, length)
            expected = [row for row in rows([part], EDGES.schema) if row["id"] in kept]

            assert rows(transform.process(part), EDGES.schema) == expected


def test_filter_slices_adjacent_rows(context: Any) -> None:
    small = pa.RecordBatch.from_pydict({"i": [1, 20, 30, 2]})
    large = pa.RecordBatch.from_pydict({"i": [1, 20, 30] + [0] * 30})
    transform = make(context, "i > 15")

    [sliced] = transform.process(small)
    [filtered] = transform.process(large)

    assert sliced.column("i").to_pylist() == [20, 30]
    assert sliced.column("i").offset == 1  # the input's own memory
    assert filtered.column("i").to_pylist() == [20, 30]
    assert filtered.column("i").offset == 0  # a copy: the input may be large
    assert context.counters["filtered"] == 2 + 31


@pytest.mark.parametrize("dtype", [pa.string_view(), pa.binary_view()])
def test_filter_view_columns(context: Any, dtype: pa.DataType) -> None:
    values = [b"a", b"bb", None, b"a text longer than twelve bytes"] * 10
    if dtype == pa.string_view():
        values = [None if v is None else v.decode() for v in values]
    batch = pa.RecordBatch.from_pydict(
        {"i": list(range(40)), "v": pa.array(values, dtype)}
    )

    [out] = make(context, "i % 3 = 0 OR i < 2").process(batch)

    kept = [i for i in range(40) if i % 3 == 0 or i < 2]
    assert out.schema == batch.schema
    assert out.column("i").to_pylist() == kept
    assert out.column("v").to_pylist() == [values[i] for i in kept]

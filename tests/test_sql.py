"""Tests of the `sql` transformation."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pytest
from edge_batches import EDGES, NO_NAN, rows
from pydantic import ValidationError

import dataflare.transforms.sql as sql_module
from dataflare import Pipeline, PipelineValidationError
from dataflare.plugin.interface import ConfigError
from dataflare.transforms.expressions import to_polars
from dataflare.transforms.sql import SqlTransform

UTC = dt.UTC
FLIGHTS = [
    {"carrier": "AA", "distance": 1000.0, "air_time": 120.0, "code": "1"},
    {"carrier": "UA", "distance": 500.0, "air_time": 0.0, "code": "2"},
    {"carrier": "AA", "distance": 1500.0, "air_time": None, "code": "x"},
    {"carrier": None, "distance": 300.0, "air_time": 60.0, "code": "4"},
    {"carrier": "UA", "distance": 2000.0, "air_time": 240.0, "code": "5"},
]
W3_QUERY = (
    "SELECT id, s AS carrier, ls AS origin, i AS dep_delay, "
    "i - j AS gained, _event_time FROM input"
)
SPEED_QUERY = (
    "SELECT carrier, distance / (air_time / 60.0) AS mph FROM {table} "
    "WHERE air_time > 0"
)


def make(context: Any, query: str, **config: Any) -> SqlTransform:
    transform = SqlTransform(SqlTransform.Config(query=query, **config), context)
    transform.open()
    return transform


def with_event_time(records: list[dict[str, Any]]) -> pa.RecordBatch:
    batch = pa.RecordBatch.from_pylist(records)
    times = pa.array(
        [dt.datetime(2024, 1, 1, i, tzinfo=UTC) for i in range(batch.num_rows)],
        pa.timestamp("us", tz="UTC"),
    )
    return batch.append_column("_event_time", times)


def test_sql_matches_duckdb(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(FLIGHTS)
    [out] = make(context, SPEED_QUERY.format(table="input")).process(batch)
    flights = pa.Table.from_batches([batch])  # noqa: F841 - read by DuckDB by name
    expected = duckdb.sql(SPEED_QUERY.format(table="flights")).to_arrow_table()
    assert out.schema == pa.schema([("carrier", pa.string()), ("mph", pa.float64())])
    assert out.column("carrier").to_pylist() == expected.column("carrier").to_pylist()
    assert out.column("mph").to_pylist() == pytest.approx(
        expected.column("mph").to_pylist()
    )


def test_sql_keeps_selected_event_time(context: Any) -> None:
    batch = with_event_time(FLIGHTS)
    kept = make(context, "SELECT carrier, _event_time FROM input WHERE distance > 900")
    dropped = make(context, "SELECT carrier FROM input")
    [out] = kept.process(batch)
    assert out.schema.field("_event_time").type == pa.timestamp("us", tz="UTC")
    assert out.column("_event_time").to_pylist() == [
        dt.datetime(2024, 1, 1, h, tzinfo=UTC) for h in (0, 2, 4)
    ]
    assert dropped.output_schema([batch.schema]).names == ["carrier"]


def test_sql_select_star_keeps_types(context: Any) -> None:
    schema = pa.schema([("n", pa.int32()), ("s", pa.string()), ("d", pa.date32())])
    batch = pa.RecordBatch.from_pylist(
        [{"n": 1, "s": "a", "d": dt.date(2024, 1, 1)}], schema=schema
    )
    transform = make(context, "SELECT * FROM input")
    assert transform.output_schema([schema]) == schema
    [out] = transform.process(batch)
    assert out.schema == schema
    assert out.to_pylist() == batch.to_pylist()


def test_sql_table_name(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(FLIGHTS)
    query = "SELECT count(*) AS n FROM flights WHERE carrier = 'AA'"
    [out] = make(context, query, table="flights").process(batch)
    assert out.to_pylist() == [{"n": 2}]


def test_sql_aggregates_per_batch(context: Any) -> None:
    transform = make(
        context,
        "SELECT carrier, count(*) AS n FROM input GROUP BY carrier ORDER BY carrier",
    )
    first = transform.process(pa.RecordBatch.from_pylist(FLIGHTS[:2]))
    second = transform.process(pa.RecordBatch.from_pylist(FLIGHTS[2:]))
    assert first[0].to_pylist() == [
        {"carrier": "AA", "n": 1},
        {"carrier": "UA", "n": 1},
    ]
    assert second[0].to_pylist() == [
        {"carrier": "AA", "n": 1},
        {"carrier": "UA", "n": 1},
        {"carrier": None, "n": 1},  # Polars SQL sorts nulls last
    ]


def test_sql_failed_batch_rejected(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(FLIGHTS)
    strict = make(context, "SELECT CAST(code AS INTEGER) AS code FROM input")
    assert strict.process(batch) == []
    assert len(context.rejected) == len(FLIGHTS)
    reason = context.rejected[0][1]
    assert reason.startswith("SQL query failed on the batch with this record: ")
    assert "TRY_CAST" in reason

    lenient = make(context, "SELECT TRY_CAST(code AS INTEGER) AS code FROM input")
    [out] = lenient.process(batch)
    assert out.column("code").to_pylist() == [1, 2, None, 4, 5]


def test_sql_empty_batch(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(FLIGHTS).slice(0, 0)
    assert make(context, "SELECT count(*) AS n FROM input").process(batch) == []


def test_sql_invalid_queries(context: Any) -> None:
    schema = pa.RecordBatch.from_pylist(FLIGHTS).schema
    cases = [
        ("SELEC carrier FROM input", "invalid SQL query: sql parser error"),
        ("SELECT carrier FROM flights", "relation 'flights' was not found"),
        ("SELECT carrier, carrier FROM input", "invalid SQL query"),
        ("DROP TABLE input", "query must be a SELECT statement"),
        ("SHOW TABLES", "query must be a SELECT statement"),
    ]
    for query, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            make(context, query).output_schema([schema])
        assert e.value.where == "query"
    with pytest.raises(ValidationError, match="String should match pattern"):
        SqlTransform.Config(query="SELECT 1", table="my table")


def test_sql_misspelt_field_fails_build() -> None:
    p = Pipeline("sql-misspelt")
    rows = p.source("rows", "memory", records=FLIGHTS)
    speeds = p.transform(
        "speeds", "sql", [rows], query="SELECT carrier, distnce FROM input"
    )
    p.destination("out", "memory", [speeds])
    with pytest.raises(PipelineValidationError) as error:
        p.build()
    message = str(error.value)
    assert "transformations.speeds.config.query" in message
    assert "'distnce'" in message
    assert "'distance'" in message  # the suggested field


def test_sql_pipeline_matches_duckdb(tmp_path: Path) -> None:
    records = [
        {"id": i, "carrier": ["AA", "UA", "DL"][i % 3], "delay": (i * 7) % 40 - 10}
        for i in range(30)
    ]
    query = "SELECT id, carrier, delay * 2 AS double_delay FROM {table} WHERE delay > 0"
    p = Pipeline("sql-e2e")
    rows = p.source("rows", "memory", records=records, batch_rows=7)
    doubled = p.transform("doubled", "sql", [rows], query=query.format(table="input"))
    p.destination("out", "memory", [doubled])
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    out = p.run().output("out").sort_by("id")
    source = pa.Table.from_pylist(records)  # noqa: F841 - read by DuckDB by name
    expected = duckdb.sql(
        query.format(table="source") + " ORDER BY id"
    ).to_arrow_table()
    assert out.to_pylist() == expected.to_pylist()
    assert not (tmp_path / "dead.jsonl").exists()


def test_sql_pipeline_dead_letters(tmp_path: Path) -> None:
    p = Pipeline("sql-dead-letter")
    rows = p.source("rows", "memory", records=FLIGHTS)
    codes = p.transform(
        "codes", "sql", [rows], query="SELECT CAST(code AS INTEGER) AS code FROM input"
    )
    p.destination("out", "memory", [codes])
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    summary = p.run()
    assert summary.output("out").num_rows == 0
    lines = (tmp_path / "dead.jsonl").read_text().splitlines()
    dead = [json.loads(line) for line in lines]
    assert [entry["record"]["code"] for entry in dead] == [r["code"] for r in FLIGHTS]
    assert all(entry["step"] == "codes" for entry in dead)


# Rows of each batch that Polars SQL runs: none when the query runs on
# Arrow, EDGES only when NaN in a float comparison makes that batch fall
# back, and both batches for queries left to Polars.
ARROW: list[int] = []
NAN_ON_POLARS = [EDGES.num_rows]
POLARS = [EDGES.num_rows, NO_NAN.num_rows]
QUERIES = [
    (W3_QUERY, ARROW),
    ("SELECT * FROM input", ARROW),
    ("SELECT * FROM input WHERE i > 15", ARROW),
    ("select id, s as name, ls from input where s = 'JFK' or b", ARROW),
    ('SELECT "id", "s" FROM "input" WHERE NOT ("i" < 3)', ARROW),
    ("SELECT id, i + j AS sum, i * j AS product, -i AS negated FROM input", ARROW),
    ("SELECT id, small + 1 AS s1, small * 2 AS s2, 0 - u AS u0 FROM input", ARROW),
    ("SELECT id, small + 100 AS wide FROM input", ARROW),
    ("SELECT i - j, j FROM input", ARROW),  # an item without alias
    ("SELECT id, i IS NULL AS missing, b AND c AS both FROM input", ARROW),
    ("SELECT id, _event_time FROM input WHERE s IS NOT NULL AND i > 0", ARROW),
    ("SELECT id, f * 2 AS f2, f - g AS diff FROM input", ARROW),
    ("SELECT id FROM input WHERE f > 1", NAN_ON_POLARS),
    ("SELECT id, f = g AS same FROM input", NAN_ON_POLARS),
    ("SELECT id FROM input WHERE i > 10000", ARROW),  # no row kept
    ("SELECT id FROM input WHERE small > 1000", POLARS),  # literal widens the type
    ("SELECT id, small + 1000 AS wide FROM input", POLARS),
    ("SELECT id, i / 2 AS half FROM input", POLARS),
    ("SELECT id, f > 1.5 AS big FROM input", POLARS),  # decimal literal
    ("SELECT id, CAST(i AS DOUBLE) AS d FROM input", POLARS),
    ("SELECT id, upper(s) AS up FROM input", POLARS),
    ("SELECT id FROM input WHERE i IN (5, 16)", POLARS),
    ("SELECT id FROM input ORDER BY id DESC", POLARS),
    ("SELECT id FROM input LIMIT 3", POLARS),
    ("SELECT DISTINCT s FROM input", POLARS),
    ("SELECT s, count(*) AS n FROM input GROUP BY s ORDER BY s", POLARS),
    ("SELECT id -- the key\nFROM input", POLARS),
    ("SELECT id, (SELECT 1) AS one FROM input", POLARS),
    ("WITH t AS (SELECT * FROM input) SELECT id FROM t", POLARS),
]


def count_conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the row count of every non-empty batch converted to Polars."""
    rows: list[int] = []

    def counting(batch: pa.RecordBatch) -> pl.DataFrame:
        if batch.num_rows:
            rows.append(batch.num_rows)
        return to_polars(batch)

    monkeypatch.setattr(sql_module, "to_polars", counting)
    return rows


@pytest.mark.parametrize(("query", "converted"), QUERIES)
def test_sql_arrow_matches_polars(
    context: Any, monkeypatch: pytest.MonkeyPatch, query: str, converted: list[int]
) -> None:
    never_compile = staticmethod(lambda *args: None)
    with monkeypatch.context() as patch:
        patch.setattr(sql_module._ArrowQuery, "compile", never_compile)
        polars_path = make(context, query)
        expected = [polars_path.process(b) for b in (EDGES, NO_NAN)]
    schema = polars_path.output_schema([EDGES.schema])

    transform = make(context, query)
    conversions = count_conversions(monkeypatch)
    got = [transform.process(b) for b in (EDGES, NO_NAN)]

    assert [[b.schema for b in out] for out in got] == [
        [b.schema for b in out] for out in expected
    ]
    assert [rows(out, schema) for out in got] == [rows(out, schema) for out in expected]
    assert conversions == converted


def test_sql_arrow_matches_duckdb(context: Any) -> None:
    query = (
        "SELECT id, s, i - j AS gained, f * 2 AS f2 FROM {table} "
        "WHERE j > 0 AND j < 100 AND s IS NOT NULL"
    )
    edges = pa.Table.from_batches([EDGES])  # noqa: F841 - read by DuckDB by name
    expected = duckdb.sql(query.format(table="edges") + " ORDER BY id")
    assert expected is not None

    out = make(context, query.format(table="input")).process(EDGES)

    assert rows(out, out[0].schema) == rows(
        expected.to_arrow_table().to_batches(), out[0].schema
    )


def test_sql_arrow_keeps_input_types(context: Any) -> None:
    schema = pa.schema(
        [
            pa.field("n", pa.int32(), nullable=False),
            ("t", pa.large_string()),
            ("d", pa.date32()),
        ]
    )
    batch = pa.RecordBatch.from_pylist(
        [{"n": 1, "t": "a", "d": dt.date(2024, 1, 1)}], schema=schema
    )
    transform = make(context, "SELECT n, t, t AS u, d, n + 1 AS m FROM input")

    [out] = transform.process(batch)

    assert out.schema == pa.schema(
        [
            ("n", pa.int32()),
            ("t", pa.large_string()),
            ("u", pa.string()),
            ("d", pa.date32()),
            ("m", pa.int32()),
        ]
    )
    assert out.to_pylist() == [
        {"n": 1, "t": "a", "u": "a", "d": dt.date(2024, 1, 1), "m": 2}
    ]


def test_sql_arrow_string_view(context: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    values = ["a", "JFK", None, "a text longer than twelve bytes"]
    batch = pa.RecordBatch.from_pydict({"v": pa.array(values, pa.string_view())})
    transform = make(context, "SELECT v, v = 'JFK' AS jfk, v >= 'a' AS late FROM input")
    conversions = count_conversions(monkeypatch)

    [out] = transform.process(batch)

    assert out.schema == pa.schema(
        [("v", pa.string_view()), ("jfk", pa.bool_()), ("late", pa.bool_())]
    )
    assert out.column("jfk").to_pylist() == [False, True, None, False]
    assert out.column("late").to_pylist() == [True, False, None, True]
    assert conversions == []


def test_sql_context_created_on_first_fallback(context: Any) -> None:
    transform = make(context, "SELECT id FROM input WHERE f > 1")

    transform.process(NO_NAN)  # no NaN, so Arrow runs the query
    assert transform._context is None

    transform.process(EDGES)  # a compared float is NaN, so Polars SQL runs it
    first_context = transform._context
    assert first_context is not None

    transform.process(EDGES)
    assert transform._context is first_context


@pytest.mark.parametrize(
    "query",
    [
        "SELECT id, i, s, i - j AS gained, b FROM input",
        "SELECT i - j AS gained, id, small + 1 AS more, ls FROM input WHERE b",
        "SELECT _event_time, id, u FROM input",
    ],
)
def test_sql_arrow_takes_named_columns_whole(
    context: Any, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    """Items that only name a column are taken with one select; same result."""
    with monkeypatch.context() as patch:
        patch.setattr(sql_module._ArrowQuery, "compile", staticmethod(lambda *a: None))
        polars_path = make(context, query)
        expected = [polars_path.process(EDGES.slice(i, 2)) for i in range(8)]
    transform = make(context, query)
    conversions = count_conversions(monkeypatch)

    got = [transform.process(EDGES.slice(i, 2)) for i in range(8)]

    arrow = transform._plan(EDGES.schema).arrow
    assert arrow is not None and arrow.layout is not None
    schema = polars_path.output_schema([EDGES.schema])
    assert [[b.schema for b in out] for out in got] == [
        [b.schema for b in out] for out in expected
    ]
    assert [rows(out, schema) for out in got] == [rows(out, schema) for out in expected]
    assert conversions == []


def test_sql_arrow_renamed_columns_built_from_arrays(context: Any) -> None:
    transform = make(context, "SELECT id AS n, i - j AS gained FROM input")

    [out] = transform.process(NO_NAN)

    arrow = transform._plan(NO_NAN.schema).arrow
    assert arrow is not None and arrow.layout is None  # a select keeps names
    assert out.schema.names == ["n", "gained"]
    assert out.column("n").equals(NO_NAN.column("id"))


def test_sql_arrow_drops_schema_metadata(context: Any) -> None:
    batch = NO_NAN.replace_schema_metadata({"origin": "x"})
    transform = make(context, "SELECT id, i - j AS gained FROM input")

    [out] = transform.process(batch)

    arrow = transform._plan(batch.schema).arrow
    assert arrow is not None and arrow.layout is not None
    assert out.schema.metadata is None
    assert out.schema == transform.output_schema([batch.schema])

"""Tests of the `sql` transformation."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from pydantic import ValidationError

from dataflare import Pipeline, PipelineValidationError
from dataflare.plugin.interface import ConfigError
from dataflare.transforms.sql import SqlTransform

UTC = dt.UTC
FLIGHTS = [
    {"carrier": "AA", "distance": 1000.0, "air_time": 120.0, "code": "1"},
    {"carrier": "UA", "distance": 500.0, "air_time": 0.0, "code": "2"},
    {"carrier": "AA", "distance": 1500.0, "air_time": None, "code": "x"},
    {"carrier": None, "distance": 300.0, "air_time": 60.0, "code": "4"},
    {"carrier": "UA", "distance": 2000.0, "air_time": 240.0, "code": "5"},
]
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

"""Tests of the `join` transformation (stream-to-table lookup join)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from pydantic import ValidationError

from dataflare import Pipeline, PipelineValidationError
from dataflare.plugin.interface import ConfigError
from dataflare.transforms.join import STREAM, TABLE, JoinTransform

UTC = dt.UTC
STREAM_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("plane", pa.string()),
        ("_event_time", pa.timestamp("us", "UTC")),
    ]
)
TABLE_SCHEMA = pa.schema(
    [
        ("plane", pa.string()),
        ("model", pa.string()),
        ("seats", pa.int32()),
        ("id", pa.int64()),
    ]
)
EVENTS = [
    {"id": 1, "plane": "N1", "_event_time": dt.datetime(2024, 1, 1, tzinfo=UTC)},
    {"id": 2, "plane": "N9", "_event_time": dt.datetime(2024, 1, 2, tzinfo=UTC)},
    {"id": 3, "plane": None, "_event_time": dt.datetime(2024, 1, 3, tzinfo=UTC)},
    {"id": 4, "plane": "N2", "_event_time": dt.datetime(2024, 1, 4, tzinfo=UTC)},
]
PLANES = [
    {"plane": "N1", "model": "A320", "seats": 150, "id": 100},
    {"plane": "N2", "model": "B737", "seats": 160, "id": 200},
    {"plane": "N2", "model": "B738", "seats": 170, "id": 201},
    {"plane": None, "model": "ghost", "seats": 0, "id": 300},
]


def make(context: Any, **config: Any) -> JoinTransform:
    transform = JoinTransform(JoinTransform.Config.model_validate(config), context)
    transform.output_schema([STREAM_SCHEMA, TABLE_SCHEMA])
    transform.open()
    return transform


def events(rows: list[dict[str, Any]] = EVENTS) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=STREAM_SCHEMA)


def planes(rows: list[dict[str, Any]] = PLANES) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=TABLE_SCHEMA)


def joined_rows(batches: list[pa.RecordBatch]) -> list[dict[str, Any]]:
    return [row for batch in batches for row in batch.to_pylist()]


def test_join_holds_stream_until_table_ends(context: Any) -> None:
    transform = make(context, on="plane", fields=["model"])
    assert transform.process(events(EVENTS[:2]), STREAM) == []
    assert transform.process(planes(), TABLE) == []
    out = transform.on_input_end(TABLE)
    assert [(r["id"], r["model"]) for r in joined_rows(out)] == [(1, "A320")]
    later = transform.process(events(EVENTS[2:]), STREAM)
    assert [(r["id"], r["model"]) for r in joined_rows(later)] == [(4, "B738")]
    assert context.counters["unmatched"] == 2


def test_join_left_keeps_unmatched(context: Any) -> None:
    transform = make(context, on="plane", how="left")
    transform.process(planes(), TABLE)
    transform.on_input_end(TABLE)
    [out] = transform.process(events(), STREAM)
    assert out.schema.names == [
        "id",
        "plane",
        "_event_time",
        "model",
        "seats",
        "id_right",
    ]
    assert out.schema.field("seats").type == pa.int32()
    assert out.column("_event_time").equals(events().column("_event_time"))
    assert [(r["id"], r["model"], r["id_right"]) for r in out.to_pylist()] == [
        (1, "A320", 100),
        (2, None, None),
        (3, None, None),  # null keys never match
        (4, "B738", 201),  # the last table row of a key wins
    ]


def test_join_finish_joins_held_records(context: Any) -> None:
    transform = make(context, on="plane", how="left", fields=["seats"], suffix="_t")
    transform.process(events(), STREAM)
    transform.process(planes(PLANES[:1]), TABLE)
    out = transform.finish()
    assert [r["seats"] for r in joined_rows(out)] == [150, None, None, None]
    assert transform.finish() == []


def test_join_empty_table(context: Any) -> None:
    left = make(context, on="plane", how="left", fields=["model", "id"])
    left.process(events(), STREAM)
    [out] = left.finish()
    assert out.schema.names == ["id", "plane", "_event_time", "model", "id_right"]
    assert out.schema.field("model").type == pa.string()
    assert out.column("model").null_count == len(EVENTS)
    inner = make(context, on="plane")
    inner.process(events(), STREAM)
    assert inner.finish() == []


def test_join_empty_stream_batch(context: Any) -> None:
    transform = make(context, on="plane")
    transform.process(planes(), TABLE)
    transform.on_input_end(TABLE)
    assert transform.process(events([]), STREAM) == []


def test_join_different_key_names_and_types(context: Any) -> None:
    stream = pa.schema([("tail", pa.int64()), ("x", pa.string())])
    table = pa.schema([("number", pa.int32()), ("x", pa.string())])
    transform = JoinTransform(
        JoinTransform.Config(left_on="tail", right_on=["number"], suffix="_table"),
        context,
    )
    assert transform.output_schema([stream, table]).names == ["tail", "x", "x_table"]
    transform.open()
    transform.process(
        pa.RecordBatch.from_pylist([{"number": 7, "x": "seven"}], schema=table), TABLE
    )
    transform.on_input_end(TABLE)
    batch = pa.RecordBatch.from_pylist(
        [{"tail": 7, "x": "a"}, {"tail": 8, "x": "b"}], schema=stream
    )
    [out] = transform.process(batch, STREAM)
    assert out.to_pylist() == [{"tail": 7, "x": "a", "x_table": "seven"}]


def test_join_parallel_needs_same_keys(context: Any) -> None:
    context.parallelism = 2
    renamed = JoinTransform(JoinTransform.Config(left_on="a", right_on="b"), context)
    with pytest.raises(ValueError, match="needs the same key names on both sides"):
        renamed.open()

    stream = pa.schema([("k", pa.int64())])
    table = pa.schema([("k", pa.int32()), ("v", pa.string())])
    transform = JoinTransform(JoinTransform.Config(on="k"), context)
    transform.output_schema([stream, table])
    transform.open()
    transform.process(pa.RecordBatch.from_pylist([{"k": 1, "v": "x"}], schema=table), 1)
    transform.on_input_end(TABLE)
    batch = pa.RecordBatch.from_pylist([{"k": 1}], schema=stream)
    with pytest.raises(ValueError, match="key 'k' needs one type on both sides"):
        transform.process(batch, STREAM)


def test_join_buffer_limit(context: Any) -> None:
    transform = make(context, on="plane", max_buffered_rows=3)
    with pytest.raises(ValueError, match="raise max_buffered_rows"):
        transform.process(events(), STREAM)


def test_join_config_errors(context: Any) -> None:
    with pytest.raises(ValidationError, match="set the join key"):
        JoinTransform.Config()
    with pytest.raises(ValidationError, match="not both"):
        JoinTransform.Config(on="a", left_on="a", right_on="b")
    with pytest.raises(ValidationError, match="give both the same number"):
        JoinTransform.Config(left_on=["a", "b"], right_on="a")
    mismatched = pa.schema([("plane", pa.int64())])
    with pytest.raises(ConfigError, match="join key 'plane' is string in the stream"):
        JoinTransform(JoinTransform.Config(on="plane"), context).output_schema(
            [STREAM_SCHEMA, mismatched]
        )
    clash = JoinTransform(JoinTransform.Config(on="plane", suffix="_x"), context)
    with pytest.raises(ConfigError, match="would be named 'id_x'") as e:
        clash.output_schema(
            [STREAM_SCHEMA.append(pa.field("id_x", pa.int8())), TABLE_SCHEMA]
        )
    assert e.value.where == "suffix"


@pytest.mark.parametrize(
    ("config", "path", "name"),
    [
        ({"on": "plnae"}, "transformations.joined.config.on", "'plnae'"),
        (
            {"on": "plane", "fields": ["modl"]},
            "transformations.joined.config.fields",
            "'modl'",
        ),
    ],
)
def test_join_misspelt_field_fails_build(
    config: dict[str, Any], path: str, name: str
) -> None:
    p = Pipeline("join-misspelt")
    stream = p.source("events", "memory", records=[{"plane": "N1"}])
    table = p.source("planes", "memory", records=[{"plane": "N1", "model": "A320"}])
    joined = p.transform("joined", "join", [stream, table], **config)
    p.destination("out", "memory", [joined])
    with pytest.raises(PipelineValidationError) as error:
        p.build()
    message = str(error.value)
    assert path in message
    assert name in message


def test_join_pipeline_matches_duckdb() -> None:
    flights = [{"n": i, "tail": f"T{i % 7}", "delay": i * 3} for i in range(40)]
    tails = [
        {"tail": f"T{i}", "maker": f"M{i}", "version": v}
        for v in (1, 2)
        for i in range(5)
    ]
    p = Pipeline("join-e2e")
    stream = p.source("flights", "memory", records=flights, batch_rows=6)
    table = p.source("tails", "memory", records=tails, batch_rows=3)
    joined = p.transform(
        "joined", "join", [stream, table], on="tail", how="left", parallelism=2
    )
    p.destination("out", "memory", [joined])
    out = p.run().output("out").sort_by("n")

    flight_table = pa.Table.from_pylist(flights)  # noqa: F841 - read by DuckDB
    tail_table = pa.Table.from_pylist(tails)  # noqa: F841 - read by DuckDB
    expected = duckdb.sql(
        "WITH latest AS (SELECT tail, maker, version FROM tail_table "
        "QUALIFY row_number() OVER (PARTITION BY tail ORDER BY version DESC) = 1) "
        "SELECT f.n, f.tail, f.delay, latest.maker, latest.version "
        "FROM flight_table AS f LEFT JOIN latest USING (tail) ORDER BY f.n"
    ).to_arrow_table()
    assert out.schema.names == ["n", "tail", "delay", "maker", "version"]
    assert out.to_pylist() == expected.to_pylist()

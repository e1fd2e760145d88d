"""Tests of the `aggregate` transformation."""

from __future__ import annotations

import random
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pytest
from pydantic import ValidationError

from dataflare import Pipeline, PipelineValidationError
from dataflare.plugin.interface import ConfigError
from dataflare.transforms.aggregate import AggregateTransform

AGGREGATIONS = {
    "records": {"fn": "count"},
    "delays": {"fn": "count", "field": "delay"},
    "total": {"fn": "sum", "field": "delay"},
    "mean": {"fn": "mean", "field": "delay"},
    "low": {"fn": "min", "field": "delay"},
    "high": {"fn": "max", "field": "dest"},
    "dests": {"fn": "count_distinct", "field": "dest"},
    "p90": {"fn": "percentile", "field": "delay", "q": 0.9},
}


def flights(count: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "carrier": rng.choice(["AA", "UA", "DL", None]),
            "delay": rng.choice([None, *range(-10, 60)]),
            "dest": rng.choice(["BOS", "LAX", "ORD", None]),
        }
        for _ in range(count)
    ]


def make(context: Any, schema: pa.Schema, **config: Any) -> AggregateTransform:
    config = AggregateTransform.Config.model_validate(config)
    transform = AggregateTransform(config, context)
    transform.output_schema([schema])
    transform.open()
    return transform


def expected_per_carrier(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Compute the aggregations with pandas, independently of the transform."""
    frame = pd.DataFrame(records)
    grouped = frame.groupby("carrier", dropna=False)
    result = grouped.agg(
        records=("delay", "size"),
        delays=("delay", "count"),
        total=("delay", lambda v: v.sum(min_count=1)),
        mean=("delay", "mean"),
        low=("delay", "min"),
        high=("dest", lambda v: v.dropna().max() if v.notna().any() else None),
        dests=("dest", "nunique"),
        p90=("delay", lambda v: v.quantile(0.9)),
    )
    return result.reset_index()


def assert_matches(out: pa.Table, expected: pd.DataFrame) -> None:
    null_key = "(null)"  # a null carrier is a group of its own
    actual = out.to_pandas().fillna({"carrier": null_key}).set_index("carrier")
    reference = expected.fillna({"carrier": null_key}).set_index("carrier")
    actual, reference = actual.sort_index(), reference.sort_index()
    assert list(actual.index) == list(reference.index)
    for column in ["records", "delays", "dests"]:
        assert actual[column].tolist() == reference[column].tolist(), column
    for column in ["total", "mean", "low", "p90"]:
        assert actual[column].tolist() == pytest.approx(reference[column].tolist()), (
            column
        )
    assert actual["high"].tolist() == reference["high"].tolist()


def test_aggregate_matches_pandas(context: Any) -> None:
    records = flights(300)
    table = pa.Table.from_pylist(records)
    transform = make(
        context, table.schema, group_by=["carrier"], aggregations=AGGREGATIONS
    )
    for batch in table.to_batches(max_chunksize=37):
        assert transform.process(batch) == []
    out = pa.Table.from_batches(transform.finish())
    assert out.schema.names == ["carrier", *AGGREGATIONS]
    assert out.schema.field("total").type == pa.int64()
    assert out.schema.field("mean").type == pa.float64()
    assert out.schema.field("high").type == pa.string()
    assert_matches(out, expected_per_carrier(records))


def test_aggregate_all_null_group(context: Any) -> None:
    schema = pa.schema([("k", pa.string()), ("x", pa.int32())])
    batch = pa.RecordBatch.from_pylist(
        [{"k": "a", "x": None}, {"k": "a", "x": None}, {"k": "b", "x": 2}],
        schema=schema,
    )
    transform = make(
        context,
        schema,
        group_by=["k"],
        aggregations={
            "n": {"fn": "count", "field": "x"},
            "s": {"fn": "sum", "field": "x"},
            "d": {"fn": "count_distinct", "field": "x"},
            "p": {"fn": "percentile", "field": "x", "q": 0.5},
        },
    )
    transform.process(batch)
    [out] = transform.finish()
    assert out.to_pylist() == [
        {"k": "a", "n": 0, "s": None, "d": 0, "p": None},
        {"k": "b", "n": 1, "s": 2, "d": 1, "p": 2.0},
    ]


def test_aggregate_global_without_records(context: Any) -> None:
    schema = pa.schema([("x", pa.float64())])
    transform = make(
        context,
        schema,
        aggregations={
            "n": {"fn": "count"},
            "s": {"fn": "sum", "field": "x"},
            "m": {"fn": "max", "field": "x"},
        },
    )
    assert transform.process(pa.RecordBatch.from_pylist([], schema=schema)) == []
    [out] = transform.finish()
    source = schema.empty_table()  # noqa: F841 - read by DuckDB by name
    expected = duckdb.sql("SELECT count(*) AS n, sum(x) AS s, max(x) AS m FROM source")
    assert out.to_pylist() == expected.to_arrow_table().to_pylist()


def test_aggregate_global_matches_duckdb(context: Any) -> None:
    table = pa.Table.from_pylist(flights(120, seed=3))
    transform = make(
        context,
        table.schema,
        aggregations={
            "n": {"fn": "count"},
            "s": {"fn": "sum", "field": "delay"},
            "d": {"fn": "count_distinct", "field": "dest"},
        },
    )
    for batch in table.to_batches(max_chunksize=50):
        transform.process(batch)
    [out] = transform.finish()
    source = table  # noqa: F841 - read by DuckDB by name
    expected = duckdb.sql(
        "SELECT count(*) AS n, sum(delay) AS s, count(DISTINCT dest) AS d FROM source"
    ).to_arrow_table()
    assert out.to_pylist() == expected.to_pylist()


def test_aggregate_emit_every(context: Any) -> None:
    schema = pa.schema([("k", pa.string()), ("x", pa.int64())])
    transform = make(
        context,
        schema,
        group_by=["k"],
        aggregations={"s": {"fn": "sum", "field": "x"}},
        emit_every=3,
    )
    first = transform.process(
        pa.RecordBatch.from_pylist(
            [{"k": "a", "x": 1}, {"k": "b", "x": 2}], schema=schema
        )
    )
    second = transform.process(
        pa.RecordBatch.from_pylist([{"k": "a", "x": 10}], schema=schema)
    )
    third = transform.process(
        pa.RecordBatch.from_pylist(
            [{"k": "c", "x": 5}, {"k": "c", "x": 5}, {"k": "c", "x": 5}], schema=schema
        )
    )
    assert first == []
    assert [row for b in second for row in b.to_pylist()] == [
        {"k": "a", "s": 11},
        {"k": "b", "s": 2},
    ]
    assert [row for b in third for row in b.to_pylist()] == [{"k": "c", "s": 15}]
    final = [row for b in transform.finish() for row in b.to_pylist()]
    assert final == [{"k": "a", "s": 11}, {"k": "b", "s": 2}, {"k": "c", "s": 15}]


def test_aggregate_partition_key(context: Any) -> None:
    config = AggregateTransform.Config.model_validate(
        {"group_by": ["carrier", "dest"], "aggregations": {"n": {"fn": "count"}}}
    )
    assert AggregateTransform(config, context).partition_key() == ["carrier", "dest"]
    config = AggregateTransform.Config.model_validate(
        {"aggregations": {"n": {"fn": "count"}}}
    )
    assert AggregateTransform(config, context).partition_key() is None


def test_aggregate_config_errors(context: Any) -> None:
    def config(**values: Any) -> Any:
        return AggregateTransform.Config.model_validate(values)

    with pytest.raises(ValidationError, match="'sum' needs 'field'"):
        config(aggregations={"s": {"fn": "sum"}})
    with pytest.raises(ValidationError, match="percentile needs 'q'"):
        config(aggregations={"p": {"fn": "percentile", "field": "x"}})
    with pytest.raises(ValidationError, match="'q' applies only to percentile"):
        config(aggregations={"m": {"fn": "max", "field": "x", "q": 0.5}})
    with pytest.raises(ValidationError, match="name of a group_by field"):
        config(group_by=["k"], aggregations={"k": {"fn": "count"}})
    schema = pa.schema([("name", pa.string())])
    mean = AggregateTransform(
        config(aggregations={"m": {"fn": "mean", "field": "name"}}), context
    )
    with pytest.raises(
        ConfigError, match="mean needs a numeric field, but 'name'"
    ) as e:
        mean.output_schema([schema])
    assert e.value.where == "aggregations.m.field"


@pytest.mark.parametrize(
    ("config", "path"),
    [
        (
            {"group_by": ["carier"], "aggregations": {"n": {"fn": "count"}}},
            "transformations.stats.config",
        ),
        (
            {"aggregations": {"t": {"fn": "sum", "field": "dealy"}}},
            "transformations.stats.config.aggregations.t.field",
        ),
    ],
)
def test_aggregate_misspelt_field_fails_build(
    config: dict[str, Any], path: str
) -> None:
    p = Pipeline("aggregate-misspelt")
    rows = p.source("rows", "memory", records=flights(3))
    stats = p.transform("stats", "aggregate", [rows], **config)
    p.destination("out", "memory", [stats])
    with pytest.raises(PipelineValidationError) as error:
        p.build()
    message = str(error.value)
    assert path in message
    assert "carrier, delay, dest" in message  # the fields that exist


def test_aggregate_pipeline_parallel(tmp_path: Any) -> None:
    records = flights(500, seed=11)
    p = Pipeline("aggregate-e2e")
    rows = p.source("rows", "memory", records=records, batch_rows=64)
    stats = p.transform(
        "stats",
        "aggregate",
        [rows],
        parallelism=3,
        group_by=["carrier"],
        aggregations=AGGREGATIONS,
    )
    p.destination("out", "memory", [stats])
    out = p.run().output("out")
    assert out.num_rows == 4
    assert_matches(out, expected_per_carrier(records))

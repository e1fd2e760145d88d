"""Tests of the `flatten` and `explode` transformations."""

from __future__ import annotations

import datetime as dt
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from dataflare import Pipeline, PipelineValidationError
from dataflare.plugin.interface import ConfigError
from dataflare.transforms.flatten import ExplodeTransform, FlattenTransform

UTC = dt.UTC
EVENTS = [
    {
        "id": 1,
        "user": {"name": "ann", "address": {"city": "Paris", "zip": "75001"}},
        "items": [10, 20],
    },
    {"id": 2, "user": None, "items": None},
    {"id": 3, "user": {"name": None, "address": None}, "items": []},
    {
        "id": 4,
        "user": {"name": "dee", "address": {"city": "Berlin", "zip": None}},
        "items": [None, 40],
    },
]


def flatten(context: Any, **config: Any) -> FlattenTransform:
    return FlattenTransform(FlattenTransform.Config.model_validate(config), context)


def explode(context: Any, **config: Any) -> ExplodeTransform:
    return ExplodeTransform(ExplodeTransform.Config.model_validate(config), context)


def test_flatten_matches_pandas_json_normalize(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(EVENTS)
    transform = flatten(context)
    schema = transform.output_schema([batch.schema])
    [out] = transform.process(batch)
    expected = pd.json_normalize(
        [{k: v for k, v in e.items() if k != "items"} for e in EVENTS], sep="."
    )
    assert schema.names == [
        "id",
        "user.name",
        "user.address.city",
        "user.address.zip",
        "items",
    ]
    assert out.schema == schema
    for name in ["user.name", "user.address.city", "user.address.zip"]:
        expected_values = (
            expected[name].astype(object).where(expected[name].notna(), None)
        )
        assert out.column(name).to_pylist() == expected_values.tolist(), name


def test_flatten_separator_one_level(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(EVENTS)
    [out] = flatten(context, separator="_", recursive=False).process(batch)
    assert out.schema.names == ["id", "user_name", "user_address", "items"]
    assert out.column("user_address").to_pylist() == [
        {"city": "Paris", "zip": "75001"},
        None,
        None,
        {"city": "Berlin", "zip": None},
    ]


def test_flatten_selected_fields_and_event_time(context: Any) -> None:
    times = pa.array(
        [dt.datetime(2024, 1, 1, tzinfo=UTC)] * 2, pa.timestamp("us", "UTC")
    )
    batch = pa.RecordBatch.from_arrays(
        [pa.array([{"x": 1}, {"x": 2}]), pa.array([{"y": 3}, None]), times],
        names=["a", "b", "_event_time"],
    )
    [out] = flatten(context, fields=["b"]).process(batch)
    assert out.schema.names == ["a", "b.y", "_event_time"]
    assert out.column("b.y").to_pylist() == [3, None]
    assert out.column("_event_time").equals(times)


def test_flatten_name_clash(context: Any) -> None:
    schema = pa.schema([("a", pa.struct([("b", pa.int64())])), ("a_b", pa.int64())])
    with pytest.raises(ConfigError, match="two fields named 'a_b'") as e:
        flatten(context, separator="_").output_schema([schema])
    assert e.value.where == "separator"
    assert flatten(context).output_schema([schema]).names == ["a.b", "a_b"]


def test_flatten_non_struct_field(context: Any) -> None:
    schema = pa.schema([("a", pa.int64())])
    with pytest.raises(ConfigError, match="field 'a' in fields is int64, not a struct"):
        flatten(context, fields=["a"]).output_schema([schema])


def test_flatten_empty_batch(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(EVENTS).slice(0, 0)
    assert flatten(context).process(batch) == []


def test_explode_drops_empty_lists(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(EVENTS)
    transform = explode(context, field="items")
    schema = transform.output_schema([batch.schema])
    [out] = transform.process(batch)
    assert schema.field("items").type == pa.int64()
    assert out.schema == schema
    events = pa.Table.from_batches([batch]).select(["id", "items"])  # noqa: F841
    expected = duckdb.sql(
        "SELECT id, unnest(items) AS items FROM events ORDER BY id"
    ).to_arrow_table()
    assert out.column("id").to_pylist() == expected.column("id").to_pylist()
    assert out.column("items").to_pylist() == expected.column("items").to_pylist()
    assert out.column("user").to_pylist()[0] == EVENTS[0]["user"]
    assert context.counters["empty_lists"] == 2


def test_explode_keep_empty(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(EVENTS)
    [out] = explode(context, field="items", keep_empty=True).process(batch)
    rows = [(r["id"], r["items"]) for r in out.to_pylist()]
    assert rows == [(1, 10), (1, 20), (2, None), (3, None), (4, None), (4, 40)]
    assert "empty_lists" not in context.counters


def test_explode_sliced_batch(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(EVENTS).slice(2)
    [out] = explode(context, field="items", keep_empty=True).process(batch)
    assert [(r["id"], r["items"]) for r in out.to_pylist()] == [
        (3, None),
        (4, None),
        (4, 40),
    ]


def test_explode_only_empty_lists(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(EVENTS[1:3])
    assert explode(context, field="items").process(batch) == []
    assert explode(context, field="items").process(batch.slice(0, 0)) == []


def test_explode_errors(context: Any) -> None:
    schema = pa.schema([("id", pa.int64()), ("items", pa.list_(pa.int64()))])
    with pytest.raises(ConfigError, match="field 'id' is int64, not a list"):
        explode(context, field="id").output_schema([schema])
    with pytest.raises(ValueError, match="field 'itms' in field not found"):
        explode(context, field="itms").output_schema([schema])


@pytest.mark.parametrize(
    ("step_type", "config", "path", "name"),
    [
        ("flatten", {"fields": ["usr"]}, "transformations.step.config.fields", "'usr'"),
        ("explode", {"field": "itms"}, "transformations.step.config.field", "'itms'"),
    ],
)
def test_misspelt_field_fails_build(
    step_type: str, config: dict[str, Any], path: str, name: str
) -> None:
    p = Pipeline("flatten-misspelt")
    rows = p.source("rows", "memory", records=EVENTS)
    step = p.transform("step", step_type, [rows], **config)
    p.destination("out", "memory", [step])
    with pytest.raises(PipelineValidationError) as error:
        p.build()
    message = str(error.value)
    assert path in message
    assert name in message


def test_flatten_explode_pipeline() -> None:
    p = Pipeline("flatten-e2e")
    rows = p.source("rows", "memory", records=EVENTS, batch_rows=3)
    flat = p.transform("flat", "flatten", [rows], separator="_")
    items = p.transform("items", "explode", [flat], field="items")
    p.destination("out", "memory", [items])
    summary = p.run()
    out = summary.output("out")
    assert out.schema.names == [
        "id",
        "user_name",
        "user_address_city",
        "user_address_zip",
        "items",
    ]
    assert [(r["id"], r["user_address_city"], r["items"]) for r in out.to_pylist()] == [
        (1, "Paris", 10),
        (1, "Paris", 20),
        (4, "Berlin", None),
        (4, "Berlin", 40),
    ]
    assert summary.step("items").counters["empty_lists"] == 2

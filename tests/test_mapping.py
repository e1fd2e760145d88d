"""Tests of the `mapping` transformation."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from pydantic import ValidationError

from dataflare import Pipeline, PipelineValidationError
from dataflare.plugin.interface import ConfigError
from dataflare.transforms.mapping import MappingTransform

UTC = dt.UTC
EVENT_TIME_TYPE = pa.timestamp("us", tz="UTC")

USERS = [
    {"id": "1", "name": " Ann ", "country": "fr", "score": "1.5", "extra": 10},
    {"id": "x", "name": "Bob", "country": None, "score": "2", "extra": 20},
    {"id": "3", "name": None, "country": "de", "score": None, "extra": 30},
    {"id": "4", "name": "Dee", "country": None, "score": "", "extra": 40},
]


def make(context: Any, **config: Any) -> MappingTransform:
    transform = MappingTransform(
        MappingTransform.Config.model_validate(config), context
    )
    transform.open()
    return transform


def test_mapping_builds_nested_structs(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(USERS)
    transform = make(
        context,
        mappings=[
            {"source": "id", "destination": "user.id", "transform": "int"},
            {"source": "name", "destination": "user.name", "transform": "trim"},
            {"source": "country", "destination": "country", "transform": "uppercase"},
        ],
    )
    schema = transform.output_schema([batch.schema])
    [out] = transform.process(batch)
    user_type = pa.struct([("id", pa.int64()), ("name", pa.string())])
    assert schema == pa.schema([("user", user_type), ("country", pa.string())])
    assert out.schema == schema
    assert out.to_pylist() == [
        {"user": {"id": 1, "name": "Ann"}, "country": "FR"},
        {"user": {"id": 3, "name": None}, "country": "DE"},
        {"user": {"id": 4, "name": "Dee"}, "country": None},
    ]


def test_mapping_rejects_unconvertible_value(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(USERS)
    transform = make(
        context, mappings=[{"source": "id", "destination": "id", "transform": "int"}]
    )
    [out] = transform.process(batch)
    assert out.column("id").to_pylist() == [1, 3, 4]
    [(record, reason, _)] = context.rejected
    assert record == USERS[1]
    assert reason == "field 'id' value 'x' is not an integer of type int64"


def test_mapping_default_fills_nulls(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(USERS)
    transform = make(
        context,
        mappings=[
            {"source": "country", "destination": "country", "default": "ZZ"},
            {
                "source": "score",
                "destination": "score",
                "transform": "float",
                "default": 0,
            },
            {
                "source": "name",
                "destination": "name",
                "transform": "lowercase",
                "default": "anonymous",
            },
        ],
    )
    [out] = transform.process(batch)
    frame = pd.DataFrame(USERS)
    expected_score = pd.to_numeric(frame["score"].replace("", None)).fillna(0.0)
    assert out.column("country").to_pylist() == frame["country"].fillna("ZZ").tolist()
    assert out.column("score").to_pylist() == expected_score.tolist()
    assert out.column("name").to_pylist() == [" ann ", "bob", "anonymous", "dee"]
    assert context.rejected == []


def test_mapping_timestamp_default_and_format(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(
        [{"signup": "02/01/2024 10:00"}, {"signup": None}, {"signup": "2024-01-02"}]
    )
    transform = make(
        context,
        mappings=[
            {
                "source": "signup",
                "destination": "signed_up_at",
                "transform": "timestamp",
                "format": "%d/%m/%Y %H:%M",
                "default": "1970-01-01T00:00:00Z",
            },
        ],
    )
    [out] = transform.process(batch)
    assert out.schema.field("signed_up_at").type == EVENT_TIME_TYPE
    assert out.column("signed_up_at").to_pylist() == [
        dt.datetime(2024, 1, 2, 10, tzinfo=UTC),
        dt.datetime(1970, 1, 1, tzinfo=UTC),
    ]
    [(_, reason, _)] = context.rejected
    assert reason == (
        "field 'signup' value '2024-01-02' is not a timestamp "
        "in format '%d/%m/%Y %H:%M'"
    )


def test_mapping_keep_unmapped_and_event_time(context: Any) -> None:
    times = pa.array(
        [dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 1, 2, tzinfo=UTC)],
        EVENT_TIME_TYPE,
    )
    batch = pa.RecordBatch.from_arrays(
        [pa.array([1, 2]), times, pa.array(["a", "b"]), pa.array([True, False])],
        names=["id", "_event_time", "label", "flag"],
    )
    mappings = [
        {"source": "id", "destination": "key", "transform": "string"},
        {"source": "flag", "destination": "label"},
    ]
    only_mapped = make(context, mappings=mappings)
    keep_all = make(context, mappings=mappings, keep_unmapped=True)
    [narrow] = only_mapped.process(batch)
    [wide] = keep_all.process(batch)
    assert narrow.schema.names == ["key", "label", "_event_time"]
    assert wide.schema.names == ["key", "label", "_event_time"]
    assert narrow.column("_event_time").equals(times)
    assert narrow.column("key").to_pylist() == ["1", "2"]
    assert narrow.column("label").to_pylist() == [True, False]

    extra = batch.append_column("note", pa.array(["n1", "n2"]))
    [with_note] = keep_all.process(extra)
    assert with_note.schema.names == ["key", "label", "note", "_event_time"]


def test_mapping_reads_struct_field(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(
        [{"addr": {"city": "Paris", "zip": "75001"}}, {"addr": None}]
    )
    transform = make(
        context,
        mappings=[
            {"source": "addr.city", "destination": "city", "transform": "uppercase"},
            {"source": "addr.zip", "destination": "zip", "transform": "int"},
        ],
    )
    [out] = transform.process(batch)
    assert out.to_pylist() == [
        {"city": "PARIS", "zip": 75001},
        {"city": None, "zip": None},
    ]


def test_mapping_empty_batch(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist([], schema=pa.schema([("id", pa.string())]))
    transform = make(context, mappings=[{"source": "id", "destination": "a.b"}])
    assert transform.process(batch) == []


def test_mapping_config_errors() -> None:
    def config(mappings: list[dict[str, Any]]) -> Any:
        return MappingTransform.Config.model_validate({"mappings": mappings})

    with pytest.raises(ValidationError, match="both write 'user'"):
        config(
            [
                {"source": "a", "destination": "user"},
                {"source": "b", "destination": "user.name"},
            ]
        )
    with pytest.raises(ValidationError, match="reserved stream column"):
        config([{"source": "a", "destination": "_event_time"}])
    with pytest.raises(ValidationError, match="'format' applies only"):
        config([{"source": "a", "destination": "b", "format": "%Y"}])
    with pytest.raises(ValidationError, match=r"invalid destination 'a\.\.b'"):
        config([{"source": "a", "destination": "a..b"}])
    with pytest.raises(ValidationError, match="Input should be 'uppercase'"):
        config([{"source": "a", "destination": "b", "transform": "reverse"}])


def test_mapping_type_errors(context: Any) -> None:
    schema = pa.schema([("n", pa.int64()), ("s", pa.string())])
    upper = make(
        context,
        mappings=[{"source": "n", "destination": "n", "transform": "uppercase"}],
    )
    with pytest.raises(
        ConfigError, match="needs a string field, but 'n' is int64"
    ) as e:
        upper.output_schema([schema])
    assert e.value.where == "mappings.0.transform"
    bad_default = make(
        context,
        mappings=[
            {"source": "s", "destination": "n", "transform": "int", "default": "none"}
        ],
    )
    with pytest.raises(
        ConfigError, match="invalid default 'none' for destination"
    ) as e:
        bad_default.output_schema([schema])
    assert e.value.where == "mappings.0.default"


def test_mapping_misspelt_source_fails_build() -> None:
    p = Pipeline("mapping-misspelt")
    rows = p.source("rows", "memory", records=[{"name": "a", "addr": {"city": "P"}}])
    mapped = p.transform(
        "mapped",
        "mapping",
        [rows],
        mappings=[
            {"source": "name", "destination": "n"},
            {"source": "addr.cty", "destination": "city"},
        ],
    )
    p.destination("out", "memory", [mapped])
    with pytest.raises(PipelineValidationError) as error:
        p.build()
    message = str(error.value)
    assert "transformations.mapped.config.mappings.1.source" in message
    assert "'addr.cty'" in message
    assert "'addr.city'" in message  # the suggested field


def test_mapping_pipeline_matches_pandas(tmp_path: Path) -> None:
    p = Pipeline("mapping-e2e")
    rows = p.source("rows", "memory", records=USERS, batch_rows=2)
    mapped = p.transform(
        "mapped",
        "mapping",
        [rows],
        mappings=[
            {"source": "id", "destination": "user.id", "transform": "int"},
            {
                "source": "name",
                "destination": "user.name",
                "transform": "trim",
                "default": "",
            },
            {"source": "extra", "destination": "points", "transform": "float"},
        ],
    )
    p.destination("out", "memory", [mapped])
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    summary = p.run()

    frame = pd.DataFrame(USERS)
    ids = pd.to_numeric(frame["id"], errors="coerce")
    valid = frame[ids.notna()]
    out = summary.output("out").to_pylist()
    assert [row["user"]["id"] for row in out] == ids.dropna().astype(int).tolist()
    assert [row["user"]["name"] for row in out] == (
        valid["name"].fillna("").str.strip().tolist()
    )
    assert [row["points"] for row in out] == valid["extra"].astype(float).tolist()
    dead = [
        json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()
    ]
    assert [entry["record"]["id"] for entry in dead] == ["x"]
    assert dead[0]["reason"] == "field 'id' value 'x' is not an integer of type int64"

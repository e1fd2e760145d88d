"""Tests of the `select` and `rename` transformations."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import pytest
from pydantic import ValidationError

from dataflare import Pipeline, PipelineValidationError
from dataflare.plugin.interface import ConfigError
from dataflare.transforms.columns import RenameTransform, SelectTransform

UTC = dt.UTC
TIMES = pa.array(
    [dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 1, 2, tzinfo=UTC), None],
    pa.timestamp("us", tz="UTC"),
)
BATCH = pa.RecordBatch.from_arrays(
    [
        pa.array([1, 2, 3]),
        pa.array(["a", None, "c"]),
        TIMES,
        pa.array([0.5, 1.5, None]),
    ],
    names=["id", "name", "_event_time", "score"],
)


def select(context: Any, fields: list[str]) -> SelectTransform:
    return SelectTransform(SelectTransform.Config(fields=fields), context)


def rename(context: Any, fields: dict[str, str]) -> RenameTransform:
    return RenameTransform(RenameTransform.Config(fields=fields), context)


def test_select_orders_and_keeps_event_time(context: Any) -> None:
    transform = select(context, ["score", "id"])
    schema = transform.output_schema([BATCH.schema])
    [out] = transform.process(BATCH)
    assert schema.names == ["score", "id", "_event_time"]
    assert out.schema == schema
    assert out.column("score").to_pylist() == [0.5, 1.5, None]
    assert out.column("id").to_pylist() == [1, 2, 3]
    assert out.column("_event_time").equals(TIMES)


def test_select_places_listed_event_time(context: Any) -> None:
    [out] = select(context, ["_event_time", "name"]).process(BATCH)
    assert out.schema.names == ["_event_time", "name"]
    assert out.column("name").to_pylist() == ["a", None, "c"]


def test_select_empty_batch(context: Any) -> None:
    assert select(context, ["id"]).process(BATCH.slice(0, 0)) == []


def test_select_config_errors(context: Any) -> None:
    with pytest.raises(ValidationError, match="lists 'id' more than once"):
        SelectTransform.Config(fields=["id", "name", "id"])
    with pytest.raises(ValidationError):
        SelectTransform.Config(fields=[])
    with pytest.raises(ValueError, match="field 'nmae' in fields not found"):
        select(context, ["nmae"]).output_schema([BATCH.schema])


def test_rename_keeps_order_and_values(context: Any) -> None:
    transform = rename(context, {"name": "label", "score": "points"})
    schema = transform.output_schema([BATCH.schema])
    [out] = transform.process(BATCH)
    assert schema.names == ["id", "label", "_event_time", "points"]
    assert out.schema == schema
    assert out.column("label").to_pylist() == BATCH.column("name").to_pylist()
    assert out.column("points").to_pylist() == BATCH.column("score").to_pylist()
    assert out.column("_event_time").equals(TIMES)


def test_rename_swaps_names(context: Any) -> None:
    [out] = rename(context, {"id": "name", "name": "id"}).process(BATCH)
    assert out.schema.names == ["name", "id", "_event_time", "score"]
    assert out.column("name").to_pylist() == [1, 2, 3]
    assert out.column("id").to_pylist() == ["a", None, "c"]


def test_rename_clash_and_reserved(context: Any) -> None:
    with pytest.raises(ConfigError, match="clashes with the existing field 'id'") as e:
        rename(context, {"name": "id"}).output_schema([BATCH.schema])
    assert e.value.where == "fields.name"
    with pytest.raises(ValidationError, match="reserved stream column"):
        RenameTransform.Config(fields={"_event_time": "ts"})
    with pytest.raises(ValidationError, match="reserved stream column name"):
        RenameTransform.Config(fields={"id": "_key"})
    with pytest.raises(ValidationError, match="several fields are renamed to 'x'"):
        RenameTransform.Config(fields={"id": "x", "name": "x"})


def test_rename_empty_batch(context: Any) -> None:
    assert rename(context, {"id": "key"}).process(BATCH.slice(0, 0)) == []


@pytest.mark.parametrize(
    ("step_type", "config", "path"),
    [
        ("select", {"fields": ["id", "nmae"]}, "transformations.step.config.fields"),
        (
            "rename",
            {"fields": {"nmae": "x"}},
            "transformations.step.config.fields.nmae",
        ),
    ],
)
def test_misspelt_field_fails_build(
    step_type: str, config: dict[str, Any], path: str
) -> None:
    p = Pipeline("columns-misspelt")
    rows = p.source("rows", "memory", records=[{"id": 1, "name": "a"}])
    step = p.transform("step", step_type, [rows], **config)
    p.destination("out", "memory", [step])
    with pytest.raises(PipelineValidationError) as error:
        p.build()
    message = str(error.value)
    assert path in message
    assert "'nmae'" in message
    assert "'name'" in message  # the suggested field


def test_select_rename_pipeline() -> None:
    records = [{"id": i, "name": f"n{i}", "drop_me": i * 2} for i in range(5)]
    p = Pipeline("columns-e2e")
    rows = p.source(
        "rows",
        "memory",
        records=records,
        batch_rows=2,
        event_time={"field": "id", "format": "unix_s"},
    )
    slim = p.transform("slim", "select", [rows], fields=["name", "id"])
    named = p.transform("named", "rename", [slim], fields={"name": "label"})
    p.destination("out", "memory", [named], include_metadata=True)
    out = p.run().output("out")
    assert out.schema.names == ["label", "id", "_event_time"]
    assert out.column("label").to_pylist() == [r["name"] for r in records]
    assert out.column("id").to_pylist() == [r["id"] for r in records]
    assert out.column("_event_time").to_pylist() == [
        dt.datetime.fromtimestamp(r["id"], UTC) for r in records
    ]

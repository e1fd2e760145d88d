"""Tests of the `cast` transformation and its conversion helpers."""

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
from dataflare.transforms.cast import CastTransform, convert

UTC = dt.UTC


def make(context: Any, **config: Any) -> CastTransform:
    transform = CastTransform(CastTransform.Config.model_validate(config), context)
    transform.open()
    return transform


def run_pipeline(records: list[dict[str, Any]], tmp_path: Path, **config: Any) -> Any:
    p = Pipeline("cast-test")
    rows = p.source("rows", "memory", records=records, batch_rows=2)
    typed = p.transform("typed", "cast", [rows], **config)
    p.destination("out", "memory", [typed])
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    return p.run()


def dead_letters(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "dead.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- conversions -------------------------------------------------------------


def test_convert_text_to_int() -> None:
    result = convert(pa.array(["1", " 2 ", "x", "3.0", "", None]), pa.int64(), name="n")
    assert result.values.type == pa.int64()
    assert result.values.to_pylist() == [1, 2, None, None, None, None]
    assert sorted(result.reasons) == [2, 3]
    assert result.reasons[2] == "field 'n' value 'x' is not an integer of type int64"


def test_convert_int_overflow_rejected() -> None:
    result = convert(pa.array(["7", "3000000000"]), pa.int32(), name="n")
    assert result.values.to_pylist() == [7, None]
    assert list(result.reasons) == [1]
    assert "'3000000000'" in result.reasons[1]


def test_convert_float_to_int_needs_whole() -> None:
    result = convert(pa.array([3.0, 2.5, None, float("nan")]), pa.int64(), name="x")
    assert result.values.to_pylist() == [3, None, None, None]
    assert sorted(result.reasons) == [1, 3]


def test_convert_bool_words_and_numbers() -> None:
    words = convert(
        pa.array(["Yes", "no", "T", "0", "maybe", None]), pa.bool_(), name="b"
    )
    assert words.values.to_pylist() == [True, False, True, False, None, None]
    assert list(words.reasons) == [4]
    numbers = convert(pa.array([0, 1, 2]), pa.bool_(), name="b")
    assert numbers.values.to_pylist() == [False, True, None]
    assert list(numbers.reasons) == [2]


def test_convert_iso_timestamps_mixed_layouts() -> None:
    text = [
        "2024-05-01T10:30:00Z",
        "2024-05-01 10:30:00",
        "2024-05-01",
        "2024-05-01T12:30:00.5+02:00",
        "2024-05-01T10:30",
        "May 1st",
    ]
    result = convert(pa.array(text), pa.timestamp("us", tz="UTC"), name="t")
    expected = [
        dt.datetime(2024, 5, 1, 10, 30, tzinfo=UTC),
        dt.datetime(2024, 5, 1, 10, 30, tzinfo=UTC),
        dt.datetime(2024, 5, 1, tzinfo=UTC),
        dt.datetime(2024, 5, 1, 10, 30, 0, 500000, tzinfo=UTC),
        dt.datetime(2024, 5, 1, 10, 30, tzinfo=UTC),
        None,
    ]
    assert result.values.type == pa.timestamp("us", tz="UTC")
    assert result.values.to_pylist() == expected
    assert result.reasons == {
        5: "field 't' value 'May 1st' is not a timestamp in ISO 8601"
    }


def test_convert_timestamp_with_format() -> None:
    result = convert(
        pa.array(["02/01/2024 10:00", "2024-01-02"]),
        pa.timestamp("us", tz="UTC"),
        name="t",
        fmt="%d/%m/%Y %H:%M",
    )
    assert result.values.to_pylist() == [dt.datetime(2024, 1, 2, 10, tzinfo=UTC), None]
    assert "format '%d/%m/%Y %H:%M'" in result.reasons[1]


def test_convert_unix_numbers_to_timestamp() -> None:
    seconds = convert(pa.array([1_700_000_000]), pa.timestamp("us", tz="UTC"), name="t")
    millis = convert(
        pa.array([1_700_000_000_250]),
        pa.timestamp("us", tz="UTC"),
        name="t",
        fmt="unix_ms",
    )
    start = dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert seconds.values.to_pylist() == [start]
    assert millis.values.to_pylist() == [start + dt.timedelta(milliseconds=250)]


def test_convert_to_string_and_date() -> None:
    stamp = pa.array([dt.datetime(2024, 1, 2, 23, 4, 5)], pa.timestamp("us", tz="UTC"))
    assert convert(stamp, pa.string(), name="t").values.to_pylist() == [
        "2024-01-02T23:04:05Z"
    ]
    assert convert(stamp, pa.date32(), name="t").values.to_pylist() == [
        dt.date(2024, 1, 2)
    ]
    dates = convert(pa.array(["2024-03-01", "2024-13-01"]), pa.date32(), name="d")
    assert dates.values.to_pylist() == [dt.date(2024, 3, 1), None]
    assert list(dates.reasons) == [1]


# --- the transformation ------------------------------------------------------


def test_cast_rejects_bad_records(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist(
        [
            {"id": "1", "delay": "5", "ok": "true"},
            {"id": "2", "delay": "late", "ok": "yes"},
            {"id": "3", "delay": None, "ok": "perhaps"},
            {"id": "4", "delay": "-3", "ok": None},
        ]
    )
    transform = make(context, fields={"delay": "int", "ok": "bool"})
    [out] = transform.process(batch)
    assert out.to_pylist() == [
        {"id": "1", "delay": 5, "ok": True},
        {"id": "4", "delay": -3, "ok": None},
    ]
    assert [row["id"] for row, _, _ in context.rejected] == ["2", "3"]
    reasons = [reason for _, reason, _ in context.rejected]
    assert reasons[0] == "field 'delay' value 'late' is not an integer of type int64"
    assert "field 'ok' value 'perhaps'" in reasons[1]


def test_cast_reports_every_bad_field(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist([{"a": "x", "b": "y"}])
    transform = make(context, fields={"a": "int", "b": "float"})
    assert transform.process(batch) == []
    [(_, reason, _)] = context.rejected
    assert "field 'a' value 'x'" in reason
    assert "field 'b' value 'y'" in reason


def test_cast_keeps_event_time(context: Any) -> None:
    times = pa.array(
        [dt.datetime(2024, 1, 1, tzinfo=UTC)] * 2, pa.timestamp("us", "UTC")
    )
    batch = pa.RecordBatch.from_arrays(
        [pa.array(["1", "2"]), times], names=["n", "_event_time"]
    )
    transform = make(context, fields={"n": "int32"})
    schema = transform.output_schema([batch.schema])
    [out] = transform.process(batch)
    assert schema.names == ["n", "_event_time"]
    assert out.schema == schema
    assert out.column("_event_time").equals(times)
    assert out.column("n").to_pylist() == [1, 2]


def test_cast_empty_batch(context: Any) -> None:
    batch = pa.RecordBatch.from_pylist([], schema=pa.schema([("n", pa.string())]))
    assert make(context, fields={"n": "int"}).process(batch) == []
    assert context.rejected == []


def test_cast_config_errors() -> None:
    with pytest.raises(ValidationError, match="unknown type 'integr'"):
        CastTransform.Config.model_validate({"fields": {"n": "integr"}})
    with pytest.raises(ValidationError, match="reserved stream column"):
        CastTransform.Config.model_validate({"fields": {"_event_time": "string"}})
    with pytest.raises(ValidationError, match="formats names field 'm'"):
        CastTransform.Config.model_validate(
            {"fields": {"n": "timestamp"}, "formats": {"m": "%Y"}}
        )


def test_cast_impossible_conversion(context: Any) -> None:
    schema = pa.schema([("s", pa.struct([("a", pa.int64())])), ("d", pa.date32())])
    with pytest.raises(
        ConfigError, match="cannot convert field 's' of type struct"
    ) as e:
        make(context, fields={"s": "int"}).output_schema([schema])
    assert e.value.where == "fields.s"
    with pytest.raises(ConfigError, match="cannot convert field 'd' of type date32"):
        make(context, fields={"d": "float"}).output_schema([schema])
    with pytest.raises(ConfigError, match="applies only to text or numbers") as e:
        make(context, fields={"d": "timestamp"}, formats={"d": "%Y"}).output_schema(
            [schema]
        )
    assert e.value.where == "formats.d"


def test_cast_bad_format(context: Any) -> None:
    schema = pa.schema([("n", pa.int64()), ("s", pa.string())])
    with pytest.raises(ConfigError, match="must be one of unix_s, unix_ms, unix_us"):
        make(context, fields={"n": "timestamp"}, formats={"n": "%s"}).output_schema(
            [schema]
        )
    with pytest.raises(ConfigError, match="invalid format 'dd/mm/yyyy'"):
        make(context, fields={"s": "date"}, formats={"s": "dd/mm/yyyy"}).output_schema(
            [schema]
        )


def test_cast_type_mismatch_fails_build() -> None:
    p = Pipeline("cast-mismatch")
    rows = p.source("rows", "memory", records=[{"day": dt.date(2024, 1, 1)}])
    typed = p.transform("typed", "cast", [rows], fields={"day": "bool"})
    p.destination("out", "memory", [typed])
    with pytest.raises(PipelineValidationError) as error:
        p.build()
    message = str(error.value)
    assert "transformations.typed.config" in message
    assert "cannot convert field 'day' of type date32[day] to bool" in message


def test_cast_misspelt_field_fails_build() -> None:
    p = Pipeline("cast-misspelt")
    rows = p.source("rows", "memory", records=[{"dep_delay": "1"}])
    typed = p.transform("typed", "cast", [rows], fields={"dep_dealy": "int"})
    p.destination("out", "memory", [typed])
    with pytest.raises(PipelineValidationError) as error:
        p.build()
    message = str(error.value)
    assert "'dep_dealy'" in message
    assert "'dep_delay'" in message  # the suggested field


def test_cast_pipeline_matches_duckdb(tmp_path: Path) -> None:
    records = [
        {"id": i, "amount": text, "day": day}
        for i, (text, day) in enumerate(
            [
                ("10.5", "2024-01-01"),
                ("abc", "2024-01-02"),
                (None, "2024-01-03"),
                ("-2", "not a day"),
                ("7", None),
                ("1e3", "2024-02-29"),
            ]
        )
    ]
    summary = run_pipeline(records, tmp_path, fields={"amount": "float", "day": "date"})
    out = summary.output("out").sort_by("id")
    source = pa.Table.from_pylist(records)  # noqa: F841 - read by DuckDB by name
    expected = duckdb.sql(
        "SELECT id, TRY_CAST(amount AS DOUBLE) AS amount, TRY_CAST(day AS DATE) AS day "
        "FROM source WHERE (amount IS NULL OR TRY_CAST(amount AS DOUBLE) IS NOT NULL) "
        "AND (day IS NULL OR TRY_CAST(day AS DATE) IS NOT NULL) ORDER BY id"
    ).to_arrow_table()
    assert out.column("id").to_pylist() == expected.column("id").to_pylist()
    assert out.column("amount").to_pylist() == expected.column("amount").to_pylist()
    assert out.column("day").to_pylist() == expected.column("day").to_pylist()
    dead = dead_letters(tmp_path)
    assert sorted(entry["record"]["id"] for entry in dead) == [1, 3]
    assert {entry["step"] for entry in dead} == {"typed"}
    assert summary.rejected == 2

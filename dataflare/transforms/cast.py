"""`cast`: convert fields to other types, rejecting records whose values do not fit.

Example::

    transformations:
      typed:
        type: cast
        inputs: [raw]
        config:
          fields: {dep_delay: int, distance: float, time_hour: timestamp, day: date}
          formats: {day: "%d/%m/%Y"}

Type names are those of a file source's `schema` (`string`, `int`, `int32`,
`float`, `float32`, `bool`, `date`, `timestamp`, ...). Conversions:

- strings converted to another type are trimmed first, and an empty string
  becomes null; a string-to-string cast keeps the text as it is;
- `int` accepts integer text (`"42"`), whole float values of a float column
  (`3.0`, but not the text `"3.0"`) and booleans; a value with a fraction or
  outside the type's range is invalid;
- `bool` accepts true/false, t/f, yes/no, y/n and 1/0 (any case), and the
  numbers 0 and 1;
- `timestamp` parses ISO 8601 text (`2024-05-01`, `2024-05-01 10:30`,
  `2024-05-01T10:30:00.5+02:00`), or text in a strftime pattern given in
  `formats`. Numbers are Unix seconds unless `formats` gives `unix_ms` or
  `unix_us`. Times without a zone are taken as UTC, and every result is
  `timestamp[us, UTC]`;
- `date` parses `YYYY-MM-DD` text or a `formats` pattern, and takes the UTC
  date of a timestamp;
- `string` writes timestamps as ISO 8601 in UTC (`2024-05-01T10:30:00Z`).

A record with a value that does not convert goes to the dead-letter output
with a reason naming the field and the value. The rest of the batch goes on.
The reserved `_event_time` column cannot be cast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from dataflare.connectors.files.base import parse_type
from dataflare.plugin.interface import (
    RESERVED_COLUMNS,
    ConfigError,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)

UNIX_FORMATS = {"unix_s": 1_000_000, "unix_ms": 1_000, "unix_us": 1}
"""Formats for numbers converted to timestamps, with microseconds per unit."""

ISO_AWARE = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z")
ISO_NAIVE = (
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)
ISO_OUTPUT = "%Y-%m-%dT%H:%M:%S%.fZ"
TRUE_WORDS = ("true", "t", "yes", "y", "1")
FALSE_WORDS = ("false", "f", "no", "n", "0")
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")

_SOURCE_KINDS = {
    "string": {"string", "integer", "float", "bool", "date", "timestamp", "null"},
    "integer": {"string", "integer", "float", "bool", "null"},
    "float": {"string", "integer", "float", "bool", "null"},
    "bool": {"string", "integer", "float", "bool", "null"},
    "timestamp": {"string", "integer", "float", "date", "timestamp", "null"},
    "date": {"string", "date", "timestamp", "null"},
}
"""For each kind of target type, the kinds of source types it converts from."""


def type_kind(dtype: pa.DataType) -> str:
    """Return the kind of an Arrow type: string, integer, float, bool, ... or other."""
    if pa.types.is_dictionary(dtype):
        return type_kind(dtype.value_type)
    checks = (
        (
            "string",
            (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view),
        ),
        ("integer", (pa.types.is_integer,)),
        ("float", (pa.types.is_floating, pa.types.is_decimal)),
        ("bool", (pa.types.is_boolean,)),
        ("timestamp", (pa.types.is_timestamp,)),
        ("date", (pa.types.is_date,)),
        ("null", (pa.types.is_null,)),
    )
    for kind, predicates in checks:
        if any(predicate(dtype) for predicate in predicates):
            return kind
    return "other"


def check_conversion(
    name: str, source: pa.DataType, target: pa.DataType, fmt: str | None = None
) -> None:
    """Check that values of type `source` can be converted to `target`.

    Raises:
        ValueError: the types do not convert, or `fmt` does not fit them.
    """
    target_kind = type_kind(target)
    source_kind = type_kind(source)
    if target_kind not in _SOURCE_KINDS:
        raise ValueError(
            f"cannot convert field {name!r} to {target}; convert to "
            "string, int, float, bool, timestamp or date"
        )
    if source_kind not in _SOURCE_KINDS[target_kind]:
        raise ValueError(
            f"cannot convert field {name!r} of type {source} to {target}; convert "
            f"it from one of: {', '.join(sorted(_SOURCE_KINDS[target_kind]))}"
        )
    if fmt is not None:
        check_format(name, source_kind, target_kind, fmt)


def check_format(name: str, source_kind: str, target_kind: str, fmt: str) -> None:
    """Check that `fmt` is a usable pattern for this conversion.

    Raises:
        ValueError: the format does not apply or is not a valid pattern.
    """
    if target_kind not in ("timestamp", "date"):
        raise ValueError(
            f"a format for field {name!r} applies only to conversions "
            f"to timestamp or date, not to {target_kind}; remove it"
        )
    if source_kind not in ("string", "integer", "float", "null"):
        raise ValueError(
            f"a format for field {name!r} applies only to text or numbers, "
            f"and this field is a {source_kind}; remove the format"
        )
    if source_kind in ("integer", "float"):
        if target_kind != "timestamp" or fmt not in UNIX_FORMATS:
            raise ValueError(
                f"field {name!r} is numeric, so its format must be one of "
                f"{', '.join(UNIX_FORMATS)}, not {fmt!r}"
            )
        return
    if source_kind == "string" and "%" not in fmt:
        raise ValueError(
            f"invalid format {fmt!r} for field {name!r}: write a strftime "
            "pattern such as '%Y-%m-%d %H:%M:%S'"
        )


@dataclass
class Conversion:
    """Converted values of one column and the reasons of rows that failed."""

    values: pa.Array
    reasons: dict[int, str] = field(default_factory=dict)


def convert(
    values: pa.Array | pa.ChunkedArray,
    target: pa.DataType,
    *,
    name: str,
    fmt: str | None = None,
) -> Conversion:
    """Convert an Arrow column to `target`, with a null and a reason for each bad value.

    The caller checks the types first with `check_conversion`.
    """
    series = _series(values)
    source_kind = type_kind(values.type)
    if source_kind == "string":
        series = series.cast(pl.String)
        if type_kind(target) != "string":
            series = _blank_to_null(series)
    converted = _convert_series(series, source_kind, target, fmt)
    failed = (converted.is_null() & series.is_not_null()).to_numpy()
    reasons = {}
    for row in np.flatnonzero(failed):
        reasons[int(row)] = invalid_value_reason(name, series[int(row)], target, fmt)
    return Conversion(converted.to_arrow().cast(target), reasons)


def invalid_value_reason(
    name: str, value: Any, target: pa.DataType, fmt: str | None
) -> str:
    """Return the reason for rejecting a record whose `value` did not convert."""
    value_text = repr(value)
    if len(value_text) > 80:
        value_text = value_text[:77] + "..."
    kind = type_kind(target)
    words = {
        "integer": f"an integer of type {target}",
        "float": "a number",
        "bool": "a boolean (true/false, yes/no or 1/0)",
        "timestamp": "a timestamp in ISO 8601",
        "date": "a date in YYYY-MM-DD",
    }
    expected = words.get(kind, str(target))
    if fmt is not None:
        expected = f"a {kind} in format {fmt!r}"
    return f"field {name!r} value {value_text} is not {expected}"


def _series(values: pa.Array | pa.ChunkedArray) -> pl.Series:
    series = pl.from_arrow(values)
    assert isinstance(series, pl.Series)
    return series


def _blank_to_null(text: pl.Series) -> pl.Series:
    stripped = text.str.strip_chars()
    return (
        pl.select(pl.when(stripped.str.len_chars() > 0).then(stripped).otherwise(None))
        .to_series()
        .alias(text.name)
    )


def _polars_type(target: pa.DataType) -> pl.DataType:
    empty = pl.from_arrow(pa.array([], type=target))
    assert isinstance(empty, pl.Series)
    return empty.dtype


def _convert_series(
    series: pl.Series, source_kind: str, target: pa.DataType, fmt: str | None
) -> pl.Series:
    converters = {
        "string": _to_string,
        "integer": _to_integer,
        "float": _to_float,
        "bool": _to_bool,
        "timestamp": _to_timestamp,
        "date": _to_date,
    }
    result = converters[type_kind(target)](series, source_kind, target, fmt)
    return result.alias(series.name)


def _to_string(
    series: pl.Series, kind: str, target: pa.DataType, fmt: str | None
) -> pl.Series:
    if kind == "timestamp":
        return _as_utc(series).dt.to_string(ISO_OUTPUT)
    if kind == "date":
        return series.dt.to_string("%Y-%m-%d")
    return series.cast(pl.String)


def _to_integer(
    series: pl.Series, kind: str, target: pa.DataType, fmt: str | None
) -> pl.Series:
    dtype = _polars_type(target)
    if kind == "string":
        return series.cast(pl.Int64, strict=False).cast(dtype, strict=False)
    if kind == "float":
        numbers = series.cast(pl.Float64)
        whole = numbers.is_finite() & (numbers == numbers.floor())
        kept = pl.select(pl.when(whole).then(numbers).otherwise(None)).to_series()
        return kept.cast(dtype, strict=False)
    return series.cast(dtype, strict=False)


def _to_float(
    series: pl.Series, kind: str, target: pa.DataType, fmt: str | None
) -> pl.Series:
    dtype = _polars_type(target)
    if kind == "string":
        return series.cast(pl.Float64, strict=False).cast(dtype, strict=False)
    return series.cast(dtype, strict=False)


def _to_bool(
    series: pl.Series, kind: str, target: pa.DataType, fmt: str | None
) -> pl.Series:
    if kind == "bool":
        return series
    if kind == "string":
        lowered = series.str.to_lowercase()
        is_true, is_false = lowered.is_in(TRUE_WORDS), lowered.is_in(FALSE_WORDS)
    else:
        is_true, is_false = series == 1, series == 0
    flags = pl.when(is_true).then(True).when(is_false).then(False).otherwise(None)
    return pl.select(flags).to_series()


def _to_timestamp(
    series: pl.Series, kind: str, target: pa.DataType, fmt: str | None
) -> pl.Series:
    if kind == "string":
        return _parse_timestamp(series, fmt)
    if kind in ("integer", "float"):
        scale = UNIX_FORMATS[fmt or "unix_s"]
        micros = (series.cast(pl.Float64) * scale).round().cast(pl.Int64, strict=False)
        return micros.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if kind == "date":
        return series.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if kind == "null":
        return series.cast(pl.Datetime("us", "UTC"))
    return _as_utc(series)


def _parse_timestamp(text: pl.Series, fmt: str | None) -> pl.Series:
    if fmt is not None:
        return _as_utc(text.str.to_datetime(fmt, time_unit="us", strict=False))
    # Each layout parses the values it fits and gives null for the others,
    # so a batch may mix layouts. The first layout that fits a value wins.
    attempts = [
        _as_utc(text.str.to_datetime(layout, time_unit="us", strict=False))
        for layout in (*ISO_AWARE, *ISO_NAIVE)
    ]
    return pl.select(pl.coalesce(attempts)).to_series()


def _as_utc(series: pl.Series) -> pl.Series:
    dtype = series.dtype
    assert isinstance(dtype, pl.Datetime)
    if dtype.time_zone is None:
        series = series.dt.replace_time_zone("UTC")
    return series.dt.convert_time_zone("UTC").dt.cast_time_unit("us")


def _to_date(
    series: pl.Series, kind: str, target: pa.DataType, fmt: str | None
) -> pl.Series:
    if kind == "string":
        return series.str.to_date(fmt or "%Y-%m-%d", strict=False)
    if kind == "timestamp":
        return _as_utc(series).dt.date()
    return series.cast(pl.Date)


# --- the transformation ----------------------------------------------------


class CastConfig(PluginConfig):
    fields: dict[str, str] = Field(
        min_length=1,
        description="Target type per field, "
        "e.g. {dep_delay: int, time_hour: timestamp}",
    )
    formats: dict[str, str] = Field(
        default_factory=dict,
        description="strftime pattern per field for text converted to timestamp or "
        "date, or unix_s, unix_ms or unix_us for numbers converted to timestamp",
    )

    @field_validator("fields")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        for name, type_name in value.items():
            if name in RESERVED_COLUMNS:
                raise ValueError(
                    f"field {name!r} is a reserved stream column and "
                    "cannot be cast; remove it from fields"
                )
            parse_type(type_name)
        return value

    @model_validator(mode="after")
    def _formats_name_cast_fields(self) -> CastConfig:
        for name in self.formats:
            if name not in self.fields:
                raise ValueError(
                    f"formats names field {name!r}, which is not in "
                    "fields; add it to fields or remove its format"
                )
        return self

    def target_types(self) -> dict[str, pa.DataType]:
        return {name: parse_type(type_name) for name, type_name in self.fields.items()}


class CastTransform(Transform[CastConfig]):
    """Convert fields to other types, rejecting records whose values do not fit."""

    metadata = PluginMetadata("cast", PluginKind.MAP, "Convert fields to other types")
    Config = CastConfig

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        targets = self.config.target_types()
        for name, target in targets.items():
            if name not in schema.names:
                raise FieldNotFoundError(name, schema.names, where=f"fields.{name}")
            self._check_field(name, schema.field(name).type, target)
        return pa.schema(
            [
                field.with_type(targets[field.name]) if field.name in targets else field
                for field in schema
            ],
            metadata=schema.metadata,
        )

    def _check_field(self, name: str, source: pa.DataType, target: pa.DataType) -> None:
        try:
            check_conversion(name, source, target)
        except ValueError as exc:
            raise ConfigError(str(exc), where=f"fields.{name}") from None
        fmt = self.config.formats.get(name)
        if fmt is None:
            return
        try:
            check_format(name, type_kind(source), type_kind(target), fmt)
        except ValueError as exc:
            raise ConfigError(str(exc), where=f"formats.{name}") from None

    def open(self) -> None:
        self._targets = self.config.target_types()
        self._schemas: dict[pa.Schema, pa.Schema] = {}

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        schema = self._schemas.get(batch.schema)
        if schema is None:
            schema = self._schemas[batch.schema] = self.output_schema([batch.schema])
        columns = dict(zip(batch.schema.names, batch.columns, strict=True))
        reasons: dict[int, list[str]] = {}
        for name, target in self._targets.items():
            result = convert(
                columns[name], target, name=name, fmt=self.config.formats.get(name)
            )
            columns[name] = result.values
            for row, reason in result.reasons.items():
                reasons.setdefault(row, []).append(reason)
        converted = pa.RecordBatch.from_arrays(list(columns.values()), schema=schema)
        kept = drop_rejected(self, batch, converted, reasons)
        return [kept] if kept.num_rows else []


def drop_rejected(
    transform: Transform[Any],
    original: pa.RecordBatch,
    converted: pa.RecordBatch,
    reasons: Mapping[int, list[str]],
) -> pa.RecordBatch:
    """Reject the `original` records of rows listed in `reasons`; return the rest.

    `converted` has one row per row of `original`. The reasons of one row
    are joined with "; ".
    """
    if not reasons:
        return converted
    rows = sorted(reasons)
    transform.context.reject(
        original.take(pa.array(rows, type=pa.int64())),
        ["; ".join(reasons[row]) for row in rows],
    )
    keep = np.ones(converted.num_rows, dtype=bool)
    keep[rows] = False
    return converted.filter(pa.array(keep))

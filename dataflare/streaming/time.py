"""Event time: extraction from records, and watermarks.

Times inside the engine are integers: microseconds since the Unix epoch, UTC.
The event time of each record sits in the reserved `_event_time` column as
`timestamp[us, tz=UTC]`.

A timestamp field in microseconds or coarser, with a zone or read as UTC,
is converted with an Arrow cast. Polars converts the
other event times (text, numbers, dates, expressions); it is imported only
by the functions that use it, so that a pipeline that needs none of them
does not load it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataflare.batch.numpy_arrays import from_numpy, to_numpy
from dataflare.plugin.interface import EVENT_TIME, ConfigError, FieldNotFoundError
from dataflare.streaming.spec import EventTimeSpec, WatermarkSpec

if TYPE_CHECKING:
    import polars as pl

MIN_TIME = -(2**63)
MAX_TIME = 2**63 - 1
EVENT_TIME_TYPE = pa.timestamp("us", tz="UTC")
_UNIX_UNITS = {"unix_s": "s", "unix_ms": "ms", "unix_us": "us"}


def micros(delta_seconds: float) -> int:
    return round(delta_seconds * 1_000_000)


@dataclass
class Extracted:
    batch: pa.RecordBatch
    bad_rows: np.ndarray  # indices into the input batch
    reasons: list[str]


class EventTimeExtractor:
    """Adds `_event_time` to batches according to a source's `event_time`."""

    def __init__(self, spec: EventTimeSpec, schema: pa.Schema) -> None:
        self.spec = spec
        self.fields = list(schema.names)
        self._cast = False
        if spec.field is not None:
            if spec.field not in self.fields:
                raise FieldNotFoundError(
                    spec.field, self.fields, where="event_time.field"
                )
            dtype = schema.field(spec.field).type
            self._cast = _casts_exactly(dtype, spec.timezone)
            if self._cast:
                if dtype.tz is not None:
                    _check_zone_unused(spec.timezone, f"field {spec.field!r}", dtype.tz)
                return
        import polars as pl

        if spec.field is not None:
            self._source = pl.col(spec.field)
            self._described = f"field {spec.field!r}"
        else:
            assert spec.expression is not None
            try:
                self._source = pl.sql_expr(spec.expression)
            except Exception as exc:  # polars raises several types for bad SQL
                raise ValueError(f"invalid event_time.expression: {exc}") from exc
            for name in self._source.meta.root_names():
                if name not in self.fields:
                    raise FieldNotFoundError(
                        name, self.fields, where="event_time.expression"
                    )
            self._described = f"expression {spec.expression!r}"
        self._parse_iso = False
        self._expr = self._converted(schema)

    def _converted(self, schema: pa.Schema) -> pl.Expr:
        import polars as pl

        empty = pl.from_arrow(pa.Table.from_batches([], schema=schema))
        assert isinstance(empty, pl.DataFrame)
        try:
            dtype = empty.select(self._source.alias("t")).schema["t"]
        except pl.exceptions.PolarsError as exc:
            raise ValueError(f"invalid event_time {self._described}: {exc}") from exc
        fmt = self.spec.format
        expr = self._source
        if isinstance(dtype, pl.Datetime):
            if dtype.time_zone is not None:
                _check_zone_unused(self.spec.timezone, self._described, dtype.time_zone)
            if dtype.time_zone is None:
                expr = expr.dt.replace_time_zone(self.spec.timezone, **LOCAL_TIME_RULES)
            return expr.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        if dtype == pl.Date:
            return (
                expr.cast(pl.Datetime("us"))
                .dt.replace_time_zone(self.spec.timezone, **LOCAL_TIME_RULES)
                .dt.convert_time_zone("UTC")
            )
        if dtype.is_numeric():
            unit = _UNIX_UNITS.get(fmt or "unix_s")
            if unit is None:
                raise ValueError(
                    f"event_time {self._described} is numeric, so format must be "
                    f"unix_s, unix_ms or unix_us, not {fmt!r}"
                )
            scale = {"s": 1_000_000, "ms": 1_000, "us": 1}[unit]
            return (
                (expr.cast(pl.Float64) * scale)
                .cast(pl.Int64, strict=False)
                .cast(pl.Datetime("us", "UTC"))
            )
        if dtype == pl.String:
            # The zone of parsed strings depends on the data (an offset or
            # not), so `apply` normalises it per batch.
            if fmt is None or fmt == "iso8601":
                # Polars parses strings with zone offsets only eagerly.
                self._parse_iso = True
                return expr
            return expr.str.to_datetime(fmt, time_unit="us", strict=False)
        raise ValueError(
            f"event_time {self._described} has type {dtype}; it must be a timestamp, "
            "a date, a number of seconds or a string"
        )

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        if EVENT_TIME in schema.names:
            schema = schema.remove(schema.get_field_index(EVENT_TIME))
        return schema.append(pa.field(EVENT_TIME, EVENT_TIME_TYPE))

    def apply(self, batch: pa.RecordBatch) -> Extracted:
        if self._cast:
            return self._apply_cast(batch)
        import polars as pl

        df = pl.from_arrow(batch)
        assert isinstance(df, pl.DataFrame)
        try:
            times = df.select(self._expr.alias(EVENT_TIME)).to_series()
        except pl.exceptions.PolarsError:
            # A value the vectorised parse rejects outright: retry row by row
            # with nulls for the failures.
            times = pl.Series(
                EVENT_TIME,
                [self._one(df, i) for i in range(df.height)],
                dtype=pl.Datetime("us", "UTC"),
            )
        if self._parse_iso:
            times = _parse_iso(times, self.spec.timezone)
        else:
            times = _normalise(times, self.spec.timezone)
        arrow_times = times.to_arrow().cast(EVENT_TIME_TYPE)
        if EVENT_TIME in batch.schema.names:
            batch = batch.drop_columns([EVENT_TIME])
        out = batch.append_column(pa.field(EVENT_TIME, EVENT_TIME_TYPE), arrow_times)
        null_mask = times.is_null().to_numpy()
        bad = np.flatnonzero(null_mask)
        reasons = [self._reason(df, int(i)) for i in bad] if len(bad) else []
        return Extracted(out, bad, reasons)

    def _apply_cast(self, batch: pa.RecordBatch) -> Extracted:
        """Return `batch` with event times cast from a timestamp field."""
        field = self.spec.field
        assert field is not None
        times, out_of_range = _cast_in_range(batch.column(field))

        if EVENT_TIME in batch.schema.names:
            batch = batch.drop_columns([EVENT_TIME])
        out = batch.append_column(pa.field(EVENT_TIME, EVENT_TIME_TYPE), times)
        if not times.null_count:
            return Extracted(out, np.empty(0, np.int64), [])

        bad = np.flatnonzero(to_numpy(times.is_null()))
        missing = f"missing event time: field {field!r} is empty or absent"
        beyond = (
            f"invalid event time: field {field!r} is beyond the range of "
            "timestamps in microseconds (about 292,000 years either side of 1970)"
        )
        return Extracted(
            out, bad, [beyond if out_of_range[i] else missing for i in bad]
        )

    def _one(self, df: pl.DataFrame, row: int) -> object:
        import polars as pl

        try:
            return df.slice(row, 1).select(self._expr).item()
        except pl.exceptions.PolarsError:
            return None

    def _reason(self, df: pl.DataFrame, row: int) -> str:
        skipped = (
            f"does not exist in time zone {self.spec.timezone!r}, whose clocks "
            "skip it (a daylight saving time change); correct the time or give "
            "its offset"
        )
        if self.spec.field is not None:
            value = df[self.spec.field][row]
            if value is None:
                return (
                    f"missing event time: field {self.spec.field!r} is empty or absent"
                )
            text = _shown(value)
            if _is_local_time(value, self.spec.format):
                return (
                    f"invalid event time: field {self.spec.field!r} value "
                    f"{text!r} {skipped}"
                )
            fmt = self.spec.format or "ISO 8601"
            return (
                f"invalid event time: field {self.spec.field!r} value {text!r} "
                f"does not match format {fmt!r}"
            )
        local = self._local(df, row)
        if local is not None:
            return (
                f"invalid event time: expression {self.spec.expression!r} gave "
                f"{_shown(local)!r}, which {skipped}"
            )
        return f"missing event time: expression {self.spec.expression!r} gave no value"

    def _local(self, df: pl.DataFrame, row: int) -> dt.datetime | None:
        """Return the expression's local time without a zone at `row`, if any.

        Such a time gives no event time only where the zone's clocks skip it.
        """
        import polars as pl

        try:
            value = df.slice(row, 1).select(self._source).item()
        except pl.exceptions.PolarsError:
            return None
        if isinstance(value, dt.datetime):
            return value if value.tzinfo is None else None
        if isinstance(value, dt.date):
            return dt.datetime.combine(value, dt.time())
        return None


def _shown(value: object) -> object:
    """Return `value` as a reason shows it: a datetime as ISO 8601 text."""
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    return value


LOCAL_TIME_RULES: dict[str, Any] = {"ambiguous": "earliest", "non_existent": "null"}
"""Polars' rules for local times without an offset where the time zone's
clocks change. A time that occurs twice (clocks set back) is the earlier of the
two, as `java.time.ZonedDateTime` takes it. A time that never occurs (clocks
set forward) gives no event time, so its record is rejected."""


def _is_local_time(value: object, fmt: str | None) -> bool:
    """Tell whether `value` reads as a local time without an offset.

    `_reason` calls this only for values that gave no event time, and a
    local time gives none only when its time zone's clocks skip it.
    """
    import polars as pl

    if isinstance(value, dt.datetime):
        return value.tzinfo is None
    if not isinstance(value, str):
        return False
    fmt = None if fmt in (None, "iso8601") else fmt
    try:
        parsed = pl.Series([value]).str.to_datetime(fmt, time_unit="us", strict=False)
    except pl.exceptions.PolarsError:
        return False
    dtype = parsed.dtype
    return (
        isinstance(dtype, pl.Datetime)
        and dtype.time_zone is None
        and parsed.item() is not None
    )


def _cast_in_range(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Cast timestamps to event times, with nulls where they do not fit.

    Returns the event times and which values lie beyond the range of
    microseconds (only seconds and milliseconds can).
    """
    try:
        return column.cast(EVENT_TIME_TYPE), np.zeros(len(column), np.bool_)
    except pa.ArrowInvalid:
        pass
    scale = {"s": 1_000_000, "ms": 1_000}[column.type.unit]
    raw = to_numpy(column.cast(pa.int64()), null_value=0)
    out_of_range = np.abs(raw) > (2**63 - 1) // scale
    micros = from_numpy(np.where(out_of_range, 0, raw) * scale)
    usable = from_numpy(~out_of_range & ~to_numpy(column.is_null()))
    nulls = pa.nulls(len(raw), EVENT_TIME_TYPE)
    times = pc.if_else(usable, micros.cast(EVENT_TIME_TYPE), nulls)
    return times, out_of_range


_UTC_NAMES = frozenset(
    {
        "UTC",
        "Etc/UTC",
        "Etc/UCT",
        "UCT",
        "Zulu",
        "Etc/Zulu",
        "Universal",
        "Etc/Universal",
    }
)
"""IANA names of UTC itself: tzdata links each of them to Etc/UTC."""


def _check_zone_unused(timezone: str, described: str, zone: str) -> None:
    """Raise ConfigError if `timezone` is set for times that carry another zone.

    Such a `timezone` would have no effect. This is the case of a text source's
    `timestamp` field, declared or inferred, because the source reads text
    without an offset as UTC.
    """
    if timezone == zone or timezone in _UTC_NAMES:
        return  # UTC is the default, and times with a zone keep theirs
    raise ConfigError(
        f"event_time.timezone {timezone!r} has no effect on {described}, whose "
        f"times carry the zone {zone!r} already; remove `timezone`. If the field "
        "comes from text without offsets as a `timestamp` (read as UTC), make "
        f"it a `string` in the source's schema to read that text in {timezone}",
        where="event_time.timezone",
    )


def _casts_exactly(dtype: pa.DataType, timezone: str) -> bool:
    """True if an Arrow cast turns `dtype` values into event times exactly.

    That is a timestamp in seconds, milliseconds or microseconds with a zone,
    or without one when the event time's zone is UTC.
    """
    return (
        pa.types.is_timestamp(dtype)
        and dtype.unit in ("s", "ms", "us")
        and (dtype.tz is not None or timezone == "UTC")
    )


def _parse_iso(strings: pl.Series, timezone: str) -> pl.Series:
    """Parse ISO 8601 strings, with nulls for values that do not parse."""
    import polars as pl

    try:
        parsed = strings.str.to_datetime(time_unit="us", strict=False)
    except pl.exceptions.ComputeError:
        # Polars infers the format from the values and raises, instead of
        # returning nulls, when no value matches a format it recognises.
        # Parsing each distinct value alone keeps any good one.
        parsed_values = {
            value: _parse_one(value, timezone)
            for value in strings.drop_nulls().unique()
        }
        return pl.Series(
            strings.name,
            [parsed_values.get(value) for value in strings],
            dtype=pl.Datetime("us", "UTC"),
        )
    normalised = _normalise(parsed, timezone)
    # Polars parses the whole batch with the format of its first value, so a
    # value in another ISO 8601 form (with a zone where the first had none,
    # say) comes back null: parse each such value alone.
    failed = normalised.is_null() & strings.is_not_null()
    if not failed.any():
        return normalised
    retried = {
        value: _parse_one(value, timezone) for value in strings.filter(failed).unique()
    }
    fills = pl.Series(
        strings.name,
        [
            retried.get(value) if bad else None
            for value, bad in zip(strings, failed, strict=True)
        ],
        dtype=pl.Datetime("us", "UTC"),
    )
    return normalised.zip_with(~failed, fills)


def _parse_one(value: str, timezone: str) -> object:
    import polars as pl

    try:
        parsed = pl.Series([value]).str.to_datetime(time_unit="us", strict=False)
    except pl.exceptions.ComputeError:
        return None
    return _normalise(parsed, timezone).item()


def _normalise(times: pl.Series, timezone: str) -> pl.Series:
    import polars as pl

    dtype = times.dtype
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            times = times.dt.replace_time_zone(timezone, **LOCAL_TIME_RULES)
        return times.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    return times.cast(pl.Datetime("us", "UTC"), strict=False)


class WatermarkGenerator:
    """Bounded out-of-orderness: watermark = newest event time - bound."""

    def __init__(self, spec: WatermarkSpec) -> None:
        self.bound = micros(spec.max_out_of_orderness.total_seconds())
        self.max_seen = MIN_TIME
        self.current = MIN_TIME

    def observe(self, batch: pa.RecordBatch) -> int | None:
        """Return the new watermark after `batch`, or None if it did not advance."""
        column = batch.column(EVENT_TIME)
        if column.null_count == len(column):
            return None
        newest: int | None = pc.max(column.cast(pa.int64())).as_py()
        if newest is None or newest <= self.max_seen:
            return None
        self.max_seen = newest
        candidate = newest - self.bound
        if candidate > self.current:
            self.current = candidate
            return candidate
        return None

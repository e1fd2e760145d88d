"""`window`: keyed aggregations over event-time windows.

Example, flights per carrier and airport per hour::

    transformations:
      hourly:
        type: window
        inputs: [delayed]
        config:
          kind: tumbling          # tumbling | sliding | session
          size: 1h
          key_by: [carrier, origin]
          allowed_lateness: 10m
          aggregations:
            flights: {fn: count}
            mean_dep_delay: {fn: mean, field: dep_delay}
            max_dep_delay: {fn: max, field: dep_delay}
            p90_dep_delay: {fn: percentile, field: dep_delay, q: 0.9}

Semantics:

- Windows are half-open, `[start, end)`: a record exactly on a window's end
  belongs to the next window. Tumbling and sliding windows are aligned to
  the Unix epoch. A session window closes after `gap` without records of
  its key; it spans `[first record, last record + gap)`.
- A window's result is emitted once, when the watermark reaches
  `end + allowed_lateness`; so every result is final and no output is ever
  retracted. Until then, records for the window are still counted.
- A record whose window already emitted is late: it goes to the side output
  `late` (read it with `inputs: [hourly.late]`) or, if no step reads that
  port, to the dead-letter output. Late records are counted as `late`. A
  session record is late when it would join a session that was emitted,
  that is when its event time is before that session's end.
- Output records have the key fields, `window_start`, `window_end` and one
  field per aggregation. Their event time is `window_end` minus 1 µs.
- Result types: `count` and `count_distinct` give `int64`; `sum` gives
  `int64` over signed integers and booleans, `uint64` over unsigned
  integers and `float64` over floats; `mean` and `percentile` give
  `float64` over numbers; `min`, `max`, `first` and `last` keep the
  field's type.

State: the records of open windows wait in a pending buffer (the fields
the window aggregates and their window start) until the watermark closes
their windows, so a batch is only appended and each watermark step
aggregates the closing windows at once. Once the buffer contains
`FLUSH_ROWS` records, the next batch first moves it into a `FrameStore`,
one frame per window start.

Tumbling and sliding windows whose aggregations all merge from parts
(`count`, `sum`, `min`, `max`, `mean`, `first`, `last`) over numbers,
booleans, text, dates or timestamps are computed with Arrow and NumPy
(`dataflare.batch.group_by`): their frames hold partial results per key
and window instead of records, and Polars is not loaded. Sessions,
`count_distinct`, `percentile` and other field types keep the records in
the frames and aggregate them with Polars when the window closes, so
every aggregation is exact. The frame
store, the buffer and the ends of emitted sessions are keyed state, saved
in checkpoints.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from dataflare.batch.group_by import group_by
from dataflare.batch.numpy_arrays import from_numpy, to_numpy
from dataflare.plugin.interface import (
    EVENT_TIME,
    ConfigError,
    FieldNotFoundError,
    OperatorContext,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.state.frames import FrameStore
from dataflare.state.keyed import MAX_TIME, MIN_TIME, KeyedStateStore
from dataflare.streaming.spec import Duration
from dataflare.streaming.time import micros
from dataflare.transforms.expressions import empty_batch, to_batch, to_polars

if TYPE_CHECKING:
    import polars as pl

WINDOW_START = "window_start"
WINDOW_END = "window_end"
FLUSH_ROWS = 1 << 16
"""Pending records that make the next batch split the buffer per window."""

_TS = "__ts"
_WS = "__window"
_END = "__end"
_LAYOUT = 3  # version of the snapshot layout
# Frame store slots that are not window starts.
_SESSION = MIN_TIME  # session records
_PENDING = MAX_TIME  # the pending buffer, in snapshots only
_CLOSED = MAX_TIME - 1  # ends of emitted sessions, in snapshots only
_COMPACT_FRAMES = 8  # partial frames of a window that are merged into one
_UTC = pa.timestamp("us", tz="UTC")

AggregateFunction = Literal[
    "count",
    "sum",
    "min",
    "max",
    "mean",
    "count_distinct",
    "percentile",
    "first",
    "last",
]


def _is_number(dtype: pa.DataType) -> bool:
    return bool(pa.types.is_integer(dtype) or pa.types.is_floating(dtype))


def _is_ordered(dtype: pa.DataType) -> bool:
    """True for the types whose min, max, first and last Arrow groups by."""
    return (
        _is_number(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_timestamp(dtype)
        or pa.types.is_date(dtype)
    )


def _sum_type(dtype: pa.DataType) -> pa.DataType | None:
    """Return the type of a sum of `dtype` values, None if not a number."""
    if pa.types.is_signed_integer(dtype) or pa.types.is_boolean(dtype):
        return pa.int64()
    if pa.types.is_unsigned_integer(dtype):
        return pa.uint64()
    if pa.types.is_floating(dtype):
        return pa.float64()
    return None


def _mean_sum_type(dtype: pa.DataType) -> pa.DataType:
    """Return the type that `mean` sums `dtype` values in: exact for integers."""
    exact = pa.types.is_boolean(dtype) or (
        pa.types.is_integer(dtype) and dtype != pa.uint64()
    )
    return pa.int64() if exact else pa.float64()


class Aggregation(PluginConfig):
    fn: AggregateFunction
    field: str | None = Field(
        None, description="Field to aggregate; count may omit it to count records"
    )
    q: float | None = Field(
        None, ge=0, le=1, description="Quantile for percentile, e.g. 0.99"
    )

    @model_validator(mode="after")
    def _needs(self) -> Aggregation:
        if self.fn != "count" and self.field is None:
            raise ValueError(f"aggregation {self.fn!r} needs 'field'")
        if self.fn == "percentile" and self.q is None:
            raise ValueError("percentile needs 'q', a quantile between 0 and 1")
        return self

    @property
    def decomposable(self) -> bool:
        """True when results of parts of a window merge into the window's."""
        return self.fn not in ("count_distinct", "percentile")

    def result_type(self, dtype: pa.DataType | None) -> pa.DataType | None:
        """Return the result's type over a field of `dtype`.

        None means the type is whatever Polars gives, for the field types
        the rules in the module's docstring leave out.
        """
        if self.fn in ("count", "count_distinct"):
            return pa.int64()
        assert dtype is not None
        if self.fn == "sum":
            return _sum_type(dtype)
        if self.fn in ("mean", "percentile"):
            return pa.float64() if _is_number(dtype) else None
        return dtype if _is_ordered(dtype) else None

    def expr(self, name: str, dtype: pa.DataType | None) -> pl.Expr:
        """Return the Polars expression that aggregates records into the result.

        `dtype` is the result's type (`result_type`), or None.
        """
        import polars as pl

        from dataflare.transforms.expressions import polars_dtype

        if self.field is None:
            return pl.len().cast(pl.Int64).alias(name)
        column = pl.col(self.field)
        if self.fn == "sum" and dtype is not None:
            column = column.cast(polars_dtype(dtype))
        exprs = {
            "count": column.count().cast(pl.Int64),
            # SQL semantics: the sum of no values is null, not 0.
            "sum": pl.when(column.count() > 0).then(column.sum()),
            "min": column.min(),
            "max": column.max(),
            "mean": column.mean(),
            "count_distinct": column.drop_nulls().n_unique().cast(pl.Int64),
            "first": column.first(),
            "last": column.last(),
        }
        if self.fn == "percentile":
            return column.quantile(self.q or 0.0, interpolation="linear").alias(name)
        return exprs[self.fn].alias(name)


@dataclasses.dataclass
class _Partials:
    """How Arrow aggregates records into partial results and merges them.

    Each distinct (column, function) pair is aggregated once, into one
    partial column; an aggregation reads a count column `n` and a value
    column `v` of them.
    """

    keys: list[str]
    casts: dict[str, tuple[str, pa.DataType]] = dataclasses.field(default_factory=dict)
    """Derived input columns: name to (field, type it is cast to)."""
    specs: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    """(input column, Arrow function) to partial column."""
    reads: dict[str, tuple[str | None, str | None]] = dataclasses.field(
        default_factory=dict
    )
    """Aggregation name to its partial columns (n, v)."""
    float_sums: dict[str, str] = dataclasses.field(default_factory=dict)
    """For `mean` of integers, the partial column of the sum in float64."""

    def add(self, name: str, agg: Aggregation, dtype: pa.DataType | None) -> None:
        n = v = None
        if agg.field is None:
            n = self._spec("", "count_all")
        elif agg.fn == "count":
            n = self._spec(agg.field, "count")
        elif agg.fn in ("sum", "mean"):
            assert dtype is not None
            target = _sum_type(dtype) if agg.fn == "sum" else _mean_sum_type(dtype)
            assert target is not None
            column = agg.field
            if target != dtype:
                column = f"__{agg.field}:{target}"
                self.casts[column] = (agg.field, target)
            n, v = self._spec(agg.field, "count"), self._spec(column, "sum")
            if agg.fn == "mean" and target == pa.int64():
                # The exact sum may overflow int64; the float sum cannot.
                column = f"__{agg.field}:{pa.float64()}"
                self.casts[column] = (agg.field, pa.float64())
                self.float_sums[name] = self._spec(column, "sum")
        else:
            v = self._spec(agg.field, agg.fn)
        self.reads[name] = (n, v)

    def _spec(self, column: str, fn: str) -> str:
        return self.specs.setdefault((column, fn), f"__p{len(self.specs)}")

    def partial(self, rows: pa.Table) -> pa.Table:
        """Aggregate records into partial results per key and window."""
        for name, (source, dtype) in self.casts.items():
            # Widening, or to float64, where digits past 2^53 may go.
            column = rows.column(source).cast(dtype, safe=False)
            rows = rows.append_column(name, column)
        aggregations = {
            partial: (None if fn == "count_all" else column, fn)
            for (column, fn), partial in self.specs.items()
        }
        return group_by(rows, self.keys, aggregations)

    def merge(self, parts: Sequence[pa.Table]) -> pa.Table:
        """Merge partial results per key and window, in arrival order."""
        merges = {"count": "sum", "count_all": "sum"}
        aggregations = {
            partial: (partial, merges.get(fn, fn))
            for (_, fn), partial in self.specs.items()
        }
        return group_by(pa.concat_tables(parts), self.keys, aggregations)

    def result(self, merged: pa.Table, name: str, agg: Aggregation) -> pa.ChunkedArray:
        """Return the result of aggregation `name` from merged partial results."""
        n, v = self.reads[name]
        if agg.fn == "count":
            assert n is not None
            return merged.column(n)
        assert v is not None
        if agg.fn == "mean":
            assert n is not None
            return _mean(merged, n, v, self.float_sums.get(name))
        return merged.column(v)


def _mean(merged: pa.Table, n: str, v: str, float_sum: str | None) -> pa.Array:
    """Return sum / count, null where the count is 0.

    With `float_sum`, `v` is an exact int64 sum, used unless the float sum
    shows that it overflowed. Values beyond 2^53 lose digits in the
    division, as in SQL's `avg`.
    """
    nan = float("nan")
    total = to_numpy(merged.column(v).cast(pa.float64(), safe=False), null_value=nan)
    if float_sum is not None:
        approximate = to_numpy(merged.column(float_sum), null_value=nan)
        total = np.where(np.abs(approximate) < 2.0**62, total, approximate)
    counts = to_numpy(merged.column(n)).astype(np.float64)
    some = counts > 0
    means = np.divide(total, counts, out=np.zeros_like(total), where=some)
    result: pa.Array = pc.if_else(
        from_numpy(some), from_numpy(means), pa.nulls(len(means), pa.float64())
    )
    return result


class WindowConfig(PluginConfig):
    kind: Literal["tumbling", "sliding", "session"] = "tumbling"
    size: Duration | None = Field(None, description="Window length (tumbling, sliding)")
    slide: Duration | None = Field(
        None, description="Distance between window starts (sliding)"
    )
    gap: Duration | None = Field(None, description="Inactivity that closes a session")
    key_by: list[str] = Field(
        default_factory=list,
        description="Fields that key the windows; empty for one global set of windows",
    )
    aggregations: dict[str, Aggregation] = Field(min_length=1)
    allowed_lateness: Duration = Field(
        timedelta(0),
        description="How long after a window's end records still count for it",
    )

    @model_validator(mode="after")
    def _shape(self) -> WindowConfig:
        if self.kind in ("tumbling", "sliding") and not self.size:
            raise ValueError(f"a {self.kind} window needs 'size', e.g. size: 1h")
        if self.kind == "sliding":
            if not self.slide:
                raise ValueError("a sliding window needs 'slide', e.g. slide: 15m")
            assert self.size is not None
            if self.slide > self.size:
                raise ValueError("slide must not exceed size")
            if micros(self.size.total_seconds()) % micros(self.slide.total_seconds()):
                raise ValueError("size must be a whole multiple of slide")
        if self.kind == "session" and not self.gap:
            raise ValueError("a session window needs 'gap', e.g. gap: 30m")
        return self


class WindowTransform(Transform[WindowConfig]):
    """Aggregate records per key over tumbling, sliding or session windows."""

    metadata = PluginMetadata(
        "window", PluginKind.WINDOW, "Keyed aggregations over event-time windows"
    )
    Config = WindowConfig
    stateful = True
    input_count = None  # several inputs with one schema are merged
    _input_schema: pa.Schema | None

    # --- schemas ---

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        for other in inputs[1:]:
            if not other.equals(schema):
                raise ValueError(
                    "all inputs of a window must have the same fields and types; "
                    f"got {schema.names} and {other.names}"
                )
        if EVENT_TIME not in schema.names:
            raise ValueError(
                "a window needs event time, but its input records have none; set "
                "`event_time` on the source"
            )
        names = [n for n in schema.names if n != EVENT_TIME]
        for key in self.config.key_by:
            if key not in names:
                raise FieldNotFoundError(key, names, where="key_by")
        for out, agg in self.config.aggregations.items():
            if agg.field is not None and agg.field not in names:
                raise FieldNotFoundError(
                    agg.field, names, where=f"aggregations.{out}.field"
                )
            if out in self.config.key_by or out in (WINDOW_START, WINDOW_END):
                raise ValueError(
                    f"aggregation name {out!r} clashes with a key or window "
                    "field; rename it"
                )
        return self._set_input(schema)

    def _set_input(self, schema: pa.Schema) -> pa.Schema:
        """Derive the result types from the input schema, return the output schema."""
        self._input_schema = schema
        fields = [schema.field(name) for name in self._fields()]
        self._pending_schema = pa.schema([*fields, pa.field(_WS, pa.int64())])
        aggregations = self.config.aggregations
        field_types = {
            name: schema.field(agg.field).type if agg.field else None
            for name, agg in aggregations.items()
        }
        types = {
            name: agg.result_type(field_types[name])
            for name, agg in aggregations.items()
        }
        self._partials: _Partials | None = None
        if (
            self.config.kind != "session"
            and all(agg.decomposable for agg in aggregations.values())
            and all(dtype is not None for dtype in types.values())
        ):
            self._partials = _Partials([*self.config.key_by, _WS])
            for name, agg in aggregations.items():
                self._partials.add(name, agg, field_types[name])
        else:
            types = self._polars_types(schema, types)
        self._types = types
        self._output = pa.schema(
            [
                *(schema.field(key) for key in self.config.key_by),
                pa.field(WINDOW_START, _UTC),
                pa.field(WINDOW_END, _UTC),
                *(pa.field(name, dtype) for name, dtype in types.items()),
                pa.field(EVENT_TIME, _UTC),
            ]
        )
        return self._output

    def _polars_types(
        self, schema: pa.Schema, types: dict[str, pa.DataType | None]
    ) -> dict[str, pa.DataType | None]:
        """Fill in the result types that Polars decides."""
        if all(dtype is not None for dtype in types.values()):
            return types
        import polars as pl

        rows = to_polars(empty_batch(schema)).select(self._fields())
        rows = rows.with_columns(pl.lit(0, pl.Int64).alias(_WS))
        group = rows.group_by([*self.config.key_by, _WS])
        exprs = [
            agg.expr(name, types[name])
            for name, agg in self.config.aggregations.items()
        ]
        try:
            results = to_batch(group.agg(exprs))
        except pl.exceptions.PolarsError as exc:
            unfit = self._unfit_aggregation(group, schema, types)
            if unfit is None:
                raise
            raise unfit from exc
        return {
            name: dtype if dtype is not None else results.schema.field(name).type
            for name, dtype in types.items()
        }

    def _unfit_aggregation(
        self, group: Any, schema: pa.Schema, types: dict[str, pa.DataType | None]
    ) -> ConfigError | None:
        """Return the error naming the aggregation Polars rejects, if one alone is."""
        import polars as pl

        for name, agg in self.config.aggregations.items():
            if types[name] is not None or agg.field is None:
                continue
            try:
                group.agg(agg.expr(name, None))
            except pl.exceptions.PolarsError as exc:
                return ConfigError(
                    f"aggregation {name!r}: {agg.fn} does not apply to field "
                    f"{agg.field!r} of type {schema.field(agg.field).type} "
                    f"({str(exc).splitlines()[0]}); aggregate another field, "
                    "or convert this one with a cast step first",
                    where=f"aggregations.{name}.field",
                )
        return None

    def side_outputs(self, inputs: Sequence[pa.Schema]) -> dict[str, pa.Schema]:
        return {"late": inputs[0]}

    def partition_key(self) -> list[str] | None:
        return list(self.config.key_by)

    # --- state ---

    def __init__(self, config: WindowConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._size = micros(config.size.total_seconds()) if config.size else 0
        self._slide = (
            micros(config.slide.total_seconds()) if config.slide else self._size
        )
        self._gap = micros(config.gap.total_seconds()) if config.gap else 0
        self._lateness = micros(config.allowed_lateness.total_seconds())
        self._watermark = MIN_TIME
        self._input_schema = None
        # Records not yet split per window, oldest first (tumbling, sliding):
        # the fields the window aggregates and `_WS`, their window start.
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_min: int | None = None  # earliest window start in them
        # Earliest event time of the buffered session records, if known.
        self._session_min: int | None = None
        # Per key, the end of its last emitted session (sessions only), and
        # the watermark at which the earliest of them stops deciding lateness.
        self._closed: pl.DataFrame | None = None
        self._closed_expiry = MAX_TIME

    def open(self) -> None:
        self._frames = FrameStore(KeyedStateStore.for_operator(self.context))

    def close(self) -> None:
        frames = getattr(self, "_frames", None)
        if frames is not None:
            frames.close()

    def _fields(self) -> list[str]:
        fields = list(self.config.key_by)
        for agg in self.config.aggregations.values():
            if agg.field is not None and agg.field not in fields:
                fields.append(agg.field)
        return fields

    # --- processing ---

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if self._input_schema is None:
            self._set_input(batch.schema)
        if self.config.kind == "session":
            self._process_session(batch)
            return []

        # `starts` is the start of the last window of each record.
        # NumPy conversions go through `numpy_arrays`, because pyarrow's own
        # conversions import pandas, which would add about 35 MB to every run.
        times = batch.column(EVENT_TIME).cast(pa.int64())
        missing = to_numpy(times.is_null())
        ts = to_numpy(times, null_value=0)
        starts = ts - ts % self._slide
        rows = batch.select(self._fields()).append_column(_WS, from_numpy(starts))
        closes = self._size + self._lateness
        if len(starts) and (starts.min() + closes <= self._watermark or missing.any()):
            # A record without event time belongs to no window, so it is late.
            on_time = self._drop_late(
                batch, missing | (starts + closes <= self._watermark)
            )
            if on_time is not None:
                rows = rows.filter(on_time)

        if self._slide != self._size and rows.num_rows:
            rows = self._explode(rows, closes)
        if rows.num_rows:
            self._add_pending(pa.Table.from_batches([rows]))
        return []

    def _explode(self, rows: pa.RecordBatch, closes: int) -> pa.RecordBatch:
        """Repeat each record once per open sliding window that contains it."""
        count = self._size // self._slide
        index = np.repeat(np.arange(rows.num_rows), count)
        offsets = np.tile(np.arange(count, dtype=np.int64) * self._slide, rows.num_rows)
        starts = to_numpy(rows.column(_WS))[index] - offsets
        # Windows that already fired keep their result, so skip them.
        kept = starts + closes > self._watermark
        exploded = rows.drop_columns([_WS]).take(from_numpy(index[kept]))
        return exploded.append_column(_WS, from_numpy(starts[kept]))

    def _drop_late(self, batch: pa.RecordBatch, late: np.ndarray) -> pa.Array | None:
        """Send the `late` records of `batch` to the side output.

        `late` holds one boolean per record. Returns the mask of the records
        to keep, or None when none is late.
        """
        if not late.any():
            return None
        mask = from_numpy(late)
        late_batch = batch.filter(mask)
        self.context.count("late", late_batch.num_rows)
        self.context.emit_side("late", late_batch)
        on_time: pa.Array = pc.invert(mask)
        return on_time

    def _add_pending(self, rows: pa.Table) -> None:
        if self._pending_rows >= FLUSH_ROWS:
            self._flush()
        self._pending.append(rows)
        self._pending_rows += rows.num_rows
        earliest = pc.min(rows.column(_WS)).as_py()
        if self._pending_min is None or earliest < self._pending_min:
            self._pending_min = earliest

    def _pending_table(self) -> pa.Table:
        if len(self._pending) == 1:
            return self._pending[0]
        return pa.concat_tables(self._pending, promote_options="permissive")

    def _flush(self) -> None:
        """Move the pending records into the frame store, one frame per window."""
        if not self._pending:
            return
        rows = self._pending_table()
        self._pending, self._pending_rows, self._pending_min = [], 0, None
        if self._partials is not None:
            rows = self._partials.partial(rows)
        parts = _split(rows)
        self._frames.add(parts)
        if self._partials is None:
            return
        for start, _ in parts:
            if self._frames.slots.get(start, 0) >= _COMPACT_FRAMES:
                merged = self._partials.merge(self._frames.pop(start))
                self._frames.add([(start, merged)])

    def on_watermark(self, watermark: int) -> list[pa.RecordBatch]:
        self._watermark = watermark
        self._frames.store.advance_watermark(watermark)
        if self.config.kind == "session":
            return self._fire_sessions(watermark)

        # Windows that start at or before `last` close now.
        last = watermark - self._size - self._lateness
        starts = sorted(s for s in self._frames.slots if s <= last)
        take = self._pending_min is not None and self._pending_min <= last
        if not starts and not take:
            return []
        parts = [frame for start in starts for frame in self._frames.pop(start)]
        if take:
            table = self._pending_table()
            closing = to_numpy(table.column(_WS)) <= last
            rest = table.filter(from_numpy(~closing)).combine_chunks()
            self._pending = [rest] if rest.num_rows else []
            self._pending_rows = rest.num_rows
            self._pending_min = pc.min(rest.column(_WS)).as_py()
            ready = table.filter(from_numpy(closing))
            if self._partials is not None:
                ready = self._partials.partial(ready)
            parts.append(ready)
        if self._partials is None:
            return [self._aggregate_records(parts)]
        merged = self._partials.merge(parts) if len(parts) > 1 else parts[0]
        return [self._results(merged)]

    def finish(self) -> list[pa.RecordBatch]:
        return self.on_watermark(MAX_TIME)

    # --- checkpoints ---

    def snapshot_state(self) -> bytes | None:
        meta: dict[str, Any] = {
            "layout": _LAYOUT,
            "watermark": self._watermark,
            "session_min": self._session_min,
            "input_schema": None,
        }
        if self._input_schema is not None:
            data = self._input_schema.serialize().to_pybytes()
            meta["input_schema"] = base64.b64encode(data).decode()
        extra = {_PENDING: list(self._pending)}
        if self._closed is not None:
            extra[_CLOSED] = [self._closed.to_arrow()]
        return self._frames.snapshot(meta, extra)

    def restore_state(self, state: bytes) -> None:
        meta = self._frames.restore(state)
        if meta.get("layout") != _LAYOUT:
            raise ValueError(
                f"window state has layout {meta.get('layout')!r}; this version "
                f"reads {_LAYOUT}. Resume with the DataFlare version that wrote the "
                "checkpoint, or run with --from-scratch"
            )
        self._watermark = int(meta["watermark"])
        self._session_min = meta["session_min"]
        if meta["input_schema"] is not None:
            data = base64.b64decode(meta["input_schema"])
            self._set_input(pa.ipc.read_schema(pa.py_buffer(data)))
        self._pending, self._pending_rows, self._pending_min = [], 0, None
        for frame in self._frames.pop(_PENDING):
            self._add_pending(frame.cast(self._pending_schema))
        closed = self._frames.pop(_CLOSED)
        self._closed = None
        if closed:
            import polars as pl

            self._closed = pl.DataFrame(closed[0])
        self._closed_expiry = MIN_TIME  # recompute it at the next watermark

    # --- aggregation ---

    def _results(self, merged: pa.Table) -> pa.RecordBatch:
        """Return the output records of closing windows from merged partials."""
        assert self._partials is not None
        keys = self.config.key_by
        order = pc.sort_indices(
            merged,
            sort_keys=[(name, "ascending", "at_start") for name in [_WS, *keys]],
        )
        merged = merged.take(order)
        start, end, event_time = _bounds(merged.column(_WS), self._size)
        results = [
            self._partials.result(merged, name, agg)
            for name, agg in self.config.aggregations.items()
        ]
        columns = [*(merged.column(key) for key in keys), start, end, *results]
        table = pa.Table.from_arrays([*columns, event_time], schema=self._output)
        return _one_batch(table, self._output)

    def _aggregate_records(self, parts: list[pa.Table]) -> pa.RecordBatch:
        """Aggregate the records of closing windows with Polars."""
        import polars as pl

        keys = [*self.config.key_by, _WS]
        rows = pl.DataFrame(pa.concat_tables(parts, promote_options="permissive"))
        out = (
            rows.group_by(keys)
            .agg(self._record_exprs())
            .sort([_WS, *self.config.key_by])
        )
        return self._with_bounds(out, pl.col(_WS), pl.col(_WS) + self._size)

    def _record_exprs(self) -> list[pl.Expr]:
        """Return the Polars expressions that aggregate records into results."""
        return [
            agg.expr(name, self._types[name])
            for name, agg in self.config.aggregations.items()
        ]

    def _with_bounds(
        self, df: pl.DataFrame, start: pl.Expr, end: pl.Expr
    ) -> pa.RecordBatch:
        """Return `df`'s results with window bounds, as output records."""
        import polars as pl

        utc = pl.Datetime("us", "UTC")
        out = df.with_columns(
            start.cast(utc).alias(WINDOW_START),
            end.cast(utc).alias(WINDOW_END),
            (end - 1).cast(utc).alias(EVENT_TIME),
        ).select(self._output.names)
        return to_batch(out).cast(self._output)

    # --- sessions ---

    def _process_session(self, batch: pa.RecordBatch) -> None:
        import polars as pl

        df = to_polars(batch.select([*self._fields(), EVENT_TIME]))
        ts = pl.col(EVENT_TIME).dt.epoch("us")
        rows = df.select([*self._fields(), ts.alias(_TS)])
        late = self._session_late(rows).fill_null(False).to_numpy()
        on_time = self._drop_late(batch, late)
        if on_time is not None:
            rows = rows.filter(pl.Series(on_time))
        if rows.height:
            self._buffer_session(rows)

    def _session_late(self, rows: pl.DataFrame) -> pl.Series:
        """Return which records are late: their session closed or was emitted."""
        late = rows[_TS] + (self._gap + self._lateness) <= self._watermark
        closed = self._closed
        if closed is None or not closed.height:
            return late
        # A record before the end of its key's emitted session would join it.
        keys = self.config.key_by
        if keys:
            ends = rows.select(keys).join(
                closed, on=keys, how="left", nulls_equal=True, maintain_order="left"
            )[_END]
            joins: pl.Series = (rows[_TS] < ends).fill_null(False)
        else:
            joins = rows[_TS] < closed[_END][0]
        return late | joins

    def _buffer_session(self, rows: pl.DataFrame) -> None:
        low = rows[_TS].min()
        if isinstance(low, int) and (
            self._session_min is None or low < self._session_min
        ):
            self._session_min = low
        self._frames.add([(_SESSION, rows.to_arrow())])

    def _fire_sessions(self, watermark: int) -> list[pa.RecordBatch]:
        import polars as pl

        self._forget_closed(watermark)
        if _SESSION not in self._frames.slots:
            return []
        earliest = self._session_min
        if earliest is not None and earliest + self._gap + self._lateness > watermark:
            # No session can close yet, because each ends at least `gap` after
            # the earliest buffered record.
            return []

        # NOTE: each firing reads all buffered session records and buffers the
        # still open ones again as one frame, so a key with a long session is
        # read again at every firing until its session closes.
        self._session_min = None
        buffered = pa.concat_tables(
            self._frames.pop(_SESSION), promote_options="permissive"
        )
        rows = pl.DataFrame(buffered)
        # A stable sort, so that records with equal event times keep their
        # arrival order for `first` and `last`.
        rows = rows.sort([*self.config.key_by, _TS], maintain_order=True)
        keys = self.config.key_by
        previous = pl.col(_TS).shift(1)
        new_session = previous.is_null() | ((pl.col(_TS) - previous) >= self._gap)
        for key in keys:
            new_session = new_session | (pl.col(key).ne_missing(pl.col(key).shift(1)))
        rows = rows.with_columns(new_session.cum_sum().alias(_WS))
        ends = rows.group_by(_WS).agg((pl.col(_TS).max() + self._gap).alias(_END))
        rows = rows.join(ends, on=_WS, maintain_order="left")
        closed = pl.col(_END) + self._lateness <= watermark
        done, pending = rows.filter(closed), rows.filter(~closed)
        if pending.height:
            self._buffer_session(pending.drop(_WS, _END))
        if not done.height:
            return []

        out = done.group_by([*keys, _WS], maintain_order=True).agg(
            [
                *self._record_exprs(),
                pl.col(_TS).min().alias("__start"),
                pl.col(_END).first(),
            ]
        )
        self._remember_closed(out.select([*keys, _END]), watermark)
        out = out.sort(["__start", *keys])
        return [self._with_bounds(out, pl.col("__start"), pl.col(_END))]

    def _remember_closed(self, ends: pl.DataFrame, watermark: int) -> None:
        """Keep the end of each key's last emitted session, for `_session_late`."""
        import polars as pl

        if self._closed is not None:
            ends = pl.concat([self._closed, ends])
        keys = self.config.key_by
        latest = pl.col(_END).max()
        self._closed = ends.group_by(keys).agg(latest) if keys else ends.select(latest)
        self._closed_expiry = MIN_TIME  # recompute it
        self._forget_closed(watermark)

    def _forget_closed(self, watermark: int) -> None:
        """Drop session ends that no longer decide lateness.

        A record before such an end has `event time + gap + allowed_lateness`
        at or before the watermark, so it is late anyway.
        """
        if self._closed is None or watermark < self._closed_expiry:
            return
        import polars as pl

        keep = pl.col(_END) + (self._gap + self._lateness) > watermark
        self._closed = self._closed.filter(keep)
        self._closed_expiry = MAX_TIME
        if not self._closed.height:
            self._closed = None
            return
        earliest = self._closed[_END].min()
        assert isinstance(earliest, int)
        self._closed_expiry = earliest + self._gap + self._lateness


def _split(rows: pa.Table) -> list[tuple[int, pa.Table]]:
    """Split `rows` per window start, keeping the arrival order in each part."""
    starts = to_numpy(rows.column(_WS))
    order = np.argsort(starts, kind="stable")
    ordered = starts[order]
    cuts = [0, *(np.flatnonzero(np.diff(ordered)) + 1).tolist(), len(ordered)]
    return [
        (int(ordered[low]), rows.take(from_numpy(order[low:high])))
        for low, high in itertools.pairwise(cuts)
        if high > low
    ]


def _bounds(starts: pa.ChunkedArray, size: int) -> list[pa.Array]:
    """Return window start, window end and event time for window `starts`.

    NumPy adds, because Arrow's `add` converts the Python integer with
    `pa.scalar`, which imports pandas.
    """
    values = to_numpy(starts)
    return [
        from_numpy(values).cast(_UTC),
        from_numpy(values + size).cast(_UTC),
        from_numpy(values + (size - 1)).cast(_UTC),
    ]


def _one_batch(table: pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches() if table.num_rows else []
    return batches[0] if batches else empty_batch(schema)

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
  port, to the dead-letter output. Late records are counted as `late`.
- Output records have the key fields, `window_start`, `window_end` and one
  field per aggregation. Their event time is `window_end` minus 1 µs.
- The window keeps the records of open windows (only the fields it
  aggregates) and aggregates them when the window closes, so every
  aggregation, percentiles and distinct counts included, is exact.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import timedelta
from typing import Literal

import orjson
import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from dataflare.plugin.interface import (
    EVENT_TIME,
    FieldNotFoundError,
    OperatorContext,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.streaming.spec import Duration
from dataflare.streaming.time import micros
from dataflare.transforms.expressions import to_batch, to_polars

WINDOW_START = "window_start"
WINDOW_END = "window_end"
_TS = "__ts"
_WS = "__window"

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

    def expr(self, name: str) -> pl.Expr:
        if self.field is None:
            return pl.len().cast(pl.Int64).alias(name)
        column = pl.col(self.field)
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
        empty = to_polars(pa.RecordBatch.from_pylist([], schema=schema))
        buffered = self._project(empty).with_columns(pl.lit(0, pl.Int64).alias(_WS))
        return to_batch(self._aggregate(buffered, [0])).schema

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
        self._watermark = -(2**63)
        self._windows: dict[int, list[pl.DataFrame]] = {}  # start -> buffered rows
        self._sessions: list[pl.DataFrame] = []  # session mode: unassigned rows

    def _fields(self) -> list[str]:
        fields = list(self.config.key_by)
        for agg in self.config.aggregations.values():
            if agg.field is not None and agg.field not in fields:
                fields.append(agg.field)
        return fields

    def _project(self, df: pl.DataFrame) -> pl.DataFrame:
        return df.select(
            [*self._fields(), pl.col(EVENT_TIME).dt.epoch("us").alias(_TS)]
        )

    # --- processing ---

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        df = to_polars(batch)
        rows = self._project(df)
        ts = rows[_TS]
        if self.config.kind == "session":
            late = (ts + self._gap + self._lateness) <= self._watermark
        else:
            last_start = ts - ts % self._slide
            late = (last_start + self._size + self._lateness) <= self._watermark
        late = late.fill_null(False)
        if late.any():
            late_batch = batch.filter(late.to_arrow())
            self.context.count("late", late_batch.num_rows)
            self.context.emit_side("late", late_batch)
            rows = rows.filter(~late)
        if rows.height:
            self._buffer(rows)
        return []

    def _buffer(self, rows: pl.DataFrame) -> None:
        if self.config.kind == "session":
            self._sessions.append(rows)
            return
        starts = pl.col(_TS) - pl.col(_TS) % self._slide
        if self._slide == self._size:
            assigned = rows.with_columns(starts.alias(_WS))
        else:
            count = self._size // self._slide
            offsets = pl.int_ranges(0, count, dtype=pl.Int64) * self._slide
            assigned = rows.with_columns((starts - offsets).alias(_WS)).explode(_WS)
            # Windows that already fired keep their result; skip them.
            closed = pl.col(_WS) + self._size + self._lateness <= self._watermark
            assigned = assigned.filter(~closed)
        for (start,), part in assigned.partition_by(_WS, as_dict=True).items():
            self._windows.setdefault(int(start), []).append(part)

    def on_watermark(self, watermark: int) -> list[pa.RecordBatch]:
        self._watermark = watermark
        if self.config.kind == "session":
            return self._fire_sessions(watermark)
        ready = sorted(
            s for s in self._windows if s + self._size + self._lateness <= watermark
        )
        if not ready:
            return []
        frames = [pl.concat(self._windows.pop(start)) for start in ready]
        return [to_batch(self._aggregate(pl.concat(frames), ready))]

    def finish(self) -> list[pa.RecordBatch]:
        return self.on_watermark(2**63 - 1)

    # --- checkpoints ---

    def snapshot_state(self) -> bytes | None:
        frames = [frame for parts in self._windows.values() for frame in parts]
        buffered = pl.concat(frames) if frames else None
        sessions = pl.concat(self._sessions) if self._sessions else None
        header = orjson.dumps({"watermark": self._watermark})
        parts = [header, _ipc(buffered), _ipc(sessions)]
        return b"".join(len(p).to_bytes(8, "little") + p for p in parts)

    def restore_state(self, state: bytes) -> None:
        parts = []
        offset = 0
        while offset < len(state):
            size = int.from_bytes(state[offset : offset + 8], "little")
            parts.append(state[offset + 8 : offset + 8 + size])
            offset += 8 + size
        header, buffered, sessions = parts
        self._watermark = int(orjson.loads(header)["watermark"])
        self._windows = {}
        if buffered:
            frame = pl.read_ipc(io.BytesIO(buffered))
            for (start,), part in frame.partition_by(_WS, as_dict=True).items():
                self._windows[int(start)] = [part]
        self._sessions = [pl.read_ipc(io.BytesIO(sessions))] if sessions else []

    # --- aggregation ---

    def _aggregate(self, rows: pl.DataFrame, starts: list[int]) -> pl.DataFrame:
        keys = [*self.config.key_by, _WS]
        aggs = [agg.expr(name) for name, agg in self.config.aggregations.items()]
        out = rows.group_by(keys, maintain_order=True).agg(aggs)
        return self._with_bounds(
            out.sort([_WS, *self.config.key_by]), pl.col(_WS), pl.col(_WS) + self._size
        )

    def _with_bounds(
        self, df: pl.DataFrame, start: pl.Expr, end: pl.Expr
    ) -> pl.DataFrame:
        utc = pl.Datetime("us", "UTC")
        names = [
            *self.config.key_by,
            WINDOW_START,
            WINDOW_END,
            *self.config.aggregations,
            EVENT_TIME,
        ]
        return df.with_columns(
            start.cast(utc).alias(WINDOW_START),
            end.cast(utc).alias(WINDOW_END),
            (end - 1).cast(utc).alias(EVENT_TIME),
        ).select(names)

    def _fire_sessions(self, watermark: int) -> list[pa.RecordBatch]:
        if not self._sessions:
            return []
        rows = pl.concat(self._sessions).sort([*self.config.key_by, _TS])
        keys = self.config.key_by
        previous = pl.col(_TS).shift(1)
        new_session = previous.is_null() | ((pl.col(_TS) - previous) >= self._gap)
        for key in keys:
            new_session = new_session | (pl.col(key).ne_missing(pl.col(key).shift(1)))
        rows = rows.with_columns(new_session.cum_sum().alias(_WS))
        ends = rows.group_by(_WS).agg((pl.col(_TS).max() + self._gap).alias("__end"))
        rows = rows.join(ends, on=_WS)
        closed = pl.col("__end") + self._lateness <= watermark
        done, pending = rows.filter(closed), rows.filter(~closed)
        self._sessions = [pending.drop(_WS, "__end")] if pending.height else []
        if not done.height:
            return []
        aggs = [agg.expr(name) for name, agg in self.config.aggregations.items()]
        out = done.group_by([*keys, _WS]).agg(
            [*aggs, pl.col(_TS).min().alias("__start"), pl.col("__end").first()]
        )
        out = out.sort(["__start", *keys])
        return [to_batch(self._with_bounds(out, pl.col("__start"), pl.col("__end")))]


def _ipc(frame: pl.DataFrame | None) -> bytes:
    if frame is None or frame.height == 0:
        return b""
    buffer = io.BytesIO()
    frame.write_ipc(buffer)
    return buffer.getvalue()

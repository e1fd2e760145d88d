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

State: the kept records are keyed state, so they are in the pipeline's
state backend and saved in checkpoints through it. They are kept as
column frames per window start (a session window keeps one set of
pending frames). With `checkpointing.state_backend: disk`, each frame is
written to the on-disk backend as Arrow IPC when it arrives and read back
when its window fires, so open windows may hold more records than fit in
memory. With the memory backend (the default), frames stay in memory as
they are and are only encoded into the backend for a checkpoint, so
buffering costs no encoding. Either backend restores a checkpoint of the
other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, Literal

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
from dataflare.state.keyed import BYTES, INT64, JSON, KeyedStateStore
from dataflare.streaming.spec import Duration
from dataflare.streaming.time import micros
from dataflare.transforms.expressions import to_batch, to_polars

WINDOW_START = "window_start"
WINDOW_END = "window_end"
_TS = "__ts"
_WS = "__window"
_SESSION = -(2**63)  # the window start under which session rows are kept

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
        # Open window starts (or _SESSION), each with its number of frames.
        self._open: dict[int, int] = {}
        # Earliest event time of the pending session rows, if known.
        self._session_min: int | None = None

    def open(self) -> None:
        self._buffer_state = _FrameState(KeyedStateStore.for_operator(self.context))

    def close(self) -> None:
        state = getattr(self, "_buffer_state", None)
        if state is not None:
            state.close()

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
            low = rows.select(pl.col(_TS).min()).item()
            if low is not None and (
                self._session_min is None or low < self._session_min
            ):
                self._session_min = int(low)
            self._buffer_state.add([(_SESSION, rows)])
            self._open[_SESSION] = self._open.get(_SESSION, 0) + 1
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
        parts = [
            (int(start), part)
            for (start,), part in assigned.partition_by(_WS, as_dict=True).items()
        ]
        self._buffer_state.add(parts)
        for start, _ in parts:
            self._open[start] = self._open.get(start, 0) + 1

    def on_watermark(self, watermark: int) -> list[pa.RecordBatch]:
        self._watermark = watermark
        self._buffer_state.store.advance_watermark(watermark)
        if self.config.kind == "session":
            return self._fire_sessions(watermark)
        ready = sorted(
            s for s in self._open if s + self._size + self._lateness <= watermark
        )
        if not ready:
            return []
        frames = []
        for start in ready:
            del self._open[start]
            frames.extend(self._buffer_state.pop(start))
        return [to_batch(self._aggregate(pl.concat(frames), ready))]

    def finish(self) -> list[pa.RecordBatch]:
        return self.on_watermark(2**63 - 1)

    # --- checkpoints ---

    def snapshot_state(self) -> bytes | None:
        meta = {
            "watermark": self._watermark,
            "open": sorted(self._open),
            "session_min": self._session_min,
        }
        return self._buffer_state.snapshot(meta)

    def restore_state(self, state: bytes) -> None:
        meta = self._buffer_state.restore(state)
        self._watermark = int(meta["watermark"])
        self._session_min = meta["session_min"]
        self._open = self._buffer_state.counts(meta["open"])

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
        if not self._open:
            return []
        earliest = self._session_min
        if earliest is not None and earliest + self._gap + self._lateness > watermark:
            # No session can close yet, because each ends at least `gap` after
            # the earliest pending record.
            return []

        # NOTE: with the disk backend, each firing reads all pending session
        # rows and writes the still open ones back as one frame.
        self._open.clear()
        self._session_min = None
        rows = pl.concat(self._buffer_state.pop(_SESSION))
        rows = rows.sort([*self.config.key_by, _TS])
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
        if pending.height:
            pending = pending.drop(_WS, "__end")
            self._buffer(pending)
        if not done.height:
            return []
        aggs = [agg.expr(name) for name, agg in self.config.aggregations.items()]
        out = done.group_by([*keys, _WS]).agg(
            [*aggs, pl.col(_TS).min().alias("__start"), pl.col("__end").first()]
        )
        out = out.sort(["__start", *keys])
        return [to_batch(self._with_bounds(out, pl.col("__start"), pl.col("__end")))]


class _FrameState:
    """Buffered frames of a window in keyed state: a map per window start.

    The map state `frames` maps each window start (the key) to its frames:
    a sequence number (the map key, so frames stay in arrival order) and
    the frame as an Arrow IPC stream. With an on-disk backend every frame is
    written there when added. With the memory backend the frames stay in
    `_frames` as they are, and `snapshot` writes them into the backend only
    for the checkpoint, then removes them again.
    """

    def __init__(self, store: KeyedStateStore) -> None:
        self.store = store
        self._spill = store.backend.kind != "memory"
        self._map = store.map_state("frames", INT64, BYTES)
        self._meta = store.value_state("meta", JSON)
        self._frames: dict[int, list[pl.DataFrame]] = {}
        self._next = 0  # sequence number of the next frame

    def add(self, parts: Sequence[tuple[int, pl.DataFrame]]) -> None:
        if not self._spill:
            for start, frame in parts:
                self._frames.setdefault(start, []).append(frame)
            return
        self._map.put_many(
            (INT64.encode(start), seq, _encode(frame))
            for seq, (start, frame) in enumerate(parts, self._next)
        )
        self._next += len(parts)

    def pop(self, start: int) -> list[pl.DataFrame]:
        """Remove and return the frames of `start`, in arrival order."""
        if not self._spill:
            return self._frames.pop(start, [])
        key = INT64.encode(start)
        frames = [_decode(data) for data in self._stored(key)]
        self._map.clear(key)
        return frames

    def _stored(self, key: bytes) -> Iterator[bytes]:
        entries = sorted(self._map.items(key))
        return (data for _, data in entries)

    def counts(self, starts: Sequence[int]) -> dict[int, int]:
        """Return the number of frames of each of `starts` that has any."""
        found: dict[int, int] = {}
        for start in starts:
            if self._spill:
                count = self._map.size(INT64.encode(start))
            else:
                count = len(self._frames.get(start, []))
            if count:
                found[start] = count
        return found

    def snapshot(self, meta: dict[str, Any]) -> bytes:
        if self._spill:
            self._meta.put(b"", {**meta, "next": self._next})
            return self.store.snapshot()
        entries: list[tuple[bytes, int, bytes]] = []
        for start, frames in self._frames.items():
            for frame in frames:
                entries.append((INT64.encode(start), len(entries), _encode(frame)))
        # A disk backend that restores this snapshot numbers new frames after these.
        self._meta.put(b"", {**meta, "next": len(entries)})
        self._map.put_many(entries)
        try:
            return self.store.snapshot()
        finally:
            for start in self._frames:
                self._map.clear(INT64.encode(start))

    def restore(self, state: bytes) -> dict[str, Any]:
        """Load a `snapshot` and return the metadata that was given to it."""
        self.store.restore(state)
        meta = self._meta.get(b"")
        if not isinstance(meta, dict):
            raise ValueError(
                "window state snapshot is missing its metadata, so the checkpoint "
                "is corrupt; resume from an earlier checkpoint or run with "
                "--from-scratch"
            )
        self._next = int(meta["next"])
        self._frames = {}
        if not self._spill:
            for start in meta["open"]:
                key = INT64.encode(start)
                frames = [_decode(data) for data in self._stored(key)]
                self._map.clear(key)
                if frames:
                    self._frames[start] = frames
        return meta

    def close(self) -> None:
        self.store.close()


def _encode(frame: pl.DataFrame) -> bytes:
    table = frame.to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def _decode(data: bytes) -> pl.DataFrame:
    frame = pl.from_arrow(pa.ipc.open_stream(data).read_all())
    assert isinstance(frame, pl.DataFrame)
    return frame

"""`dedupe`: drop records whose key was already seen close by in event time.

Example, drop repeated sensor readings::

    sources:
      readings:
        type: jsonl
        config: {path: readings.jsonl}
        event_time: {field: read_at}
        watermark: {max_out_of_orderness: 30s}
    transformations:
      unique_readings:
        type: dedupe
        inputs: [readings]
        config:
          key: [sensor_id, reading_id]
          within: 10m

A record is a duplicate when a record with the same `key` values that was
kept earlier has an event time less than `within` away from the record's
own, before or after it. Duplicates are dropped and counted as
`duplicates`. Other records pass on unchanged, in arrival order. Null key
values are equal to each other, as in SQL's `DISTINCT`.

The step needs event time, so set `event_time` on the source. It keeps the
event times of kept records per key, and drops a kept time once the
watermark has passed it by `within`, because no on-time record can then
be its duplicate. A late record (one behind the watermark) is compared only
with the times still kept, so a late duplicate may pass. A record without
an event time goes to the dead-letter output.

With `parallelism` above 1, records are partitioned by `key`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from dataflare.plugin.interface import (
    EVENT_TIME,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.streaming.spec import Duration
from dataflare.streaming.time import micros
from dataflare.streaming.validate import requires_event_time
from dataflare.transforms.expressions import to_polars

_TIME = "__time"
_ROW = "__row"
_INT64_MIN = -(2**63)


class DedupeConfig(PluginConfig):
    key: list[str] = Field(
        min_length=1, description="Fields whose values identify a record"
    )
    within: Duration = Field(
        description="Event-time distance below which a record with the same key "
        "is a duplicate, e.g. 10m"
    )

    @field_validator("key", mode="before")
    @classmethod
    def _one_field(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("within")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if micros(value.total_seconds()) <= 0:
            raise ValueError("within must be more than 0, e.g. '10m'")
        return value


class DedupeTransform(Transform[DedupeConfig]):
    """Drop records whose key was kept within a span of event time."""

    metadata = PluginMetadata(
        "dedupe", PluginKind.FILTER, "Drop duplicate records by key and event time"
    )
    Config = DedupeConfig

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        for name in self.config.key:
            if name not in schema.names:
                raise FieldNotFoundError(name, schema.names, where="key")
        requires_event_time(schema, self.context.step, "dedupe")
        return schema

    def partition_key(self) -> list[str] | None:
        return list(self.config.key)

    def open(self) -> None:
        self._within = micros(self.config.within.total_seconds())
        # Key fields and event time (µs, column _TIME) of the kept records
        # that on-time records may still duplicate.
        self._state: pl.DataFrame | None = None

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if batch.num_rows == 0:
            return []
        batch = self._reject_timeless(batch)
        keep = self._keep_mask(batch)
        duplicates = int(batch.num_rows - np.count_nonzero(keep))
        if duplicates:
            self.context.count("duplicates", duplicates)
        kept = batch.filter(pa.array(keep))
        return [kept] if kept.num_rows else []

    def on_watermark(self, watermark: int) -> list[pa.RecordBatch]:
        """Drop kept times that no on-time record can be within `within` of."""
        if self._state is not None:
            threshold = max(watermark - self._within, _INT64_MIN)
            self._state = self._state.filter(pl.col(_TIME) > threshold)
        return []

    def _reject_timeless(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        times = batch.column(EVENT_TIME)
        if times.null_count == 0:
            return batch
        missing = times.is_null()
        self.context.reject(
            batch.filter(missing),
            "missing event time: dedupe needs `_event_time` on every record; "
            "check the source's event_time setting",
        )
        return batch.filter(pc.invert(missing))

    def _keep_mask(self, batch: pa.RecordBatch) -> np.ndarray:
        """Return which records to keep, and add the kept ones to the state."""
        keys = self.config.key
        times = batch.column(EVENT_TIME).cast(pa.int64())
        frame = to_polars(batch.select(keys)).with_columns(
            pl.Series(_TIME, times.to_numpy(zero_copy_only=False))
        )
        # Only records whose key repeats in the batch or is in the state can
        # be duplicates. The others are kept without the per-record loop.
        repeated = frame.select(pl.len().over(keys) > 1).to_series()
        candidate = repeated.to_numpy().copy()
        if self._state is not None and self._state.height:
            known = frame.with_row_index(_ROW).join(
                self._state.select(keys).unique(), on=keys, how="semi", nulls_equal=True
            )
            candidate[known[_ROW].to_numpy()] = True
        keep = np.ones(batch.num_rows, dtype=bool)
        rows = np.flatnonzero(candidate)
        if len(rows):
            keep[rows] = self._check_candidates(frame[rows])
        kept = frame.filter(pl.Series(keep))
        self._state = kept if self._state is None else pl.concat([self._state, kept])
        return keep

    def _check_candidates(self, candidates: pl.DataFrame) -> np.ndarray:
        """Decide record by record, in arrival order, which candidates to keep."""
        keys = self.config.key
        earlier: dict[tuple[object, ...], list[int]] = {}
        if self._state is not None:
            relevant = self._state.join(
                candidates.select(keys).unique(), on=keys, how="semi", nulls_equal=True
            )
            for *key, time in relevant.iter_rows():
                earlier.setdefault(tuple(key), []).append(time)
        keep = np.ones(candidates.height, dtype=bool)
        for row, (*key, time) in enumerate(candidates.iter_rows()):
            times = earlier.setdefault(tuple(key), [])
            if any(abs(time - other) < self._within for other in times):
                keep[row] = False
            else:
                times.append(time)
        return keep

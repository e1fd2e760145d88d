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

The kept times are keyed state (a list state per key, with a time to live
of `within`), so they live in the pipeline's state backend (in memory, or
on disk with `checkpointing.state_backend: disk`) and are saved in
checkpoints.

With `parallelism` above 1, records are partitioned by `key`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Annotated

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, WithJsonSchema, field_validator

from dataflare.plugin.interface import (
    EVENT_TIME,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.state.keyed import INT64, KeyedStateStore, encode_keys
from dataflare.streaming.spec import Duration
from dataflare.streaming.time import micros
from dataflare.streaming.validate import requires_event_time
from dataflare.transforms.expressions import to_polars


class DedupeConfig(PluginConfig):
    key: Annotated[
        list[str],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1},
                ],
                "description": "Field, or fields, whose values identify a record",
            }
        ),
    ] = Field(min_length=1, description="Fields whose values identify a record")
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
    stateful = True

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
        self._store = KeyedStateStore.for_operator(self.context)
        # Event times (µs) of the kept records of each key that on-time
        # records may still duplicate.
        self._kept = self._store.list_state("kept", INT64, ttl=self._within)

    def close(self) -> None:
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if batch.num_rows == 0:
            return []
        batch = self._reject_timeless(batch)
        if batch.num_rows == 0:
            return []
        keep = self._keep_mask(batch)
        duplicates = int(batch.num_rows - np.count_nonzero(keep))
        if duplicates:
            self.context.count("duplicates", duplicates)
        kept = batch.filter(pa.array(keep))
        return [kept] if kept.num_rows else []

    def on_watermark(self, watermark: int) -> list[pa.RecordBatch]:
        """Advance the state's clock: kept times `within` behind it expire."""
        self._store.advance_watermark(watermark)
        return []

    def snapshot_state(self) -> bytes | None:
        return self._store.snapshot()

    def restore_state(self, state: bytes) -> None:
        self._store.restore(state)

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
        frame = to_polars(batch.select(self.config.key))
        keys = encode_keys(frame, self.config.key)
        times = batch.column(EVENT_TIME).cast(pa.int64()).to_numpy(zero_copy_only=False)
        earlier = self._earlier_times(keys)
        # Only records whose key repeats in the batch or has kept times can
        # be duplicates. The others are kept without comparing times.
        repeated = frame.select(pl.len().over(self.config.key) > 1).to_series()
        candidate = repeated.to_numpy().copy()
        for row, key in enumerate(keys):
            if key in earlier:
                candidate[row] = True
        keep = np.ones(batch.num_rows, dtype=bool)
        changed: dict[bytes, list[int]] = {}
        for row in np.flatnonzero(~candidate).tolist():
            changed[keys[row]] = [int(times[row])]
        for row in np.flatnonzero(candidate).tolist():
            key, time = keys[row], int(times[row])
            kept = changed.get(key)
            if kept is None:
                kept = changed[key] = list(earlier.get(key, []))
            if any(abs(time - other) < self._within for other in kept):
                keep[row] = False
            else:
                kept.append(time)
        items = list(changed.items())
        self._kept.update_many(items, time=[max(kept) for _, kept in items])
        return keep

    def _earlier_times(self, keys: list[bytes]) -> dict[bytes, list[int]]:
        """Return the kept times of `keys` that on-time records may duplicate."""
        unique = list(dict.fromkeys(keys))
        threshold = self._store.watermark - self._within
        earlier = {}
        for key, kept in zip(unique, self._kept.get_many(unique), strict=True):
            live = [time for time in kept if time > threshold]
            if live:
                earlier[key] = live
        return earlier

"""What flows between operator instances: data, watermarks, idleness, end.

Each message carries the `channel` it arrived on: one channel per
(upstream instance, port) edge into a downstream instance, so that the
downstream instance can track a watermark per input and know when all of
them have ended. Between threads the messages wait in a `Channel`; within a
chain the upstream hands them to the downstream instance by a direct call,
and data goes without a `Data` object.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(slots=True)
class Data:
    channel: int
    batch: pa.RecordBatch
    created_ns: int  # monotonic clock when the source emitted the rows


@dataclass(slots=True)
class Watermark:
    channel: int
    time: int  # microseconds since the epoch, UTC
    created_ns: int


@dataclass(slots=True)
class IdleState:
    channel: int
    idle: bool


@dataclass(slots=True)
class Barrier:
    """Checkpoint barrier: everything before it belongs to `checkpoint_id`."""

    channel: int
    checkpoint_id: int


@dataclass(slots=True)
class End:
    channel: int
    suspend: bool = False  # stopped for a checkpoint: keep state, emit nothing


Message = Data | Watermark | IdleState | Barrier | End

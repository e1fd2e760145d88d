"""Adaptive micro-batching between a source and the rest of the pipeline.

The batcher sends rows on at once while the downstream queue is empty, so a
quiet pipeline adds no delay. When downstream falls behind, rows collect
into larger batches, up to `max_rows`, which raises throughput exactly when
it is needed. No row waits longer than `linger_seconds`.
"""

from __future__ import annotations

import time

import pyarrow as pa


class AdaptiveBatcher:
    def __init__(self, *, max_rows: int, linger_seconds: float) -> None:
        self.max_rows = max_rows
        self.linger_seconds = linger_seconds
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0
        self._oldest = 0.0

    def add(
        self, batch: pa.RecordBatch, *, downstream_idle: bool
    ) -> list[pa.RecordBatch]:
        """Queue `batch`; return the batches that should be sent now."""
        if batch.num_rows > self.max_rows and not self._pending:
            return _split(batch, self.max_rows)
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append(batch)
        self._rows += batch.num_rows
        if downstream_idle or self._rows >= self.max_rows:
            return self.drain()
        return self.due()

    def due(self) -> list[pa.RecordBatch]:
        """Return the pending rows if the oldest has waited `linger_seconds`."""
        if self._pending and time.monotonic() - self._oldest >= self.linger_seconds:
            return self.drain()
        return []

    def drain(self) -> list[pa.RecordBatch]:
        if not self._pending:
            return []
        pending, self._pending, self._rows = self._pending, [], 0
        if len(pending) == 1:
            merged = pending[0]
        else:
            merged = pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
        return _split(merged, self.max_rows)


def _split(batch: pa.RecordBatch, size: int) -> list[pa.RecordBatch]:
    if batch.num_rows <= size:
        return [batch]
    return [batch.slice(start, size) for start in range(0, batch.num_rows, size)]

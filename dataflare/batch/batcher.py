"""Cutting and merging record batches for micro-batching.

Batches are never held back to fill up: a source passes each batch on as
soon as it has read it. Where two threads meet, `Channel` merges the
batches that wait while the consumer is busy (`concat_batches`); within a
chain of steps on one thread, each batch goes straight through. Batches
larger than `execution.max_batch_rows` are cut (`split_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa


def split_batch(batch: pa.RecordBatch, max_rows: int) -> list[pa.RecordBatch]:
    """Cut `batch` into zero-copy slices of at most `max_rows` rows."""
    if batch.num_rows <= max_rows:
        return [batch]
    return [
        batch.slice(start, max_rows) for start in range(0, batch.num_rows, max_rows)
    ]


def concat_batches(batches: Sequence[pa.RecordBatch]) -> pa.RecordBatch:
    """Merge batches of one schema into one contiguous batch.

    Raises:
        pyarrow.ArrowInvalid: if the schemas differ.
    """
    if len(batches) == 1:
        return batches[0]
    return pa.concat_batches(batches)

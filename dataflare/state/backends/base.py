"""The `StateBackend` interface and the snapshot format all backends share.

A backend stores byte values under a two-level key in named tables:
`(table, key, sub)`. Value and list states use `sub = b""`. A map state
stores one entry per map key in `sub`, so `scan(table, key)` reads all
entries of one key.

Snapshots are Arrow IPC streams with one row per entry (columns `table`,
`key`, `sub`, `value`), so a snapshot taken by one backend can be restored
into another: a checkpoint written with the in-memory backend can resume on
the on-disk one, and the other way round.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Entry = tuple[bytes, bytes, bytes]
"""One stored entry: key, sub-key and value."""
Columns = tuple[list[bytes], list[bytes], list[bytes]]
"""Entries of one table as three lists: keys, sub-keys and values."""

SNAPSHOT_FORMAT = b"1"
_SNAPSHOT_SCHEMA = pa.schema(
    [
        ("table", pa.string()),
        ("key", pa.large_binary()),
        ("sub", pa.large_binary()),
        ("value", pa.large_binary()),
    ],
    metadata={"dataflare.state.format": SNAPSHOT_FORMAT},
)
SNAPSHOT_ROWS = 65536


class StateBackendError(Exception):
    """A state backend cannot be opened, read or restored."""


class StateBackend(ABC):
    """Byte storage of keyed state, in named tables of `(key, sub) -> value`.

    Backends are used by one operator instance, on one thread.
    """

    kind: ClassVar[str]

    @abstractmethod
    def get(self, table: str, key: bytes, sub: bytes = b"") -> bytes | None:
        """Return the value of one entry, or None if it is absent."""

    def get_many(
        self, table: str, keys: Sequence[bytes], sub: bytes = b""
    ) -> list[bytes | None]:
        """Return the values of `(key, sub)` for each key, None where absent."""
        return [self.get(table, key, sub) for key in keys]

    @abstractmethod
    def put(self, table: str, key: bytes, value: bytes, sub: bytes = b"") -> None:
        """Store one entry, replacing an entry with the same key and sub-key."""

    def put_many(self, table: str, entries: Iterable[Entry]) -> None:
        """Store `(key, sub, value)` entries."""
        for key, sub, value in entries:
            self.put(table, key, value, sub)

    @abstractmethod
    def delete(self, table: str, key: bytes, sub: bytes = b"") -> None:
        """Delete one entry; deleting an absent entry is no error."""

    def delete_many(self, table: str, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Delete `(key, sub)` entries."""
        for key, sub in entries:
            self.delete(table, key, sub)

    def delete_key(self, table: str, key: bytes) -> None:
        """Delete every entry of `key` (all its sub-keys)."""
        self.delete_many(table, [(key, sub) for _, sub, _ in self.scan(table, key)])

    @abstractmethod
    def scan(self, table: str, key: bytes | None = None) -> Iterator[Entry]:
        """Yield the entries of `table`, or only those of `key`.

        Entries must not be written while the iterator is in use.
        """

    @abstractmethod
    def tables(self) -> list[str]:
        """Return the names of the tables that may have entries, sorted."""

    @abstractmethod
    def clear(self) -> None:
        """Delete every entry of every table."""

    def close(self) -> None:  # noqa: B027 - optional for backends without files
        """Release files and memory. The backend is unusable afterwards."""

    # --- checkpoints ---

    def snapshot(self) -> bytes:
        """Return every entry in the shared snapshot format (Arrow IPC)."""
        return write_snapshot(
            (table, columns)
            for table in self.tables()
            for columns in self.snapshot_columns(table)
        )

    def snapshot_columns(self, table: str) -> Iterator[Columns]:
        """Yield the entries of `table` as column lists of up to 65,536 rows."""
        return columns_of(self.scan(table))

    def restore(self, data: bytes) -> None:
        """Replace the content with a snapshot from `snapshot()` of any backend.

        Raises:
            StateBackendError: `data` is not a state snapshot.
        """
        self.clear()
        for table, (keys, subs, values) in read_snapshot(data):
            self.put_many(table, zip(keys, subs, values, strict=True))


def columns_of(entries: Iterable[Entry]) -> Iterator[Columns]:
    """Group entries into column lists of up to `SNAPSHOT_ROWS` rows."""
    columns: Columns = ([], [], [])
    for entry in entries:
        for column, value in zip(columns, entry, strict=True):
            column.append(value)
        if len(columns[0]) >= SNAPSHOT_ROWS:
            yield columns
            columns = ([], [], [])
    if columns[0]:
        yield columns


def write_snapshot(chunks: Iterable[tuple[str, Columns]]) -> bytes:
    """Encode chunks of `(table, (keys, subs, values))` as a snapshot."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, _SNAPSHOT_SCHEMA) as writer:
        for table, (keys, subs, values) in chunks:
            if not keys:
                continue
            arrays = [
                pa.array([table], pa.string()).take(
                    pa.array(np.zeros(len(keys), dtype=np.int32))
                ),
                pa.array(keys, pa.large_binary()),
                pa.array(subs, pa.large_binary()),
                pa.array(values, pa.large_binary()),
            ]
            writer.write_batch(
                pa.RecordBatch.from_arrays(arrays, schema=_SNAPSHOT_SCHEMA)
            )
    return sink.getvalue()


def read_snapshot(data: bytes) -> Iterator[tuple[str, Columns]]:
    """Yield the entries of a snapshot as chunks of `(table, (keys, subs, values))`.

    Raises:
        StateBackendError: `data` is not a state snapshot of a known format.
    """
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
    except pa.ArrowInvalid as exc:
        raise StateBackendError(
            f"keyed state snapshot of {len(data)} bytes is not an Arrow IPC "
            f"stream ({exc}); the checkpoint is corrupt or was written by "
            "another program"
        ) from exc
    metadata = reader.schema.metadata or {}
    found = metadata.get(b"dataflare.state.format")
    if found != SNAPSHOT_FORMAT or reader.schema.names != _SNAPSHOT_SCHEMA.names:
        raise StateBackendError(
            f"keyed state snapshot has format {found!r} and fields "
            f"{reader.schema.names}; this version reads format "
            f"{SNAPSHOT_FORMAT!r}. Resume with the DataFlare version that wrote "
            "the checkpoint, or run with --from-scratch"
        )
    for batch in reader:
        tables = batch.column(0)
        keys, subs, values = (column.to_pylist() for column in batch.columns[1:])
        if tables.null_count == 0 and len(pc.unique(tables)) == 1:
            yield tables[0].as_py(), (keys, subs, values)
            continue
        names = tables.to_pylist()
        for index, name in enumerate(names):
            yield name, ([keys[index]], [subs[index]], [values[index]])

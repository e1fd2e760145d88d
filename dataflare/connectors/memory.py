"""In-memory source and sink, for the Python API and for tests.

Example::

    p = Pipeline("demo")
    rows = p.source("rows", "memory", records=[{"id": 1}, {"id": 2}])
    p.destination("out", "memory", [rows])
    assert p.run().output("out").num_rows == 2
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from pydantic import ConfigDict, Field

from dataflare.plugin.interface import (
    PluginConfig,
    PluginKind,
    PluginMetadata,
    SequentialOrigin,
    Sink,
    SinkConfig,
    SinkInfo,
    Source,
    SourceBatch,
)


class MemorySourceConfig(PluginConfig):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    records: list[dict[str, Any]] | pa.Table | pa.RecordBatch | list[pa.RecordBatch] = (
        Field(description="Rows as dicts, an Arrow table, a batch or a list of batches")
    )
    batch_rows: int = Field(65536, ge=1, description="Rows per emitted batch")


class MemorySource(Source[MemorySourceConfig]):
    """Emit records held in memory, in order, in batches of `batch_rows`."""

    metadata = PluginMetadata("memory", PluginKind.SOURCE, "Records held in memory")
    Config = MemorySourceConfig

    def _table(self) -> pa.Table:
        records = self.config.records
        if isinstance(records, pa.Table):
            return records
        if isinstance(records, pa.RecordBatch):
            return pa.Table.from_batches([records])
        if records and isinstance(records[0], pa.RecordBatch):
            return pa.Table.from_batches(records)
        if not records:
            raise ValueError(
                "records is empty; give at least one record or an "
                "empty Arrow table with a schema"
            )
        return pa.Table.from_pylist(records)

    def schema(self) -> pa.Schema:
        return self._table().schema

    def open(self) -> None:
        self._emitted = 0

    def snapshot_position(self) -> Any:
        return {"records": self._emitted}

    def restore_position(self, position: Any) -> None:
        self._emitted = int(position["records"])

    def read(self) -> Iterator[SourceBatch]:
        table = self._table().slice(self._emitted)
        for batch in table.to_batches(max_chunksize=self.config.batch_rows):
            origin = SequentialOrigin("memory", self._emitted + 1, unit="record")
            self._emitted += batch.num_rows
            yield SourceBatch(batch, origin)
            if self.context.stopping:
                return


class MemorySinkConfig(SinkConfig):
    pass


class MemorySink(Sink[MemorySinkConfig]):
    """Collect records in memory; read them with `RunSummary.output(step)`."""

    metadata = PluginMetadata("memory", PluginKind.SINK, "Collect records in memory")
    Config = MemorySinkConfig
    same_fields = True  # the records become one table

    def open(self) -> None:
        self._batches: list[pa.RecordBatch] = []

    def write(self, batch: pa.RecordBatch) -> None:
        self._batches.append(batch)

    def table(self) -> pa.Table:
        if self._batches:
            return pa.Table.from_batches(self._batches)
        schema = self.input_schema or pa.schema([])
        return schema.empty_table()

    def info(self) -> SinkInfo:
        return SinkInfo(delivery="at-least-once", table=self.table())

"""Parquet files: `ParquetSource` and `ParquetSink`.

Example::

    sources:
      trips:
        type: parquet
        config: {path: "data/trips/*.parquet", columns: [id, fare, pickup_at]}
    destinations:
      hourly:
        type: parquet
        inputs: [windows]
        config: {path: out/hourly.parquet}

The source reads one file, a glob or a directory, file after file in name
order, in batches of up to `batch_rows` rows. The first file fixes the
schema unless `schema` is set. Fields that a later file lacks are null, and
a value that does not convert to its field's type sends its record to the
dead-letter output with the position `FILE row N`. With `follow: true` the
source runs on and reads each new file that appears, once it is complete
(a Parquet file is readable only after its footer is written). Progress
counts records, from the row counts in the files' footers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from dataflare.connectors.files.arrow_ipc import (
    BatchFile,
    RecordBatchFileSource,
    RecordBatchSourceConfig,
)
from dataflare.connectors.files.sinks import FileSink, FileSinkConfig
from dataflare.plugin.interface import PluginKind, PluginMetadata


class ParquetSourceConfig(RecordBatchSourceConfig):
    batch_rows: int = Field(65536, ge=1, description="Maximum rows per batch read")


class _ParquetFile(BatchFile):
    def __init__(self, path: Path, batch_rows: int) -> None:
        self._file = pq.ParquetFile(path)
        self._batch_rows = batch_rows
        self.schema = self._file.schema_arrow
        self._first_group = 0  # row groups before it are skipped
        self._skipped = 0  # records in those row groups

    def skip_to(self, rows: int) -> int:
        """Skip the row groups that end at or before record `rows`."""
        metadata = self._file.metadata
        while self._first_group < metadata.num_row_groups:
            size = metadata.row_group(self._first_group).num_rows
            if self._skipped + size > rows:
                break
            self._skipped += size
            self._first_group += 1
        return self._skipped

    def batches(self, columns: list[str]) -> Iterator[tuple[pa.RecordBatch, int]]:
        rows = self._skipped
        groups = range(self._first_group, self._file.metadata.num_row_groups)
        for batch in self._file.iter_batches(
            self._batch_rows, row_groups=list(groups), columns=columns
        ):
            rows += batch.num_rows
            yield batch, rows

    def close(self) -> None:
        self._file.close()


class ParquetSource(RecordBatchFileSource[ParquetSourceConfig]):
    """Read Parquet files: a file, a glob or a directory; optionally follow it."""

    metadata = PluginMetadata(
        "parquet", PluginKind.SOURCE, "Parquet files, globs or directories"
    )
    Config = ParquetSourceConfig
    extensions = (".parquet", ".parq", ".pq")
    format_name = "Parquet"
    progress_unit = "records"

    def _open_file(self, path: Path) -> BatchFile:
        return _ParquetFile(path, self.config.batch_rows)

    def _input_size(self, path: Path) -> int | None:
        try:
            rows: int = pq.read_metadata(path).num_rows
        except (pa.ArrowInvalid, OSError):
            return None
        return rows


class ParquetSinkConfig(FileSinkConfig):
    compression: Literal["snappy", "zstd", "gzip", "lz4", "none"] = "zstd"
    row_group_rows: int = Field(1 << 20, ge=1, description="Rows per row group")


class ParquetSink(FileSink[ParquetSinkConfig]):
    """Write Parquet files (one file, or rolling files in a directory)."""

    metadata = PluginMetadata("parquet", PluginKind.SINK, "Parquet files")
    Config = ParquetSinkConfig
    extension = ".parquet"

    def _open_writer(self, path: Path, schema: pa.Schema) -> Any:
        return pq.ParquetWriter(str(path), schema, compression=self.config.compression)

    def _write_batch(self, writer: Any, batch: pa.RecordBatch) -> None:
        writer.write_batch(batch, row_group_size=self.config.row_group_rows)

"""Parquet files: `ParquetSink` (and `ParquetSource`).

Example::

    destinations:
      hourly:
        type: parquet
        inputs: [windows]
        config: {path: out/hourly.parquet}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from dataflare.connectors.files.sinks import FileSink, FileSinkConfig
from dataflare.plugin.interface import PluginKind, PluginMetadata


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

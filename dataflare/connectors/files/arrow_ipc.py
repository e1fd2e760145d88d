"""Arrow IPC files: `ArrowIpcSource` and `ArrowIpcSink`.

Example::

    sources:
      ticks:
        type: arrow
        config: {path: data/ticks/, follow: true}
    destinations:
      snapshot:
        type: arrow
        inputs: [ticks]
        config: {path: out/ticks.arrow, compression: zstd}

The source reads both IPC formats: the file format (also called Feather
version 2, with a footer that indexes the batches) and the stream format.
It detects the format from the first bytes of each file. Record batches are
read as they were written, from memory-mapped files.

This module also contains `RecordBatchFileSource`, the base of the sources
that read whole files of record batches (Arrow IPC and Parquet). It handles
paths, globs and directories, takes the schema of the first file, converts
later files to that schema, and with `follow` picks up files that appear in
the directory. A file that cannot be opened yet, such as a file-format or
Parquet file whose footer is not written, is tried again at the next poll.

NOTE: each file is read once, so writers should write a file under another
name and rename it when complete, as DataFlare's file sinks do. A
stream-format file found while its writer is still appending is read up to
its last complete batch, and the records written after that are never read.
A file cut inside a batch fails the run with an OSError.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import pyarrow as pa
from pydantic import Field, model_validator

from dataflare.connectors.files.base import (
    FileSourceConfig,
    missing_input_error,
    resolve_paths,
    warn_if_no_input,
)
from dataflare.connectors.files.sinks import FileSink, FileSinkConfig
from dataflare.plugin.interface import (
    IDLE,
    Idle,
    OperatorContext,
    PluginKind,
    PluginMetadata,
    Progress,
    SequentialOrigin,
    Source,
    SourceBatch,
)

ARROW_FILE_MAGIC = b"ARROW1"


# --- the shared base -----------------------------------------------------------


class RecordBatchSourceConfig(FileSourceConfig):
    columns: list[str] | None = Field(
        None, min_length=1, description="Fields to read, in this order; all if unset"
    )

    @model_validator(mode="after")
    def _schema_or_columns(self) -> RecordBatchSourceConfig:
        if self.schema_ is not None and self.columns is not None:
            raise ValueError(
                "set either `schema` (fields and their types) or `columns` "
                "(fields with the types of the first file), not both"
            )
        return self


class BatchFile:
    """One open input file: its schema and its record batches."""

    schema: pa.Schema

    @abstractmethod
    def batches(self, columns: list[str]) -> Iterator[tuple[pa.RecordBatch, int]]:
        """Yield the batches with `columns` only, each with the progress so far.

        The progress is in the source's unit and counts from the file's start.
        """

    def skip_to(self, rows: int) -> int:
        """Make `batches` start at or before record `rows`; return where it starts.

        Formats that can seek skip whole units (Parquet row groups) here; the
        default skips nothing, and the caller drops records it reads again.
        """
        return 0

    def close(self) -> None:
        """Release the file."""


ConfigT = TypeVar("ConfigT", bound=RecordBatchSourceConfig)


class RecordBatchFileSource(Source[ConfigT], Generic[ConfigT]):
    """Read files of record batches: a file, a glob or a directory."""

    extensions: ClassVar[tuple[str, ...]]
    format_name: ClassVar[str]
    progress_unit: ClassVar[str]

    @abstractmethod
    def _open_file(self, path: Path) -> BatchFile:
        """Open `path`. Raises pa.ArrowInvalid or OSError if it is unreadable."""

    @abstractmethod
    def _input_size(self, path: Path) -> int | None:
        """Return the size of `path` in the progress unit, or None if unknown."""

    # --- schema ---

    def __init__(self, config: ConfigT, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._first_schema: pa.Schema | None = None
        # progress() may be called from another thread before open().
        self._done = 0
        self._sizes: dict[Path, int] = {}
        # Checkpoint positions: files read to their end, the file being read
        # and its records read so far (rejected ones included).
        self._finished: set[str] = set()
        self._current: str | None = None
        self._current_rows = 0
        self._file_start = 0  # progress when the file being read was opened
        self._resume: dict[str, Any] | None = None

    def schema(self) -> pa.Schema:
        declared = self.config.declared_schema()
        if declared is not None:
            return declared
        # Keep the schema: the first file may change while the source runs.
        if self._first_schema is None:
            self._first_schema = self._schema_of_first_file()
        return self._first_schema

    def _schema_of_first_file(self) -> pa.Schema:
        files = resolve_paths(self.config.path, self.extensions)
        if not files:
            raise missing_input_error(self.config.path, self.config.follow)
        file = self._open_or_raise(files[0])
        try:
            schema = file.schema
        finally:
            file.close()
        if self.config.columns is None:
            return schema
        missing = [name for name in self.config.columns if name not in schema.names]
        if missing:
            raise ValueError(
                f"{files[0]}: no field {', '.join(map(repr, missing))}; fields "
                f"are: {', '.join(schema.names)}. Fix `columns`"
            )
        return pa.schema([schema.field(name) for name in self.config.columns])

    def _open_or_raise(self, path: Path) -> BatchFile:
        try:
            return self._open_file(path)
        except (pa.ArrowInvalid, OSError) as exc:
            detail = str(exc).rstrip(". ")
            raise ValueError(
                f"{path}: cannot read as {self.format_name}: {detail}. Check that "
                f"the file is complete and in {self.format_name} format"
            ) from exc

    # --- reading ---

    def open(self) -> None:
        self._schema = self.schema()
        files = resolve_paths(self.config.path, self.extensions)
        warn_if_no_input(
            self.context.logger, self.config.path, files, self.config.follow
        )
        for path in files:
            self._count_size(path)

    def _count_size(self, path: Path) -> None:
        if path not in self._sizes:
            size = self._input_size(path)
            if size is not None:
                self._sizes[path] = size

    @property
    def bounded(self) -> bool:
        return not self.config.follow

    def progress(self) -> Progress | None:
        total = max(sum(self._sizes.values()), self._done)
        return Progress(done=self._done, total=total, unit=self.progress_unit)

    # --- checkpoints ---

    def snapshot_position(self) -> Any:
        """Return the files read to their end and the records read of the next.

        `rows` counts the records of `file` already emitted or rejected; a
        resumed run skips them.
        """
        return {
            "done": sorted(self._finished),
            "file": self._current,
            "rows": self._current_rows,
            # Progress before the file being read, which a resumed run reads
            # again from its start (skipping `rows` records).
            "progress": self._done if self._current is None else self._file_start,
        }

    def restore_position(self, position: Any) -> None:
        if not position:
            return
        self._finished = set(position["done"])
        self._resume = position
        self._done = int(position.get("progress", 0))

    def _resume_rows(self, path: Path) -> int:
        """Return the records of `path` read before the checkpoint resumed from."""
        resume = self._resume
        if resume is None or resume["file"] != str(path):
            return 0
        self._resume = None
        return int(resume["rows"])

    # --- reading ---

    def read(self) -> Iterator[SourceBatch | Idle]:
        waiting: set[Path] = set()
        while not self.context.stopping:
            found = False
            for path in resolve_paths(self.config.path, self.extensions):
                if str(path) in self._finished:
                    continue
                file = self._open_when_ready(path, waiting)
                if file is None:
                    continue
                found = True
                self._count_size(path)
                try:
                    yield from self._read_file(path, file, self._resume_rows(path))
                finally:
                    file.close()
                if self.context.stopping:
                    return
                self._finished.add(str(path))
                self._current = None
                self._current_rows = 0
            if not self.config.follow:
                return
            if not found:
                yield IDLE
                time.sleep(self.config.poll_interval.total_seconds())

    def _open_when_ready(self, path: Path, waiting: set[Path]) -> BatchFile | None:
        """Open `path`; in follow mode, return None while it is unreadable."""
        if not self.config.follow:
            return self._open_or_raise(path)
        try:
            file = self._open_file(path)
        except (pa.ArrowInvalid, OSError) as exc:
            if path not in waiting:
                waiting.add(path)
                self.context.logger.info(
                    "%s: cannot read as %s yet (%s); trying again at each poll",
                    path,
                    self.format_name,
                    exc,
                )
            return None
        waiting.discard(path)
        return file

    def _read_file(
        self, path: Path, file: BatchFile, skip: int = 0
    ) -> Iterator[SourceBatch]:
        """Read `path`, leaving out its first `skip` records."""
        columns = [name for name in self._schema.names if name in file.schema.names]
        start = self._file_start = self._done
        first_row = 1
        self._current = str(path)
        self._current_rows = skip
        if skip:
            skipped = file.skip_to(skip)
            skip -= skipped
            first_row += skipped
        for raw, done in file.batches(columns):
            if skip >= raw.num_rows:
                skip -= raw.num_rows
                first_row += raw.num_rows
                continue
            if skip:
                raw = raw.slice(skip)
                first_row += skip
                skip = 0
            batch = self._conform(path, raw, first_row)
            origin = SequentialOrigin(str(path), first_row, unit="row")
            first_row += raw.num_rows
            self._current_rows = first_row - 1
            self._done = start + done
            if batch.num_rows:
                yield SourceBatch(batch, origin)
            if self.context.stopping:
                return
        self._done = max(self._done, start + self._sizes.get(path, 0))

    # --- schema conversion ---

    def _conform(
        self, path: Path, batch: pa.RecordBatch, first_row: int
    ) -> pa.RecordBatch:
        """Return `batch` with the source schema's fields and types.

        Fields the file lacks become null. Records with a value that does
        not convert to the field's type go to the dead-letter output.
        """
        if batch.schema.equals(self._schema):
            return batch.replace_schema_metadata(self._schema.metadata)
        arrays = []
        bad: dict[int, str] = {}
        for field in self._schema:
            if field.name in batch.schema.names:
                column = batch.column(field.name)
                arrays.append(_convert_column(path, column, field, bad))
            else:
                arrays.append(pa.nulls(batch.num_rows, field.type))
        result = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        if not bad:
            return result
        rows = sorted(bad)
        self.context.reject(
            batch.take(pa.array(rows)),
            [bad[row] for row in rows],
            [f"{path} row {first_row + row}" for row in rows],
        )
        keep = [True] * batch.num_rows
        for row in rows:
            keep[row] = False
        return result.filter(pa.array(keep))


def _convert_column(
    path: Path, column: pa.Array, field: pa.Field, bad: dict[int, str]
) -> pa.Array:
    """Cast `column` to `field`'s type, with nulls for the values that fail.

    Adds the row of each failed value and the reason to `bad`.

    Raises:
        ValueError: the column's type does not convert to the field's at all.
    """
    if column.type == field.type:
        return column
    try:
        return _cast_values(column, field, 0, bad)
    except pa.ArrowNotImplementedError as exc:
        raise ValueError(
            f"{path}: field {field.name!r} has type {column.type}, which does not "
            f"convert to {field.type}, the type in `schema` or in the first file; "
            "set `schema`, or read files of different layouts in separate sources"
        ) from exc


_VALUE_BY_VALUE_MAX = 64


def _cast_values(
    column: pa.Array, field: pa.Field, offset: int, bad: dict[int, str]
) -> pa.Array:
    """Cast `column` (rows from `offset` on), halving it while a value fails."""
    try:
        return column.cast(field.type)
    except pa.ArrowInvalid as exc:
        if len(column) > _VALUE_BY_VALUE_MAX:
            middle = len(column) // 2
            head = _cast_values(column.slice(0, middle), field, offset, bad)
            tail = _cast_values(column.slice(middle), field, offset + middle, bad)
            return pa.concat_arrays([head, tail])
        if len(column) > 1:
            parts = [
                _cast_values(column.slice(i, 1), field, offset + i, bad)
                for i in range(len(column))
            ]
            return pa.concat_arrays(parts)
        bad.setdefault(
            offset,
            f"field {field.name!r}: value {column[0].as_py()!r} does not convert "
            f"to {field.type}: {exc}",
        )
        return pa.nulls(1, field.type)


# --- Arrow IPC -----------------------------------------------------------------


class ArrowIpcSourceConfig(RecordBatchSourceConfig):
    format: Literal["auto", "file", "stream"] = Field(
        "auto",
        description="IPC format: `file` (with a footer, as in Feather v2), "
        "`stream`, or `auto` to detect it from each file's first bytes",
    )


class _ArrowFile(BatchFile):
    """An Arrow IPC file in file or stream format, memory-mapped."""

    def __init__(self, path: Path, layout: str) -> None:
        self._source = pa.memory_map(str(path))
        try:
            if layout == "auto":
                layout = (
                    "file" if self._source.read(6) == ARROW_FILE_MAGIC else "stream"
                )
                self._source.seek(0)
            self._size = self._source.size()
            self._reader: Any = (
                pa.ipc.open_file(self._source)
                if layout == "file"
                else pa.ipc.open_stream(self._source)
            )
        except BaseException:
            self._source.close()
            raise
        self.layout = layout
        self.schema = self._reader.schema

    def batches(self, columns: list[str]) -> Iterator[tuple[pa.RecordBatch, int]]:
        if self.layout == "file":
            count = self._reader.num_record_batches
            for index in range(count):
                batch = self._reader.get_batch(index)
                yield batch.select(columns), self._size * (index + 1) // count
            return
        for batch in self._reader:
            yield batch.select(columns), self._source.tell()

    def close(self) -> None:
        self._source.close()


class ArrowIpcSource(RecordBatchFileSource[ArrowIpcSourceConfig]):
    """Read Arrow IPC files (file or stream format): a file, a glob or a directory."""

    metadata = PluginMetadata(
        "arrow", PluginKind.SOURCE, "Arrow IPC files (file and stream formats)"
    )
    Config = ArrowIpcSourceConfig
    extensions = (".arrow", ".arrows", ".ipc", ".feather")
    format_name = "Arrow IPC"
    progress_unit = "bytes"

    def _open_file(self, path: Path) -> BatchFile:
        return _ArrowFile(path, self.config.format)

    def _input_size(self, path: Path) -> int | None:
        try:
            return path.stat().st_size
        except OSError:
            return None


class ArrowIpcSinkConfig(FileSinkConfig):
    format: Literal["file", "stream"] = Field(
        "file", description="IPC format: `file` (with a footer) or `stream`"
    )
    compression: Literal["lz4", "zstd", "none"] = Field(
        "none", description="Compression of the record batch buffers"
    )


class ArrowIpcSink(FileSink[ArrowIpcSinkConfig]):
    """Write Arrow IPC files (one file, or rolling files in a directory)."""

    metadata = PluginMetadata("arrow", PluginKind.SINK, "Arrow IPC files")
    Config = ArrowIpcSinkConfig
    extension = ".arrow"

    def _open_writer(self, path: Path, schema: pa.Schema) -> Any:
        compression = (
            None if self.config.compression == "none" else self.config.compression
        )
        options = pa.ipc.IpcWriteOptions(compression=compression)
        if self.config.format == "stream":
            return pa.ipc.new_stream(str(path), schema, options=options)
        return pa.ipc.new_file(str(path), schema, options=options)

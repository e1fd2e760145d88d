"""CSV files: `CsvSource` and `CsvSink`.

Example::

    sources:
      flights:
        type: csv
        config: {path: data/flights.csv, null_values: ["", "NA"]}

The source parses with Arrow's streaming CSV reader, which handles quoted
fields with line breaks, CRLF line ends, a UTF-8 byte order mark and a
missing final newline. Every value is read as text first and converted to
the field's type afterwards, so one bad value rejects one record, not the
whole block. A row with the wrong number of fields, or a value that does
not convert, goes to the dead-letter output with its file and record
number (the first data record is record 1).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import Field

from dataflare.connectors.files.base import (
    ByteProgress,
    FileSourceConfig,
    cast_strings,
    missing_input_error,
    resolve_paths,
)
from dataflare.connectors.files.sinks import FileSink, FileSinkConfig
from dataflare.plugin.interface import (
    IDLE,
    Idle,
    PluginKind,
    PluginMetadata,
    Progress,
    SequentialOrigin,
    Source,
    SourceBatch,
)

DEFAULT_NULLS = ["", "NA", "N/A", "NULL", "null", "NaN", "nan", "None", "#N/A"]
_EXTENSIONS = (".csv", ".tsv", ".csv.gz", ".txt")


class CsvSourceConfig(FileSourceConfig):
    delimiter: str = Field(",", min_length=1, max_length=1)
    quote_char: str = Field('"', min_length=1, max_length=1)
    header: bool = Field(True, description="First line names the fields")
    columns: list[str] | None = Field(None, description="Field names when header: false")
    null_values: list[str] = Field(default_factory=lambda: list(DEFAULT_NULLS))
    block_size: int = Field(4 << 20, ge=1 << 12, description="Bytes parsed per block")
    infer_rows: int = Field(10_000, ge=1, description="Rows read to infer field types")


class CsvSource(Source[CsvSourceConfig]):
    """Read CSV files: one file, a glob or a directory; optionally follow them."""

    metadata = PluginMetadata("csv", PluginKind.SOURCE, "CSV files, globs or directories")
    Config = CsvSourceConfig

    def open(self) -> None:
        self._schema = self.schema()
        self._files = resolve_paths(self.config.path, _EXTENSIONS)
        self._progress = ByteProgress(self._files)

    @property
    def bounded(self) -> bool:
        return not self.config.follow

    def progress(self) -> Progress | None:
        return self._progress.progress()

    # --- schema ---

    def schema(self) -> pa.Schema:
        declared = self.config.declared_schema()
        if declared is not None:
            return declared
        files = resolve_paths(self.config.path, _EXTENSIONS)
        if not files:
            raise missing_input_error(self.config.path, self.config.follow)
        for path in files:
            schema = self._infer(path)
            if schema is not None:
                return schema
        raise ValueError(
            f"cannot infer field types: every file matching {self.config.path!r} is "
            "empty; set `schema`"
        )

    def _infer(self, path: Path) -> pa.Schema | None:
        read = self._read_options(block_size=1 << 20)
        try:
            reader = pacsv.open_csv(path, read_options=read,
                                    parse_options=self._parse_options(lambda row: "skip"),
                                    convert_options=pacsv.ConvertOptions(
                                        null_values=self.config.null_values,
                                        strings_can_be_null=True))
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return None
            raise ValueError(f"{path}: cannot parse as CSV: {exc}") from exc
        rows: list[pa.RecordBatch] = []
        count = 0
        try:
            for batch in reader:
                rows.append(batch)
                count += batch.num_rows
                if count >= self.config.infer_rows:
                    break
        except pa.ArrowInvalid:
            pass  # types of later blocks disagree; the first blocks decide
        fields = []
        for field in reader.schema:
            dtype = field.type
            if pa.types.is_null(dtype):
                dtype = pa.string()
            elif pa.types.is_timestamp(dtype):
                dtype = pa.timestamp("us", tz="UTC")
            elif pa.types.is_integer(dtype):
                dtype = pa.int64()
            elif pa.types.is_floating(dtype):
                dtype = pa.float64()
            fields.append(pa.field(field.name, dtype))
        return pa.schema(fields)

    # --- reading ---

    def _read_options(self, block_size: int | None = None) -> pacsv.ReadOptions:
        return pacsv.ReadOptions(
            block_size=block_size or self.config.block_size,
            column_names=None if self.config.header else self.config.columns,
            autogenerate_column_names=not self.config.header and not self.config.columns,
        )

    def _parse_options(self, handler: Any) -> pacsv.ParseOptions:
        return pacsv.ParseOptions(
            delimiter=self.config.delimiter,
            quote_char=self.config.quote_char,
            newlines_in_values=True,
            invalid_row_handler=handler,
        )

    def _convert_options(self) -> pacsv.ConvertOptions:
        return pacsv.ConvertOptions(
            column_types={name: pa.string() for name in self._schema.names},
            null_values=self.config.null_values,
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        )

    def read(self) -> Iterator[SourceBatch | Idle]:
        done: set[Path] = set()
        while True:
            for path in resolve_paths(self.config.path, _EXTENSIONS):
                if path in done:
                    continue
                done.add(path)
                if self.config.follow:
                    yield from self._follow(path)
                else:
                    yield from self._read_file(path)
                if self.context.stopping:
                    return
            if not self.config.follow or self.context.stopping:
                return
            yield IDLE
            time.sleep(self.config.poll_interval.total_seconds())

    def _read_file(self, path: Path) -> Iterator[SourceBatch]:
        invalid: list[tuple[str, str]] = []

        def on_invalid(row: Any) -> str:
            invalid.append((row.text, f"expected {row.expected_columns} fields, "
                                      f"found {row.actual_columns}"))
            return "skip"

        with path.open("rb") as file:
            yield from self._read_stream(path, file, on_invalid, invalid)

    def _read_stream(self, path: Path, file: Any, on_invalid: Any,
                     invalid: list[tuple[str, str]]) -> Iterator[SourceBatch]:
        try:
            reader = pacsv.open_csv(file, read_options=self._read_options(),
                                    parse_options=self._parse_options(on_invalid),
                                    convert_options=self._convert_options())
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return
            raise ValueError(f"{path}: cannot parse as CSV: {exc}") from exc
        self._check_header(path, reader.schema)
        first = 1
        size = path.stat().st_size
        start = self._progress.done
        while True:
            try:
                raw = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                raise ValueError(f"{path} near record {first}: cannot parse: {exc}") from exc
            if invalid:
                self._reject_invalid(path, first, invalid)
            batch = self._typed(path, raw, first)
            first += raw.num_rows
            self._progress.done = start + min(size, file.tell())
            yield SourceBatch(batch, SequentialOrigin(str(path), first - raw.num_rows,
                                                      unit="record"))
            if self.context.stopping:
                return
        if invalid:
            self._reject_invalid(path, first, invalid)
        self._progress.done = start + size

    def _check_header(self, path: Path, schema: pa.Schema) -> None:
        missing = [n for n in self._schema.names if n not in schema.names]
        if missing and len(missing) == len(self._schema.names):
            raise ValueError(
                f"{path}: header has none of the fields {self._schema.names}; "
                "check `delimiter`, or set header: false with `columns`"
            )

    def _typed(self, path: Path, raw: pa.RecordBatch, first: int) -> pa.RecordBatch:
        batch, bad = cast_strings(raw, self._schema)
        if not bad:
            return batch
        rows = [row for row, _ in bad]
        self.context.reject(
            raw.take(pa.array(rows)),
            [reason for _, reason in bad],
            [f"{path} record {first + row}" for row in rows],
        )
        keep = pa.array([True] * batch.num_rows)
        mask = keep.to_numpy(zero_copy_only=False).copy()
        mask[rows] = False
        return batch.filter(pa.array(mask))

    def _reject_invalid(self, path: Path, first: int, invalid: list[tuple[str, str]]) -> None:
        self.context.reject(
            [text for text, _ in invalid],
            [reason for _, reason in invalid],
            [f"{path} near record {first}"] * len(invalid),
        )
        invalid.clear()

    def _follow(self, path: Path) -> Iterator[SourceBatch | Idle]:
        """Read `path` and then the complete lines appended to it, until stopped."""
        offset = 0
        header: list[str] | None = None if self.config.header else self._schema.names
        record = 1
        while not self.context.stopping:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            end = chunk.rfind(b"\n")
            if end < 0:
                yield IDLE
                time.sleep(self.config.poll_interval.total_seconds())
                continue
            data = chunk[: end + 1]
            offset += end + 1
            if header is None:
                first_line, _, data = data.partition(b"\n")
                header = [h.strip().strip(self.config.quote_char)
                          for h in first_line.decode("utf-8-sig").split(self.config.delimiter)]
            if data.strip():
                raw = self._parse_chunk(path, data, header, record)
                if raw is not None and raw.num_rows:
                    batch = self._typed(path, raw, record)
                    record += raw.num_rows
                    yield SourceBatch(batch, SequentialOrigin(str(path), record - raw.num_rows,
                                                              unit="record"))

    def _parse_chunk(self, path: Path, data: bytes, header: list[str], record: int
                     ) -> pa.RecordBatch | None:
        invalid: list[tuple[str, str]] = []

        def on_invalid(row: Any) -> str:
            invalid.append((row.text, f"expected {row.expected_columns} fields, "
                                      f"found {row.actual_columns}"))
            return "skip"

        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=header),
            parse_options=self._parse_options(on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                null_values=self.config.null_values, strings_can_be_null=True),
        )
        if invalid:
            self._reject_invalid(path, record, invalid)
        if table.num_rows == 0:
            return None
        return table.combine_chunks().to_batches()[0]


class CsvSinkConfig(FileSinkConfig):
    delimiter: str = Field(",", min_length=1, max_length=1)
    header: bool = True


class CsvSink(FileSink[CsvSinkConfig]):
    """Write CSV files (one file, or rolling files in a directory)."""

    metadata = PluginMetadata("csv", PluginKind.SINK, "CSV files")
    Config = CsvSinkConfig
    extension = ".csv"

    def _open_writer(self, path: Path, schema: pa.Schema) -> Any:
        return pacsv.CSVWriter(
            str(path), schema,
            write_options=pacsv.WriteOptions(include_header=self.config.header,
                                             delimiter=self.config.delimiter),
        )

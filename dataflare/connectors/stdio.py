"""Standard input and output: `StdinSource` and `StdoutSink`.

Example::

    sources:
      events:
        type: stdin
        config: {format: jsonl, schema: {id: int, kind: string, at: timestamp}}
    destinations:
      out:
        type: stdout
        inputs: [events]

`StdinSource` reads JSON lines or CSV lines from standard input until end of
input, in batches of the lines available, so a pipeline handles each line
soon after it arrives. A bad line goes to the dead-letter output with the
position `stdin line N`. Without `schema`, the source infers field types
from the first lines (up to `infer_rows`, or those that arrive before input
pauses), which it keeps and then reads as usual. In CSV mode each record is
one line, so quoted values cannot contain line breaks.

`StdoutSink` writes each batch as JSON lines to standard output and flushes
it, so a downstream program receives every batch as soon as it is written.

Standard input cannot be read again, so the source reports no checkpoint
position: it keeps `Source.snapshot_position`, which returns None, and the
engine then labels the pipeline's outputs at least once. After a crash the
resumed run reads only what arrives on its own standard input. Lines read
after the last checkpoint by the run that crashed are lost unless the
program feeding it sends them again. With a feeder that does so, stdin is
at least once; it is never exactly once.
"""

from __future__ import annotations

import csv
import io
import os
import select
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import IO, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import Field, field_validator, model_validator

from dataflare.connectors.files.base import cast_strings, parse_type
from dataflare.connectors.files.csv import DEFAULT_NULLS
from dataflare.connectors.files.jsonl import (
    BOM,
    JsonLinesParser,
    encode_json_lines,
    infer_schema,
    sample_objects,
)
from dataflare.plugin.interface import (
    IDLE,
    Idle,
    NumberedOrigin,
    OperatorContext,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    SinkInfo,
    Source,
    SourceBatch,
)
from dataflare.streaming.spec import Duration

INPUT_NAME = "stdin"
_READ_BYTES = 1 << 16
_CSV_ONLY = ("delimiter", "quote_char", "header", "columns", "null_values")


# --- reading lines as they arrive -------------------------------------------------


class InputLines:
    """Bytes read from a binary stream, handed out as blocks of complete lines.

    Reads wait on the stream's file descriptor with `select`, so a reader
    can give up after a timeout and check whether the run is stopping.
    Streams without a file descriptor (such as `io.BytesIO`) are read
    directly. `peek` keeps the lines it returns, so the schema inference
    of one source instance and the reading of another see the same lines.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.eof = False
        self._buffer = bytearray()
        self._next_line = 1
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self._fd = None

    def fill(self, timeout: float | None) -> bool:
        """Read the bytes available, waiting up to `timeout` seconds for some.

        Returns:
            False if no byte came within `timeout` or the input had ended.
        """
        if self.eof:
            return False
        if self._fd is not None:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if not ready:
                return False
            chunk = os.read(self._fd, _READ_BYTES)
        else:
            read = getattr(self.stream, "read1", self.stream.read)
            chunk = read(_READ_BYTES)
        if not chunk:
            self.eof = True
            return True
        self._buffer += chunk
        if self._next_line == 1 and self._buffer.startswith(BOM):
            del self._buffer[: len(BOM)]
        return True

    @property
    def buffered(self) -> int:
        """Bytes read but not yet taken."""
        return len(self._buffer)

    def peek(self, lines: int, quiet_seconds: float) -> bytes:
        """Return up to `lines` complete lines, without taking them.

        Waits until that many lines have arrived, the input has ended, or
        no byte came for `quiet_seconds` after the first complete line.
        """
        while not self.eof and self._buffer.count(b"\n") < lines:
            has_line = b"\n" in self._buffer
            arrived = self.fill(quiet_seconds if has_line else None)
            if has_line and not arrived:
                break
        end = len(self._buffer) if self.eof else self._buffer.rfind(b"\n") + 1
        return bytes(self._buffer[:end])

    def take(self) -> tuple[bytes, int]:
        """Take the complete lines (all bytes once the input ended).

        Returns:
            The block of lines and the line number of its first line.
        """
        end = len(self._buffer) if self.eof else self._buffer.rfind(b"\n") + 1
        block = bytes(self._buffer[:end])
        del self._buffer[:end]
        first = self._next_line
        self._next_line += block.count(b"\n")
        if block and not block.endswith(b"\n"):
            self._next_line += 1
        return block, first


_shared: InputLines | None = None


def input_lines(stream: IO[bytes]) -> InputLines:
    """Return the process-wide `InputLines` of `stream`, created on first use."""
    global _shared
    if _shared is None or _shared.stream is not stream:
        _shared = InputLines(stream)
    return _shared


def _stdin() -> IO[bytes]:
    return sys.stdin.buffer


# --- the source --------------------------------------------------------------------


class StdinSourceConfig(PluginConfig):
    format: Literal["jsonl", "csv"] = Field(
        "jsonl", description="Line format: JSON objects or CSV records"
    )
    schema_: dict[str, str] | None = Field(
        None,
        alias="schema",
        description="Field types, e.g. {id: int, name: string}; inferred if unset",
    )
    infer_rows: int = Field(
        100, ge=1, description="Lines read to infer field types when no schema"
    )
    poll_interval: Duration = Field(
        timedelta(milliseconds=100),
        description="How long to wait for input before reporting the source idle",
    )
    delimiter: str = Field(",", min_length=1, max_length=1)
    quote_char: str = Field('"', min_length=1, max_length=1)
    header: bool = Field(True, description="CSV: the first line names the fields")
    columns: list[str] | None = Field(
        None, description="CSV: field names when header is false"
    )
    null_values: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NULLS),
        description="CSV: values read as null",
    )

    @field_validator("schema_")
    @classmethod
    def _known_types(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for type_name in (value or {}).values():
            parse_type(type_name)
        return value

    @model_validator(mode="after")
    def _csv_options_need_csv(self) -> StdinSourceConfig:
        used = [name for name in _CSV_ONLY if name in self.model_fields_set]
        if self.format != "csv" and used:
            raise ValueError(
                f"{', '.join(used)} apply only to format: csv; remove them or "
                "set format: csv"
            )
        return self

    def declared_schema(self) -> pa.Schema | None:
        if self.schema_ is None:
            return None
        return pa.schema([(name, parse_type(t)) for name, t in self.schema_.items()])


class StdinSource(Source[StdinSourceConfig]):
    """Read JSON lines or CSV lines from standard input until it ends."""

    metadata = PluginMetadata(
        "stdin", PluginKind.SOURCE, "JSON or CSV lines from standard input"
    )
    Config = StdinSourceConfig

    @property
    def bounded(self) -> bool:
        return False

    def __init__(self, config: StdinSourceConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._inferred: pa.Schema | None = None

    def schema(self) -> pa.Schema:
        declared = self.config.declared_schema()
        if declared is not None:
            return declared
        # Inference takes lines from standard input only once, so keep it.
        if self._inferred is None:
            self._inferred = self._infer()
        return self._inferred

    def _infer(self) -> pa.Schema:
        quiet = self.config.poll_interval.total_seconds()
        wanted = self.config.infer_rows + (1 if self.config.header else 0)
        head = input_lines(_stdin()).peek(wanted, quiet)
        if self.config.format == "csv":
            schema = self._infer_csv(head)
        else:
            objects = sample_objects(head.splitlines(), self.config.infer_rows)
            schema = infer_schema(objects) if objects else None
        if schema is None:
            raise ValueError(
                "cannot infer field types: standard input ended before its first "
                f"{self.config.format} record; set `schema`"
            )
        return schema

    def _infer_csv(self, head: bytes) -> pa.Schema | None:
        if not head.strip():
            return None
        try:
            table = pacsv.read_csv(
                pa.py_buffer(head),
                read_options=self._csv_read_options(),
                parse_options=pacsv.ParseOptions(
                    delimiter=self.config.delimiter,
                    quote_char=self.config.quote_char,
                    invalid_row_handler=lambda row: "skip",
                ),
                convert_options=pacsv.ConvertOptions(
                    null_values=self.config.null_values, strings_can_be_null=True
                ),
            )
        except pa.ArrowInvalid as exc:
            raise ValueError(
                f"cannot infer field types from the first lines of standard input: "
                f"{exc}; set `schema`"
            ) from exc
        return pa.schema(pa.field(f.name, _widen(f.type)) for f in table.schema)

    def _csv_read_options(self) -> pacsv.ReadOptions:
        return pacsv.ReadOptions(
            column_names=None if self.config.header else self.config.columns,
            autogenerate_column_names=not self.config.header
            and not self.config.columns,
        )

    # --- reading ---

    def open(self) -> None:
        self._schema = self.schema()
        self._lines = input_lines(_stdin())
        self._json = JsonLinesParser(self._schema, INPUT_NAME)
        self._csv_names: list[str] | None = None
        if not self.config.header and self.config.columns:
            self._csv_names = list(self.config.columns)

    def read(self) -> Iterator[SourceBatch | Idle]:
        timeout = self.config.poll_interval.total_seconds()
        while True:
            block, first = self._lines.take()
            if block:
                yield from self._parse(block, first)
            if self._lines.eof and not self._lines.buffered:
                return
            if self.context.stopping:
                return
            if not self._lines.fill(timeout):
                yield IDLE

    def _parse(self, block: bytes, first: int) -> Iterator[SourceBatch]:
        if self.config.format == "jsonl":
            parsed = self._json.parse(block, first)
            rejects = parsed.rejects
            if rejects.records:
                self.context.reject(rejects.records, rejects.reasons, rejects.positions)
            if parsed.batch.num_rows:
                yield SourceBatch(parsed.batch, parsed.origin)
            return
        batch, numbers = self._parse_csv(block, first)
        if batch.num_rows:
            yield SourceBatch(batch, NumberedOrigin(INPUT_NAME, numbers, unit="line"))

    # --- CSV lines ---

    def _parse_csv(self, block: bytes, first: int) -> tuple[pa.RecordBatch, list[int]]:
        """Parse CSV lines into a typed batch and reject the lines that do not fit."""
        rows: list[list[str]] = []
        numbers: list[int] = []
        for number, raw in enumerate(block.split(b"\n"), start=first):
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            if not text.strip():
                continue
            fields = next(
                csv.reader(
                    [text],
                    delimiter=self.config.delimiter,
                    quotechar=self.config.quote_char,
                )
            )
            if self._csv_names is None:
                self._csv_names = self._names_from(fields)
                continue
            if len(fields) != len(self._csv_names):
                reason = f"expected {len(self._csv_names)} fields, found {len(fields)}"
                self.context.reject([text], [reason], [f"{INPUT_NAME} line {number}"])
                continue
            rows.append(fields)
            numbers.append(number)
        return self._typed(rows, numbers)

    def _names_from(self, fields: list[str]) -> list[str]:
        if not self.config.header:
            return [f"f{i}" for i in range(len(fields))]
        names = [name.strip() for name in fields]
        if not set(names) & set(self._schema.names):
            raise ValueError(
                f"the CSV header on standard input ({', '.join(names)}) has none of "
                f"the fields {', '.join(self._schema.names)}; check `delimiter`, or "
                "set header: false with `columns`"
            )
        return names

    def _typed(
        self, rows: list[list[str]], numbers: list[int]
    ) -> tuple[pa.RecordBatch, list[int]]:
        assert self._csv_names is not None
        nulls = set(self.config.null_values)
        columns = {
            name: pa.array(
                [None if row[i] in nulls else row[i] for row in rows], pa.string()
            )
            for i, name in enumerate(self._csv_names)
        }
        raw = pa.RecordBatch.from_pydict(columns)
        batch, bad = cast_strings(raw, self._schema)
        if not bad:
            return batch, numbers
        bad_rows = [row for row, _ in bad]
        self.context.reject(
            raw.take(pa.array(bad_rows)),
            [reason for _, reason in bad],
            [f"{INPUT_NAME} line {numbers[row]}" for row in bad_rows],
        )
        keep = [True] * batch.num_rows
        for row in bad_rows:
            keep[row] = False
        kept = [number for number, flag in zip(numbers, keep, strict=True) if flag]
        return batch.filter(pa.array(keep)), kept


def _widen(dtype: pa.DataType) -> pa.DataType:
    """Map an inferred CSV type to the type DataFlare's file sources use."""
    if pa.types.is_null(dtype):
        return pa.string()
    if pa.types.is_timestamp(dtype):
        return pa.timestamp("us", tz="UTC")
    if pa.types.is_integer(dtype):
        return pa.int64()
    if pa.types.is_floating(dtype):
        return pa.float64()
    return dtype


# --- the sink -----------------------------------------------------------------------


class StdoutSinkConfig(SinkConfig):
    pass


class StdoutSink(Sink[StdoutSinkConfig]):
    """Write records as JSON lines to standard output, flushing every batch."""

    metadata = PluginMetadata(
        "stdout", PluginKind.SINK, "JSON lines to standard output"
    )
    Config = StdoutSinkConfig

    def open(self) -> None:
        self._text = sys.stdout
        self._binary: IO[bytes] | None = getattr(sys.stdout, "buffer", None)

    def write(self, batch: pa.RecordBatch) -> None:
        data = encode_json_lines(batch)
        try:
            if self._binary is None:
                self._text.write(data.decode("utf-8"))
                self._text.flush()
                return
            # Text written to sys.stdout by other code goes out first.
            self._text.flush()
            self._binary.write(data)
            self._binary.flush()
        except BrokenPipeError as exc:
            raise OSError(
                "cannot write to standard output: the reading process closed it "
                "(for example `head` after its last line)"
            ) from exc

    def info(self) -> SinkInfo:
        return SinkInfo(paths=["<stdout>"], delivery="at-least-once")

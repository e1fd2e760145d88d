"""CSV files: `CsvSource` and `CsvSink`.

Example::

    sources:
      flights:
        type: csv
        config: {path: data/flights.csv, null_values: ["", "NA"]}

The source reads each file in chunks of about `block_size` bytes that end on
a record boundary, and parses a chunk with Arrow straight into the field
types (declared in `schema`, or inferred from the first `infer_rows`
records). Only when a value in a chunk does not convert is that chunk
parsed again as raw text, and converted value by value: the records with a
bad value go to the dead-letter output, with every bad field in the reason
and every field as its text in the file, and the rest go on. A record with
the wrong number of fields goes there too.
Each rejected record is named by file, record number (the first data record
is record 1) and line number.

Record boundaries follow RFC 4180 quoting, with quotes paired by parity. A
quote that the file never closes would join every line after it into one
record. So at the end of the file, only the line where that quote opens is
rejected, and the lines after it are read as records.

Quoted fields with line breaks, CRLF line ends, a UTF-8 byte order mark,
blank lines, a missing final newline and gzip files (`.csv.gz`) are read.
With `follow: true`, records appended to the files are read as soon as
their line is complete, and files that appear later are read too. A last
line without a newline, or a record whose quoted field is still open, stays
unread, and `close` logs a warning with its file, line and byte offset.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from pydantic import Field, model_validator

from dataflare.connectors.files.base import (
    FALSE_VALUES,
    TRUE_VALUES,
    ByteProgress,
    FileSourceConfig,
    bad_value_reason,
    convert_text,
    failed_column,
    first_record_end,
    line_starts,
    missing_input_error,
    record_end,
    resolve_paths,
    warn_if_no_input,
)
from dataflare.connectors.files.sinks import FileSink, FileSinkConfig
from dataflare.plugin.interface import (
    IDLE,
    Idle,
    Origin,
    PluginKind,
    PluginMetadata,
    Progress,
    Source,
    SourceBatch,
)

logger = logging.getLogger(__name__)

DEFAULT_NULLS = ["", "NA", "N/A", "NULL", "null", "NaN", "nan", "None", "#N/A"]
_EXTENSIONS = (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".txt")
_BOM = b"\xef\xbb\xbf"
# A UTC offset after a time of day. The time is required so that the day of
# a date-only text (`2013-01-01`) is not taken for a `-01` offset.
_OFFSET = r"[T ]\d\d(?::?\d\d){0,2}(?:[.,]\d+)?(?:[zZ]|[+-]\d\d(?::?\d\d)?)$"
_DATE_ONLY = r"^(\d{4}-\d\d-\d\d)$"
_SAMPLE_PIECE = 64 << 10  # bytes read at a time while sampling to infer types


class CsvSourceConfig(FileSourceConfig):
    delimiter: str = Field(",", min_length=1, max_length=1)
    quote_char: str = Field('"', min_length=1, max_length=1)
    header: bool = Field(True, description="First line names the fields")
    columns: list[str] | None = Field(
        None, description="Field names, in file order, when header: false"
    )
    null_values: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NULLS),
        description="Texts read as null, quoted or not",
    )
    block_size: int = Field(
        4 << 20, ge=1 << 12, description="Bytes read and parsed at a time"
    )
    infer_rows: int = Field(
        10_000, ge=1, description="Records read (at least) to infer field types"
    )

    @model_validator(mode="after")
    def _columns_need_no_header(self) -> CsvSourceConfig:
        if self.columns is not None and self.header:
            raise ValueError(
                "`columns` names the fields of a file without a header line; "
                "set header: false, or remove `columns` to use the header"
            )
        return self


# --- positions -----------------------------------------------------------------


class ChunkOrigin(Origin):
    """Positions of the rows of a batch parsed from one chunk of a file.

    `slots` maps each batch row to its record within the chunk (records
    with the wrong number of fields, or a bad value, have a slot but no row).
    Line numbers are computed on the first request only, since they are
    needed only for rejected records.
    """

    def __init__(
        self,
        name: str,
        first_record: int,
        first_line: int,
        chunk: bytes,
        quote: bytes,
        slots: np.ndarray | None = None,
    ) -> None:
        self.name = name
        self.first_record = first_record
        self.first_line = first_line
        self._chunk = chunk
        self._quote = quote
        self._slots = slots
        self._starts: np.ndarray | None = None

    def with_slots(self, slots: np.ndarray) -> ChunkOrigin:
        """Return the origin of a batch whose rows are these chunk records."""
        origin = ChunkOrigin(
            self.name,
            self.first_record,
            self.first_line,
            self._chunk,
            self._quote,
            slots,
        )
        origin._starts = self._starts
        return origin

    def slot(self, row: int) -> int:
        return row if self._slots is None else int(self._slots[row])

    def slot_line(self, slot: int) -> int | None:
        """Return the file line where chunk record `slot` starts, if known."""
        if self._starts is None:
            self._starts = line_starts(self._chunk, self._quote)
        # NOTE: lines are counted by line feeds; in a file whose lines end
        # with a lone carriage return, the line is unknown.
        if slot < len(self._starts):
            return self.first_line + int(self._starts[slot]) - 1
        return None

    def slot_position(self, slot: int) -> str:
        """Describe chunk record `slot`: `f.csv record 7 (line 8)`."""
        text = f"{self.name} record {self.first_record + slot}"
        line = self.slot_line(slot)
        if line is not None:
            text += f" (line {line})"
        return text

    def position(self, row: int) -> str:
        return self.slot_position(self.slot(row))


# --- reading state of one file ---------------------------------------------------


@dataclass
class _Cursor:
    """How far one file has been read."""

    path: Path
    raw: IO[bytes]
    stream: IO[bytes]  # `raw`, or a gzip reader over it
    names: list[str] | None = None  # field names; None until the header is read
    pending: bytes = b""  # bytes read but not yet parsed: an incomplete record
    record: int = 1  # number of the next record
    line: int = 1  # line number of the first byte after `pending`'s start
    consumed: int = 0  # bytes of the file parsed (compressed bytes for gzip)
    finished: bool = False  # read to the end for good (gzip files when following)
    scanned: int = 0  # bytes at the start of `pending` without a record end
    open_quote_warned: int = 0  # line of the last open quote logged, or 0

    @property
    def compressed(self) -> bool:
        return self.stream is not self.raw

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def _open_cursor(path: Path) -> _Cursor:
    raw = path.open("rb")
    if path.name.lower().endswith(".gz"):
        return _Cursor(path, raw, gzip.GzipFile(fileobj=raw, mode="rb"))  # type: ignore[arg-type]
    return _Cursor(path, raw, raw)


class CsvSource(Source[CsvSourceConfig]):
    """Read CSV files: one file, a glob or a directory; optionally follow them."""

    metadata = PluginMetadata(
        "csv", PluginKind.SOURCE, "CSV files, globs or directories"
    )
    Config = CsvSourceConfig

    def __init__(self, config: CsvSourceConfig, context: Any) -> None:
        super().__init__(config, context)
        self._quote = config.quote_char.encode()
        self._schema: pa.Schema | None = None
        # Timestamp fields whose texts carry no UTC offset, so that Arrow
        # reads them as zoneless timestamps (taken as UTC). Set by inference
        # and updated whenever a chunk needs value-by-value conversion.
        self._zoneless: set[str] = set()
        self._cursors: list[_Cursor] = []
        self._progress = ByteProgress([])
        # Checkpoint positions: where each file's next record starts, and the
        # files read to their end (bounded mode).
        self._positions: dict[str, dict[str, Any]] = {}
        self._done: set[str] = set()
        self._resume: dict[str, Any] | None = None

    def open(self) -> None:
        self._schema = self.schema()
        files = resolve_paths(self.config.path, _EXTENSIONS)
        warn_if_no_input(
            self.context.logger, self.config.path, files, self.config.follow
        )
        self._progress = ByteProgress(files)

    def close(self) -> None:
        for cursor in self._cursors:
            if self.config.follow:
                self._warn_unread(cursor)
            cursor.close()
        self._cursors = []

    def _warn_unread(self, cursor: _Cursor) -> None:
        """Log the bytes after the last complete record, which a stop leaves unread.

        In follow mode they are a last line without its newline, or a record
        whose quoted field is still open, which the writer may not have
        finished.
        """
        if not cursor.pending.strip(b"\r\n") or cursor.compressed:
            return
        offset = cursor.raw.tell() - len(cursor.pending)
        if b"\n" in cursor.pending:
            problem = (
                f"the record starting at line {cursor.line} has a quoted field "
                "that is not closed"
            )
        else:
            problem = f"the last line (line {cursor.line}) has no newline"
        logger.warning(
            "step %r: %s: %s, so its %d bytes from byte offset %d were not read; "
            "a run that resumes from a checkpoint reads them once the record is "
            "complete",
            self.context.step,
            cursor.path,
            problem,
            len(cursor.pending),
            offset,
        )

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
        header_only: list[str] | None = None
        for path in files:
            names, sample = self._sample(path)
            if names is not None and sample is not None:
                return self._infer(path, names, sample)
            if names is not None and header_only is None:
                header_only = names
        if header_only is not None:
            # Only header lines: the fields are known but not their types.
            return pa.schema([(name, pa.string()) for name in header_only])
        raise ValueError(
            f"cannot infer field types: every file matching {self.config.path!r} is "
            "empty; set `schema`"
        )

    def _sample(self, path: Path) -> tuple[list[str] | None, bytes | None]:
        """Read the header and at least `infer_rows` records (or all) of `path`."""
        cursor = _open_cursor(path)
        parts: list[bytes] = []
        records = 0
        try:
            while records < self.config.infer_rows:
                # Reading at least as much as is pending keeps a long open
                # quote from costing a copy of the pending bytes per piece.
                data = cursor.stream.read(max(_SAMPLE_PIECE, len(cursor.pending)))
                scanned = cursor.scanned if cursor.names is not None else 0
                buffer = cursor.pending + data
                rest = self._take_header(cursor, buffer, final=not data)
                if rest is None:
                    cursor.pending = buffer
                else:
                    if data:
                        cut = self._whole_records(rest, scanned)
                    else:
                        unclosed = self._unclosed_line(rest, scanned)
                        if unclosed is not None:
                            # Read the lines after the open quote, as `read` does.
                            rest = rest[: unclosed[0]] + rest[unclosed[1] :]
                        cut = len(rest)
                    parts.append(rest[:cut])
                    cursor.pending = rest[cut:]
                    cursor.scanned = len(cursor.pending)
                    records += rest.count(b"\n", 0, cut)
                if not data:
                    break
        finally:
            cursor.close()
        sample = b"".join(parts)
        return cursor.names, sample if sample.strip(b"\r\n") else None

    def _infer(self, path: Path, names: list[str], sample: bytes) -> pa.Schema:
        try:
            table = pacsv.read_csv(
                pa.py_buffer(sample),
                read_options=pacsv.ReadOptions(
                    column_names=names, use_threads=False, block_size=len(sample) + 1
                ),
                parse_options=self._parse_options(lambda row: "skip"),
                convert_options=self._convert_options(None, names),
            )
        except pa.ArrowInvalid as exc:
            raise ValueError(
                f"{path}: cannot parse as CSV: {exc}; check `delimiter` and "
                "`quote_char`, or set `schema`"
            ) from exc
        fields = []
        for column in table.schema:
            dtype = column.type
            if pa.types.is_null(dtype) or pa.types.is_binary(dtype):
                dtype = pa.string()
            elif pa.types.is_timestamp(dtype):
                if dtype.tz is None:
                    self._zoneless.add(column.name)
                dtype = pa.timestamp("us", tz="UTC")
            elif pa.types.is_integer(dtype):
                dtype = pa.int64()
            elif pa.types.is_floating(dtype):
                dtype = pa.float64()
            fields.append(pa.field(column.name, dtype))
        return pa.schema(fields)

    # --- reading ---

    # --- checkpoints ---

    def snapshot_position(self) -> Any:
        # NOTE: a gzip stream cannot seek, so a run reading .gz files replays
        # them from the start after a crash.
        if any(cursor.compressed for cursor in self._cursors):
            return None
        return {"files": dict(self._positions), "done": sorted(self._done)}

    def restore_position(self, position: Any) -> None:
        self._resume = position
        if position:
            self._done = set(position["done"])
            self._positions = dict(position["files"])

    def _seek(self, cursor: _Cursor) -> None:
        saved = self._positions.get(str(cursor.path))
        if saved is None or cursor.compressed or self._resume is None:
            return
        cursor.raw.seek(saved["offset"])
        cursor.names = saved["names"]
        cursor.record = saved["record"]
        cursor.line = saved["line"]
        cursor.consumed = saved["offset"]

    def _remember(self, cursor: _Cursor) -> None:
        self._positions[str(cursor.path)] = {
            "offset": cursor.raw.tell() - len(cursor.pending),
            "names": cursor.names,
            "record": cursor.record,
            "line": cursor.line,
        }

    # --- reading ---

    def read(self) -> Iterator[SourceBatch | Idle]:
        if self.config.follow:
            yield from self._follow()
            return
        for path in resolve_paths(self.config.path, _EXTENSIONS):
            if str(path) in self._done:
                continue
            cursor = _open_cursor(path)
            self._seek(cursor)
            self._cursors.append(cursor)
            try:
                yield from self._read_available(cursor, final=True)
            finally:
                self._cursors.remove(cursor)
                cursor.close()
            self._done.add(str(path))
            self._positions.pop(str(path), None)
            if self.context.stopping:
                return

    def _follow(self) -> Iterator[SourceBatch | Idle]:
        """Read all files, then appended records and new files, until stopped."""
        known: dict[Path, _Cursor] = {}
        while not self.context.stopping:
            for path in resolve_paths(self.config.path, _EXTENSIONS):
                if path not in known:
                    known[path] = self._add_cursor(path)
                    logger.info("step %r: reading %s", self.context.step, path)
            produced = False
            for cursor in list(known.values()):
                if cursor.finished:
                    continue
                before = cursor.consumed
                # A gzip file cannot be read before it is complete: read it once.
                for item in self._read_available(cursor, final=cursor.compressed):
                    produced = True
                    yield item
                    if self.context.stopping:
                        return
                cursor.finished = cursor.compressed
                self._progress.add(cursor.path)
                if cursor.consumed == before and self._replaced(cursor):
                    self._cursors.remove(cursor)
                    cursor.close()
                    self._positions.pop(str(cursor.path), None)
                    known[cursor.path] = self._add_cursor(cursor.path)
            if not produced:
                yield IDLE
                time.sleep(self.config.poll_interval.total_seconds())

    def _add_cursor(self, path: Path) -> _Cursor:
        cursor = _open_cursor(path)
        self._seek(cursor)
        self._cursors.append(cursor)
        return cursor

    def _replaced(self, cursor: _Cursor) -> bool:
        """Tell whether a followed file was truncated or replaced (log rotation)."""
        try:
            current = os.stat(cursor.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(cursor.raw.fileno())
        if current.st_ino != opened.st_ino or current.st_size < cursor.raw.tell():
            logger.warning(
                "step %r: %s was truncated or replaced; reading it from the start",
                self.context.step,
                cursor.path,
            )
            return True
        return False

    def _read_available(self, cursor: _Cursor, *, final: bool) -> Iterator[SourceBatch]:
        """Parse the whole records now in `cursor`'s file, or all bytes if `final`."""
        while True:
            # Reading at least as much as is pending keeps a long open quote
            # from costing a copy of the pending bytes per block.
            data = cursor.stream.read(max(self.config.block_size, len(cursor.pending)))
            last = final and not data
            had_names = cursor.names is not None
            scanned = cursor.scanned if had_names else 0
            buffer = cursor.pending + data
            rest = self._take_header(cursor, buffer, final=last)
            if rest is None:
                cursor.pending = buffer
            else:
                if not had_names and cursor.names is not None:
                    self._check_names(cursor)
                unclosed = self._unclosed_line(rest, scanned) if last else None
                if unclosed is not None:
                    cut = unclosed[0]
                else:
                    cut = len(rest) if last else self._whole_records(rest, scanned)
                chunk, cursor.pending = rest[:cut], rest[cut:]
                cursor.scanned = len(cursor.pending)
                if chunk:
                    batch = self._parse(cursor, chunk)
                    self._count_progress(cursor)
                    if batch is not None:
                        self._remember(cursor)
                        yield batch
                    if self.context.stopping:
                        return
                if unclosed is not None:
                    self._reject_unclosed_line(cursor)
                    continue  # parse the lines after it
                if len(cursor.pending) > self.config.block_size:
                    self._warn_open_quote(cursor)
            if not data:
                self._count_progress(cursor)
                return

    def _whole_records(self, rest: bytes, scanned: int) -> int:
        """Return `record_end(rest)`, searching only after the first `scanned` bytes.

        Those bytes, left over from the previous read, contain no record end.
        A quoted field that stays open over many reads is thus searched once,
        and not again from its start at each read.
        """
        if scanned == 0:
            return record_end(rest, self._quote)
        odd = rest.count(self._quote, 0, scanned) % 2 == 1
        new = rest[scanned:]
        # A leading quote carries the parity of the bytes before `new`.
        end = record_end(self._quote + new if odd else new, self._quote)
        if end == 0:
            return 0
        return scanned + end - (1 if odd else 0)

    def _unclosed_line(self, rest: bytes, scanned: int) -> tuple[int, int] | None:
        """Find the line of `rest` where a quoted field opens and is never closed.

        `rest` is the end of a file and starts at a record boundary, and its
        first `scanned` bytes contain no record end. Quotes pair by parity, as
        in `record_end`. When their count is odd, the record after the last
        boundary contains the open quote. The first line of that record is then
        the only line with an odd count of quotes, so without it every line
        after it is a whole record.

        Returns:
            The start and end (after the line feed) of that line, or None
            when every quote is closed.
        """
        if rest.count(self._quote) % 2 == 0:
            return None
        start = self._whole_records(rest, scanned)
        newline = rest.find(b"\n", start)
        return start, len(rest) if newline < 0 else newline + 1

    def _reject_unclosed_line(self, cursor: _Cursor) -> None:
        """Reject the first pending line, where a quote opens that is never closed."""
        newline = cursor.pending.find(b"\n")
        stop = len(cursor.pending) if newline < 0 else newline + 1
        line, cursor.pending = cursor.pending[:stop], cursor.pending[stop:]
        cursor.scanned = 0
        origin = ChunkOrigin(
            str(cursor.path), cursor.record, cursor.line, line, self._quote
        )
        quote = self.config.quote_char
        reason = (
            f"quoted field starting at line {cursor.line} of {cursor.path} is not "
            f"closed before the end of the file; add the closing {quote} where the "
            f"field ends, or write a {quote} that is part of the value as "
            f"{quote}{quote} inside a quoted field"
        )
        if cursor.pending.strip(b"\r\n"):
            reason += f". Reading resumes at line {cursor.line + 1}"
        text = line.rstrip(b"\r\n").decode("utf-8", errors="replace")
        self.context.reject([text], [reason], [origin.slot_position(0)])
        cursor.record += 1
        cursor.line += line.count(b"\n")

    def _warn_open_quote(self, cursor: _Cursor) -> None:
        """Log once that a quoted field spanning lines holds back the records after it.

        The pending bytes start at a record boundary, and a line feed among
        them is inside quotes, or it would have ended a record.
        """
        if cursor.open_quote_warned == cursor.line or b"\n" not in cursor.pending:
            return
        cursor.open_quote_warned = cursor.line
        logger.warning(
            "step %r: the quoted field starting at line %d of %s is still open "
            "after %d bytes, so the records after it wait until a quote closes "
            "it. If the file ends first, that line is rejected and the lines "
            "after it are read",
            self.context.step,
            cursor.line,
            cursor.path,
            len(cursor.pending),
        )

    def _count_progress(self, cursor: _Cursor) -> None:
        consumed = cursor.raw.tell()
        if not cursor.compressed:
            consumed -= len(cursor.pending)
        self._progress.done += consumed - cursor.consumed
        cursor.consumed = consumed

    # --- header ---

    def _take_header(
        self, cursor: _Cursor, buffer: bytes, *, final: bool
    ) -> bytes | None:
        """Read the field names at the start of a file; return the bytes after them.

        Skips a byte order mark and blank lines before the header. Returns
        None, and changes nothing, while the header line is incomplete.
        """
        if cursor.names is not None:
            return buffer
        start = len(_BOM) if buffer.startswith(_BOM) else 0
        if not final and not start and _BOM.startswith(buffer[: len(_BOM)]):
            return None  # too short to tell whether a byte order mark starts it
        body = buffer[start:].lstrip(b"\r\n")
        if not body:
            return b"" if final else None
        skipped_lines = buffer.count(b"\n", 0, len(buffer) - len(body))
        end = first_record_end(body, self._quote)
        if end == 0 and final:
            if body.count(self._quote) % 2:
                self._check_first_line_quote(cursor, cursor.line + skipped_lines)
                end = body.find(b"\n") + 1 or len(body)
            else:
                end = len(body)
        if end == 0:
            return None
        first = self._parse_record(cursor.path, body[:end])
        if self.config.header:
            cursor.names = first
            cursor.line += skipped_lines + body.count(b"\n", 0, end)
            return body[end:]
        cursor.names = self._headless_names(len(first))
        cursor.line += skipped_lines
        return body

    def _check_first_line_quote(self, cursor: _Cursor, line: int) -> None:
        """Raise if the field names depend on a first line whose quote never closes.

        Without a header, the first line only counts the fields when neither
        `columns` nor `schema` names them. Otherwise the line is read as a
        record, and rejected like any line with a quote that is never closed.
        """
        quote = self.config.quote_char
        fix = (
            f"add the closing {quote}, or write a {quote} that is part of the text "
            f"as {quote}{quote} inside a quoted field"
        )
        if self.config.header:
            raise ValueError(
                f"{cursor.path}: the header line {line} has a quoted field that is "
                f"not closed, so the field names are unknown; {fix}"
            )
        if self.config.columns is None and self.config.declared_schema() is None:
            raise ValueError(
                f"{cursor.path}: line {line} has a quoted field that is not closed, "
                f"so the number of fields is unknown; {fix}, or set `columns`"
            )

    def _parse_record(self, path: Path, line: bytes) -> list[str]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path}: the first line is not UTF-8 text: {exc}; save the "
                "file as UTF-8, for example with `iconv -f latin1 -t utf-8`"
            ) from exc
        rows = list(
            csv.reader(
                io.StringIO(text),
                delimiter=self.config.delimiter,
                quotechar=self.config.quote_char,
            )
        )
        names = rows[0] if rows else []
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates and self.config.header:
            raise ValueError(
                f"{path}: the header names these fields more than once: "
                f"{', '.join(duplicates)}; rename them in the file"
            )
        return names

    def _headless_names(self, count: int) -> list[str]:
        if self.config.columns is not None:
            return list(self.config.columns)
        declared = self.config.declared_schema()
        if declared is not None:
            return list(declared.names)
        return [f"f{i}" for i in range(count)]  # the names Arrow gives

    def _check_names(self, cursor: _Cursor) -> None:
        assert cursor.names is not None and self._schema is not None
        missing = [n for n in self._schema.names if n not in cursor.names]
        if missing and len(missing) == len(self._schema.names):
            raise ValueError(
                f"{cursor.path}: the file has none of the fields "
                f"{', '.join(self._schema.names)} (its fields are "
                f"{', '.join(cursor.names)}); check `delimiter`, or set header: "
                "false with `columns`"
            )
        if missing:
            logger.warning(
                "step %r: %s has no field %s; it is read as null",
                self.context.step,
                cursor.path,
                ", ".join(missing),
            )

    # --- parsing a chunk ---

    def _parse_options(self, handler: Any) -> pacsv.ParseOptions:
        return pacsv.ParseOptions(
            delimiter=self.config.delimiter,
            quote_char=self.config.quote_char,
            newlines_in_values=True,
            invalid_row_handler=handler,
        )

    def _read_chunk(
        self,
        chunk: bytes,
        names: list[str],
        types: dict[str, pa.DataType],
        invalid: list[tuple[int, str, str]],
    ) -> pa.Table:
        def on_invalid(row: Any) -> str:
            reason = (
                f"expected {row.expected_columns} fields, found {row.actual_columns}"
            )
            invalid.append((row.number, row.text, reason))
            return "skip"

        invalid.clear()
        return pacsv.read_csv(
            pa.py_buffer(chunk),
            # One thread: Arrow then numbers the invalid rows, and the other
            # core is free for the steps downstream.
            read_options=pacsv.ReadOptions(
                column_names=names, use_threads=False, block_size=len(chunk) + 1
            ),
            parse_options=self._parse_options(on_invalid),
            convert_options=self._convert_options(types, names),
        )

    def _convert_options(
        self, types: dict[str, pa.DataType] | None, names: list[str]
    ) -> pacsv.ConvertOptions:
        return pacsv.ConvertOptions(
            column_types=types,
            include_columns=self._schema.names if self._schema is not None else names,
            include_missing_columns=True,
            null_values=self.config.null_values,
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
            true_values=TRUE_VALUES,
            false_values=FALSE_VALUES,
        )

    def _typed_types(self) -> dict[str, pa.DataType]:
        assert self._schema is not None
        types = {}
        for column in self._schema:
            dtype = column.type
            if pa.types.is_timestamp(dtype) and column.name in self._zoneless:
                dtype = pa.timestamp(dtype.unit)
            types[column.name] = dtype
        return types

    def _read_typed(
        self,
        origin: ChunkOrigin,
        chunk: bytes,
        names: list[str],
        invalid: list[tuple[int, str, str]],
    ) -> tuple[pa.Table, set[str]]:
        """Parse `chunk` into the field types; return the table and its raw fields.

        A field with a value that does not convert is read again as raw
        bytes, to be converted value by value. The other fields stay typed.
        """
        assert self._schema is not None
        types = self._typed_types()
        raw_names: set[str] = set()
        while True:
            try:
                return self._read_chunk(chunk, names, types, invalid), raw_names
            except pa.ArrowInvalid as exc:
                if "conversion error" not in str(exc):
                    raise ValueError(
                        f"cannot parse {origin.slot_position(0)} or a record after "
                        f"it as CSV: {exc}"
                    ) from exc
                column = failed_column(str(exc))
                name = (
                    names[column]
                    if column is not None and column < len(names)
                    else None
                )
                if name is None or name in raw_names or name not in types:
                    raw_names = set(self._schema.names)  # cannot tell: all raw
                else:
                    raw_names.add(name)
                types = {**types, **dict.fromkeys(raw_names, pa.binary())}

    def _parse(self, cursor: _Cursor, chunk: bytes) -> SourceBatch | None:
        """Parse one chunk of whole records; reject the bad ones; return the rest."""
        assert cursor.names is not None and self._schema is not None
        origin = ChunkOrigin(
            str(cursor.path), cursor.record, cursor.line, chunk, self._quote
        )
        invalid: list[tuple[int, str, str]] = []
        table, raw_names = self._read_typed(origin, chunk, cursor.names, invalid)
        batch, bad_reasons = self._convert(table, raw_names)
        bad = self._bad_records(chunk, cursor.names, bad_reasons)
        cursor.record += batch.num_rows + len(invalid)
        cursor.line += chunk.count(b"\n")

        # Records with the wrong field count have no row in the batch. Arrow
        # numbers each one by its record slot in the chunk, counted from 1.
        invalid_slots = np.array(
            [number - 1 for number, _, _ in invalid], dtype=np.int64
        )
        if len(invalid_slots):
            total = batch.num_rows + len(invalid_slots)
            row_slots = np.setdiff1d(np.arange(total), invalid_slots)
        else:
            row_slots = np.arange(batch.num_rows)
        rejected: list[tuple[int, Any, str]] = [
            (int(slot), text, self._field_count_reason(origin, int(slot), text, reason))
            for slot, (_, text, reason) in zip(invalid_slots, invalid, strict=True)
        ]
        rejected += [
            (int(row_slots[row]), record, reason)
            for row, (record, reason) in bad.items()
        ]
        if rejected:
            rejected.sort(key=lambda item: item[0])
            self.context.reject(
                [record for _, record, _ in rejected],
                [reason for _, _, reason in rejected],
                [origin.slot_position(slot) for slot, _, _ in rejected],
            )
        if bad:
            keep = np.ones(batch.num_rows, dtype=bool)
            keep[list(bad)] = False
            batch = batch.filter(pa.array(keep))
            row_slots = row_slots[keep]
        if batch.num_rows == 0:
            return None
        slots = None if len(row_slots) == row_slots[-1] + 1 else row_slots
        return SourceBatch(
            batch, origin.with_slots(slots) if slots is not None else origin
        )

    def _field_count_reason(
        self, origin: ChunkOrigin, slot: int, text: str, reason: str
    ) -> str:
        """Add to a wrong field count the lines that a quoted field joined.

        Records end at line feeds outside quotes, so a line feed in the
        record's text is inside a quoted field, often one whose quote is
        stray or not closed where the field ends.
        """
        line = origin.slot_line(slot)
        breaks = text.count("\n")
        if not breaks or line is None:
            return reason
        quote = self.config.quote_char
        return (
            f"{reason}: a quoted field joins lines {line} to {line + breaks} into "
            f"this record. Close the quoted field where it ends, or write a {quote} "
            f"that is part of a value as {quote}{quote} inside a quoted field"
        )

    def _convert(
        self, table: pa.Table, raw_names: set[str]
    ) -> tuple[pa.RecordBatch, dict[int, str]]:
        """Build the batch, converting the fields read as raw bytes value by value.

        Returns the typed batch (bad values as null) and, for each row with a
        bad value, the reason, which names every bad field of the row,
        joined with "; ".
        """
        assert self._schema is not None
        columns = []
        reasons: dict[int, list[str]] = {}
        for column, target in zip(table.columns, self._schema, strict=True):
            values = (
                column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
            )
            if target.name in raw_names:
                converted, bad = self._convert_raw(target, values)
                texts = values.take(pa.array(bad)).to_pylist()
                for row, text in zip(bad.tolist(), texts, strict=True):
                    reasons.setdefault(row, []).append(bad_value_reason(target, text))
                values = converted
            elif values.type != target.type:
                values = values.cast(target.type)  # zoneless timestamps, as UTC
            columns.append(values)
        batch = pa.RecordBatch.from_arrays(columns, schema=self._schema)
        return batch, {row: "; ".join(texts) for row, texts in reasons.items()}

    def _bad_records(
        self, chunk: bytes, names: list[str], reasons: dict[int, str]
    ) -> dict[int, tuple[Any, str]]:
        """Pair each reason with its record: the schema's fields as text in the file.

        The chunk is read again with every field as text and no null values,
        so that the dead-letter output shows each value as written. A typed
        value would lose digits (`12345678901234567890` as a float) or
        spelling (`1e2` as 100.0, `yes` as true). Records with the wrong
        number of fields are skipped, as in `_read_chunk`, so the rows match.
        """
        if not reasons:
            return {}
        assert self._schema is not None
        table = pacsv.read_csv(
            pa.py_buffer(chunk),
            read_options=pacsv.ReadOptions(
                column_names=names, use_threads=False, block_size=len(chunk) + 1
            ),
            parse_options=self._parse_options(lambda row: "skip"),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(self._schema.names, pa.binary()),
                include_columns=self._schema.names,
                include_missing_columns=True,
                null_values=[],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        rows = sorted(reasons)
        records = table.take(pa.array(rows)).to_pylist()
        return {
            row: ({name: _text(value) for name, value in record.items()}, reasons[row])
            for row, record in zip(rows, records, strict=True)
        }

    def _convert_raw(
        self, target: pa.Field, values: pa.Array
    ) -> tuple[pa.Array, np.ndarray]:
        """Convert raw text values of one field, as `convert_text` does.

        A date-only text in a timestamp field is read as midnight UTC, the
        time that the `cast` transformation gives it.
        """
        if not pa.types.is_timestamp(target.type):
            return convert_text(values, target.type)
        self._learn_zone(target.name, values)
        midnight = pc.replace_substring_regex(values, _DATE_ONLY, r"\1T00:00:00")
        return convert_text(midnight, target.type)

    def _learn_zone(self, name: str, values: pa.Array) -> None:
        """Read a field as zoneless timestamps if most of its values have no offset."""
        with_offset = pc.sum(pc.match_substring_regex(values, _OFFSET)).as_py() or 0
        valid = len(values) - values.null_count
        if valid - with_offset > with_offset:
            self._zoneless.add(name)
        else:
            self._zoneless.discard(name)


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


# --- sink ------------------------------------------------------------------------


class CsvSinkConfig(FileSinkConfig):
    delimiter: str = Field(",", min_length=1, max_length=1)
    header: bool = Field(True, description="Write a header line with the field names")


class CsvSink(FileSink[CsvSinkConfig]):
    """Write CSV files (one file, or rolling files in a directory)."""

    metadata = PluginMetadata("csv", PluginKind.SINK, "CSV files")
    Config = CsvSinkConfig
    extension = ".csv"

    def check_schema(self, schema: pa.Schema) -> None:
        nested = [f.name for f in schema if pa.types.is_nested(f.type)]
        if nested:
            raise ValueError(
                f"CSV cannot hold the nested field(s) {', '.join(nested)}; flatten "
                "them first, or write jsonl or parquet"
            )

    def _open_writer(self, path: Path, schema: pa.Schema) -> Any:
        return pacsv.CSVWriter(
            str(path),
            schema,
            write_options=pacsv.WriteOptions(
                include_header=self.config.header, delimiter=self.config.delimiter
            ),
        )

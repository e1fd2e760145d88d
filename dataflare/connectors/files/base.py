"""What every file source shares: paths, globs, directories, following, types.

`path` may name one file, a glob (`data/*.csv`, `logs/**/*.jsonl`) or a
directory (every file in it whose name ends with the format's extension,
in name order). With `follow: true` the source keeps running: it reads
records appended to files it has seen and files that appear later.

Text formats are read in chunks that end on a record boundary
(`record_end`), so that a chunk can be parsed, and parsed again if needed,
on its own. `line_starts` recovers the exact line of each record of a chunk
when a bad record has to be reported.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from dataflare.plugin.interface import PluginConfig, Progress
from dataflare.streaming.spec import Duration


def file_in_the_way(path: Path) -> Path | None:
    """Return the nearest existing parent of `path` if it is a file, else None.

    Nothing can be created under a file, so writing `path` would fail there.
    """
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


TYPE_NAMES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "str": pa.string(),
    "int": pa.int64(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "integer": pa.int64(),
    "float": pa.float64(),
    "float64": pa.float64(),
    "double": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "boolean": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "datetime": pa.timestamp("us", tz="UTC"),
}

TRUE_VALUES = ["true", "True", "TRUE", "t", "T", "yes", "Yes", "YES", "1"]
FALSE_VALUES = ["false", "False", "FALSE", "f", "F", "no", "No", "NO", "0"]
"""Texts read as booleans. Matching is exact: no case folding, no trimming."""


def parse_type(name: str) -> pa.DataType:
    """Return the Arrow type for a type name of a `schema` setting.

    Raises:
        ValueError: the name is not one of `TYPE_NAMES`.
    """
    try:
        return TYPE_NAMES[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown type {name!r}; use one of: {', '.join(sorted(set(TYPE_NAMES)))}"
        ) from None


class FileSourceConfig(PluginConfig):
    path: str = Field(description="File, glob pattern or directory to read")
    follow: bool = Field(
        False,
        description="Keep reading data appended to the files and new files "
        "that appear; runs until stopped",
    )
    poll_interval: Duration = Field(
        timedelta(milliseconds=200),
        description="How often `follow` looks for new data",
    )
    schema_: dict[str, str] | None = Field(
        None,
        alias="schema",
        description="Field types, e.g. {id: int, name: string}; inferred if unset",
    )

    @field_validator("schema_")
    @classmethod
    def _known_types(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for type_name in (value or {}).values():
            parse_type(type_name)
        return value

    def declared_schema(self) -> pa.Schema | None:
        """Return the schema set in the config, or None to infer one."""
        if self.schema_ is None:
            return None
        return pa.schema([(name, parse_type(t)) for name, t in self.schema_.items()])


def resolve_paths(pattern: str, extensions: Sequence[str]) -> list[Path]:
    """List the files `pattern` names, sorted; empty if none exist yet.

    A directory yields its files whose names end with one of `extensions`,
    leaving out hidden files (names starting with a dot).
    """
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and p.name.lower().endswith(tuple(extensions))
        )
    if glob.has_magic(pattern):
        return sorted(
            Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p)
        )
    return [path] if path.is_file() else []


def warn_if_no_input(
    logger: logging.Logger, pattern: str, files: Sequence[Path], follow: bool
) -> None:
    """Log a warning when a bounded source's path matches no file.

    With `schema` set such a source is valid and reads nothing, which is
    easy to miss in the run's summary.
    """
    if not files and not follow:
        logger.warning(
            "no input files match path %r, so this source reads nothing; "
            "check the path",
            pattern,
        )


def missing_input_error(pattern: str, follow: bool) -> ValueError:
    """Return the error for a path that matches no file."""
    if follow:
        hint = "set `schema` so that the source can start before the first file appears"
    else:
        hint = "check the path, or set `schema` and `follow: true` to wait for files"
    return ValueError(f"no input files match path {pattern!r}; {hint}")


class ByteProgress:
    """Bytes read against total bytes of the files, for progress bars.

    `done` is set by the reader; files found after the start (with
    `follow`) are added with `add`.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self.total = sum(_size(p) for p in files)
        self.done = 0
        self._sizes = {p: _size(p) for p in files}

    def add(self, path: Path) -> None:
        """Count a file that appeared after the start, or a file that grew."""
        size = _size(path)
        self.total += size - self._sizes.get(path, 0)
        self._sizes[path] = size

    def progress(self) -> Progress:
        return Progress(done=min(self.done, self.total), total=self.total, unit="bytes")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- record boundaries and line numbers --------------------------------------


def record_end(buffer: bytes, quote: bytes | None = None) -> int:
    """Return the length of the longest prefix of `buffer` made of whole records.

    A record ends at a line feed that is outside quotes. `buffer` must start
    at a record boundary. Quotes are counted by parity, which is exact for
    RFC 4180 files, where a quote inside a field is doubled. Returns 0 if no
    record ends in `buffer`.
    """
    end = buffer.rfind(b"\n")
    if end < 0 or quote is None or quote not in buffer:
        return end + 1
    # Quotes before the line feed at `end`, counted from the end backwards so
    # that each byte is scanned once however far back the boundary is.
    quotes_before = buffer.count(quote, 0, end)
    while quotes_before % 2:
        previous = buffer.rfind(b"\n", 0, end)
        if previous < 0:
            return 0
        quotes_before -= buffer.count(quote, previous, end)
        end = previous
    return end + 1


def first_record_end(buffer: bytes, quote: bytes | None = None) -> int:
    """Return the length of the first record of `buffer`, or 0 if it is incomplete.

    Like `record_end`, but for the first line feed outside quotes.
    """
    end = buffer.find(b"\n")
    if quote is None or quote not in buffer:
        return end + 1
    quotes_before = 0
    start = 0
    while end >= 0:
        quotes_before += buffer.count(quote, start, end)
        if quotes_before % 2 == 0:
            return end + 1
        start = end
        end = buffer.find(b"\n", end + 1)
    return 0


def line_starts(chunk: bytes, quote: bytes | None = None) -> np.ndarray:
    """Return the line number (1-based) where each record of `chunk` starts.

    Records are what a CSV or JSON-lines parser counts: blank lines (empty,
    or a lone carriage return) are not records, and a line feed inside
    quotes does not end one. The result has one entry per record, in order.
    """
    data = np.frombuffer(chunk, dtype=np.uint8)
    feeds = np.flatnonzero(data == 0x0A)
    if quote is not None and quote in chunk:
        quotes = np.flatnonzero(data == quote[0])
        inside = np.searchsorted(quotes, feeds) % 2 == 1
        ends = feeds[~inside]
    else:
        ends = feeds
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((ends, [len(chunk)]))
    lengths = stops - starts
    carriage = np.zeros(len(starts), dtype=bool)
    single = lengths == 1
    carriage[single] = data[starts[single]] == 0x0D
    blank = (lengths == 0) | carriage
    # Line of a start offset: line feeds before it, plus one.
    lines = np.searchsorted(feeds, starts) + 1
    return np.asarray(lines[~blank], dtype=np.int64)


# --- converting text to typed values ---------------------------------------

_TRIMMED = (pa.types.is_integer, pa.types.is_floating, pa.types.is_date)
# The offset follows a time, so the "-01" that ends a date-only text such as
# "2013-01-01" is not taken for an offset.
_OFFSET = r"[T ]\d\d(?::?\d\d){0,2}(?:[.,]\d+)?(?:[zZ]|[+-]\d\d(?::?\d\d)?)$"

# Shapes that every value Arrow accepts for a type has; they are looser than
# Arrow's parsers. A value without the shape is bad without trying a cast,
# which keeps a column of bad values (a wrong declared type) fast.
_DIGITS = r"(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?"
_SHAPES: list[tuple[object, str]] = [
    (pa.types.is_integer, r"^[+-]?(?:\d+|0x[0-9a-f]+)$"),
    (pa.types.is_floating, rf"^[+-]?(?:{_DIGITS}|inf|infinity|nan)$"),
    (pa.types.is_date, r"^\d{4}-\d\d-\d\d$"),
    (pa.types.is_timestamp, r"^\d{4}-\d\d-\d\d"),
]


def convert_text(values: pa.Array, target: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Convert raw text values to `target`, value by value.

    Accepts what Arrow's CSV reader accepts for the type. Numbers and dates
    may have surrounding spaces, and integers may be decimal or `0x` hex.
    Timestamps are ISO 8601, read as UTC when they carry no offset.
    Booleans are the texts in `TRUE_VALUES` and `FALSE_VALUES`. `values` may
    be binary, in which case text that is not valid UTF-8 is bad too.

    Returns:
        The converted array, with null where a value did not convert, and
        the sorted indices of those values.
    """
    bad: list[np.ndarray] = []
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        values, utf8_bad = _cast_each(values, pa.string())
        bad.append(utf8_bad)
    if any(check(target) for check in _TRIMMED):
        values = pc.utf8_trim_whitespace(values)
    if pa.types.is_string(target) or pa.types.is_large_string(target):
        result = values.cast(target)
    elif pa.types.is_boolean(target):
        result = pc.if_else(
            pc.is_in(values, pa.array(TRUE_VALUES)),
            True,
            pc.if_else(pc.is_in(values, pa.array(FALSE_VALUES)), False, None),
        )
        bad.append(_newly_null(values, result))
    elif pa.types.is_timestamp(target) and target.tz is not None:
        result, failed = _convert_timestamps(values, target)
        bad.append(failed)
    else:
        result, failed = _cast_checked(values, target)
        bad.append(failed)
        if pa.types.is_signed_integer(target):
            result, too_large = _hex_in_range(values, result, target)
            bad.append(too_large)
    indices = np.unique(np.concatenate(bad)) if bad else np.empty(0, np.int64)
    return result, indices.astype(np.int64)


def _hex_in_range(
    texts: pa.Array, result: pa.Array, target: pa.DataType
) -> tuple[pa.Array, np.ndarray]:
    """Null hex values beyond the type's maximum, and return their indices.

    Arrow casts `0x80000000` to int32 as the bit pattern, -2147483648, but
    the text means 2147483648, which is out of range.
    """
    hexes = pc.fill_null(pc.starts_with(texts, "0x", ignore_case=True), False)
    candidates = np.flatnonzero(hexes.to_numpy(zero_copy_only=False))
    if not candidates.size:
        return result, np.empty(0, np.int64)
    high = np.iinfo(target.to_pandas_dtype()).max
    read = result.take(pa.array(candidates)).to_pylist()
    written = texts.take(pa.array(candidates)).to_pylist()
    over = [
        int(index)
        for index, value, text in zip(candidates, read, written, strict=True)
        if value is not None and int(text, 16) > high
    ]
    if not over:
        return result, np.empty(0, np.int64)
    mask = np.zeros(len(result), dtype=bool)
    mask[over] = True
    return pc.if_else(pa.array(mask), None, result), np.array(over, np.int64)


def _convert_timestamps(
    values: pa.Array, target: pa.TimestampType
) -> tuple[pa.Array, np.ndarray]:
    """Convert ISO 8601 texts, with or without a UTC offset, to `target`."""
    has_offset = pc.fill_null(pc.match_substring_regex(values, _OFFSET), False)
    aware_text = pc.if_else(has_offset, values, None)
    naive_text = pc.if_else(has_offset, None, values)
    aware, aware_bad = _cast_checked(aware_text, target)
    naive, naive_bad = _cast_checked(naive_text, pa.timestamp(target.unit))
    # Arrow reads a timestamp without a zone as UTC when the zone is added.
    result = pc.if_else(has_offset, aware, naive.cast(target))
    return result, np.concatenate((aware_bad, naive_bad))


def _newly_null(before: pa.Array, after: pa.Array) -> np.ndarray:
    lost = pc.and_(pc.is_valid(before), pc.is_null(after))
    return np.flatnonzero(lost.to_numpy(zero_copy_only=False))


def _cast_checked(values: pa.Array, target: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Cast `values`; if that fails, find the values that do not convert."""
    try:
        return values.cast(target), np.empty(0, np.int64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    misshapen = np.empty(0, np.int64)
    for check, shape in _SHAPES:
        if check(target):  # type: ignore[operator]
            plausible = pc.match_substring_regex(values, shape, ignore_case=True)
            mask = pc.invert(pc.fill_null(plausible, True))
            misshapen = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
            values = pc.if_else(mask, None, values)
    result, failed = _cast_each(values, target)
    return result, np.union1d(misshapen, failed)


_SMALL = 16  # below this many values, a failing slice is tried value by value


def _cast_each(values: pa.Array, target: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Cast `values`, finding the values that fail by halving failing slices.

    A cast is all or nothing, so a slice that fails is split until the bad
    values are isolated: about 2 * log2(n) casts for one bad value in n.
    """
    pieces: list[tuple[int, pa.Array]] = []
    bad: list[int] = []
    pending = [(0, len(values))]
    while pending:
        start, stop = pending.pop()
        try:
            pieces.append((start, values.slice(start, stop - start).cast(target)))
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        if stop - start > _SMALL:
            middle = (start + stop) // 2
            pending.extend([(middle, stop), (start, middle)])
            continue
        for row in range(start, stop):
            try:
                pieces.append((row, values.slice(row, 1).cast(target)))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pieces.append((row, pa.nulls(1, target)))
                bad.append(row)
    pieces.sort(key=lambda piece: piece[0])
    arrays = [array for _, array in pieces]
    result = pa.concat_arrays(arrays) if arrays else pa.nulls(0, target)
    return result, np.array(bad, dtype=np.int64)


def describe_type(dtype: pa.DataType) -> str:
    """Name a type as an error message does: 'integer', 'number', ..."""
    if pa.types.is_integer(dtype):
        return "integer"
    if pa.types.is_floating(dtype):
        return "number"
    if pa.types.is_boolean(dtype):
        return "boolean (" + "/".join(TRUE_VALUES[:1] + FALSE_VALUES[:1]) + ")"
    if pa.types.is_timestamp(dtype):
        return "timestamp (ISO 8601, e.g. 2013-01-01T05:00:00Z)"
    if pa.types.is_date(dtype):
        return "date (YYYY-MM-DD)"
    if pa.types.is_string(dtype):
        return "UTF-8 text"
    return str(dtype)


def cast_strings(
    batch: pa.RecordBatch, schema: pa.Schema
) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """Convert text columns of `batch` to `schema`'s types, value by value.

    Fields of `schema` missing from `batch` become null columns; columns not
    in `schema` are left out. Values convert as in `convert_text`.

    Returns:
        The typed batch and, for each row with a value that does not
        convert, the row index and the reason. Such rows stay in the batch
        with a null in place of the bad value; the caller removes them.
    """
    columns = []
    reasons: dict[int, str] = {}
    for field in schema:
        if field.name not in batch.schema.names:
            columns.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(field.name)
        if column.type == field.type:
            columns.append(column)
            continue
        if not _is_text(column.type):
            columns.append(column.cast(field.type))
            continue
        converted, bad = convert_text(column, field.type)
        texts = column.take(pa.array(bad)).to_pylist()
        for row, text in zip(bad.tolist(), texts, strict=True):
            reasons.setdefault(row, bad_value_reason(field, text))
        columns.append(converted)
    typed = pa.RecordBatch.from_arrays(columns, schema=schema)
    return typed, sorted(reasons.items())


def _is_text(dtype: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_binary(dtype)
        or pa.types.is_large_binary(dtype)
    )


def bad_value_reason(field: pa.Field, value: object) -> str:
    """Describe a value that does not convert to its field's type."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return f"field {field.name!r}: value {value!r} is not valid UTF-8 text"
    if pa.types.is_integer(field.type) and isinstance(value, str):
        bounds = np.iinfo(field.type.to_pandas_dtype())
        number = _integer_value(value.strip())
        if number is not None and not bounds.min <= number <= bounds.max:
            return (
                f"field {field.name!r}: value {value!r} is out of range for "
                f"{field.type} ({bounds.min} to {bounds.max})"
            )
    return (
        f"field {field.name!r}: value {value!r} is not a valid "
        f"{describe_type(field.type)}"
    )


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
_HEX_TEXT = re.compile(r"0[xX][0-9a-fA-F]+")


def _integer_value(text: str) -> int | None:
    """Return the integer that decimal or `0x` hex `text` writes, else None."""
    if _INTEGER_TEXT.fullmatch(text):
        return int(text)
    if _HEX_TEXT.fullmatch(text):
        return int(text, 16)
    return None


_COLUMN_IN_ERROR = re.compile(r"CSV column #(\d+)")


def failed_column(message: str) -> int | None:
    """Return the file column index an Arrow CSV conversion error names, if any."""
    match = _COLUMN_IN_ERROR.search(message)
    return int(match.group(1)) if match else None

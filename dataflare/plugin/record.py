"""Per-record views of an Arrow record batch, for plugins written record by record.

The engine moves records as Arrow record batches. A plugin that is easier to
write one record at a time wraps a batch in a `RecordBatchView` and reads
`PluginRecord` views from it:

    view = RecordBatchView(batch)
    for record in view:
        if record["dep_delay"] is not None and record["dep_delay"] > 15:
            ...

No view copies the batch. A record is a row number plus a reference to its
batch view, and a value is read from the Arrow buffers only when a field is
accessed:

- fixed-width numbers, booleans, strings, binary values, dates and
  timestamps in seconds, milliseconds or microseconds are read straight from
  the column's buffers through `memoryview`, one value per access;
- once a plugin has read more than 1/16 of the rows of a string, binary,
  boolean or nullable number column in one batch, the column is converted
  to a Python list in one call, because indexing a list is several times
  faster than decoding values one by one. A plugin that reads a field of a
  few records converts nothing;
- other types (nested, decimal, dictionary-encoded, ...) are converted to
  Python objects once per batch, on the first access to that field.

Arrow buffers are never copied: conversions build Python objects from the
arrays without allocating from the Arrow memory pool. The per-field readers
are built on the first access to each field and kept for the whole batch,
so the per-access cost is one dictionary lookup and one call.

Stream metadata sits in the reserved columns of `dataflare.plugin.interface`
and is read through properties (`record.key`, `record.event_time`,
`record.partition`, `record.offset`, `record.headers`), which are None when
the batch has no such column. The mapping interface (`record[name]`,
iteration, `len`, `in`, `get`, `to_dict`) covers value fields only.
"""

from __future__ import annotations

import difflib
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, overload

import pyarrow as pa

from dataflare.plugin.interface import (
    EVENT_TIME,
    HEADERS,
    KEY,
    OFFSET,
    PARTITION,
    RESERVED_COLUMNS,
)

Getter = Callable[[int], Any]
"""Reads the value of one column at a row number of the batch."""

_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_UTC_NAMES = frozenset({"UTC", "utc", "Etc/UTC", "+00:00", "Z"})
_MICROSECONDS = {"s": 1_000_000, "ms": 1_000, "us": 1}

# memoryview formats of fixed-width Arrow number types (native byte order,
# which is little-endian on every platform that pyarrow ships wheels for).
_NUMBER_FORMATS = {
    pa.int8(): "b",
    pa.int16(): "h",
    pa.int32(): "i",
    pa.int64(): "q",
    pa.uint8(): "B",
    pa.uint16(): "H",
    pa.uint32(): "I",
    pa.uint64(): "Q",
    pa.float32(): "f",
    pa.float64(): "d",
}


class UnknownFieldError(KeyError):
    """A record was asked for a field that its batch does not have."""

    def __init__(self, name: str, fields: Sequence[str]) -> None:
        self.name = name
        self.fields = list(fields)
        super().__init__(name)

    def __str__(self) -> str:
        hint = ""
        if self.name in RESERVED_COLUMNS:
            prop = self.name.removeprefix("_")
            if self.name == EVENT_TIME:
                prop = "event_time"
            return (
                f"{self.name!r} is a stream metadata column; "
                f"read it with record.{prop} instead of record[{self.name!r}]"
            )
        close = difflib.get_close_matches(self.name, self.fields, n=1)
        if close:
            hint = f" Did you mean {close[0]!r}?"
        fields = ", ".join(self.fields) or "(none)"
        return (
            f"field {self.name!r} not found; the record's fields are: {fields}.{hint}"
        )


def _none(row: int) -> None:
    return None


def _typed_memoryview(buffer: pa.Buffer, fmt: str, offset: int, length: int) -> Any:
    """Return a memoryview of `length` values of `fmt` from `offset`, no copy."""
    raw = memoryview(buffer)
    size = struct.calcsize(fmt)
    usable = (len(raw) // size) * size  # cast needs a whole number of items
    return raw[:usable].cast(fmt)[offset : offset + length]  # type: ignore[call-overload]


def _values_getter(array: pa.Array) -> Getter:
    """Return a getter that ignores validity; nulls are handled by the caller."""
    kind = array.type
    buffers = array.buffers()
    offset = array.offset
    length = len(array)
    fmt = _NUMBER_FORMATS.get(kind)
    if fmt is not None:
        return _typed_memoryview(buffers[1], fmt, offset, length).__getitem__  # type: ignore[no-any-return]
    if pa.types.is_boolean(kind):
        bits = memoryview(buffers[1])

        def get_bool(row: int) -> bool:
            bit = row + offset
            return bool(bits[bit >> 3] >> (bit & 7) & 1)

        return get_bool
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        fmt = "i" if pa.types.is_string(kind) else "q"
        ends = _typed_memoryview(buffers[1], fmt, offset, length + 1)
        text = memoryview(buffers[2]) if buffers[2] is not None else memoryview(b"")

        def get_str(row: int) -> str:
            return str(text[ends[row] : ends[row + 1]], "utf-8")

        return get_str
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        fmt = "i" if pa.types.is_binary(kind) else "q"
        ends = _typed_memoryview(buffers[1], fmt, offset, length + 1)
        data = memoryview(buffers[2]) if buffers[2] is not None else memoryview(b"")

        def get_bytes(row: int) -> bytes:
            return bytes(data[ends[row] : ends[row + 1]])

        return get_bytes
    if pa.types.is_timestamp(kind) and kind.unit in _MICROSECONDS:
        values = _typed_memoryview(buffers[1], "q", offset, length)
        scale = _MICROSECONDS[kind.unit]
        if kind.tz is None or kind.tz in _UTC_NAMES:
            epoch = _EPOCH if kind.tz is None else _EPOCH_UTC

            def get_timestamp(row: int) -> datetime:
                return epoch + timedelta(microseconds=values[row] * scale)

            return get_timestamp
    if pa.types.is_date32(kind):
        days = _typed_memoryview(buffers[1], "i", offset, length)

        def get_date(row: int) -> date:
            return date.fromordinal(_EPOCH_ORDINAL + days[row])

        return get_date
    # Other types: convert the column once, on the first access to it.
    return array.to_pylist().__getitem__  # type: ignore[no-any-return]


def column_getter(array: pa.Array) -> Getter:
    """Return a function that reads `array[row]` as a Python value, or None.

    The getter reads the column's buffers in place (see the module docstring
    for the types that are converted once per batch instead).
    """
    if array.null_count == len(array):
        return _none
    get = _values_getter(array)
    if array.null_count == 0:
        return get
    valid = memoryview(array.buffers()[0])
    offset = array.offset

    def get_or_none(row: int) -> Any:
        bit = row + offset
        if valid[bit >> 3] >> (bit & 7) & 1:
            return get(row)
        return None

    return get_or_none


def _event_time_us_getter(array: pa.Array) -> Getter:
    """Return a getter of event times as integer microseconds since the epoch."""
    kind = array.type
    if not pa.types.is_timestamp(kind) or kind.unit not in _MICROSECONDS:
        return column_getter(array.cast(pa.int64()))
    values = _typed_memoryview(array.buffers()[1], "q", array.offset, len(array))
    scale = _MICROSECONDS[kind.unit]
    if array.null_count == 0:
        if scale == 1:
            return values.__getitem__  # type: ignore[no-any-return]
        return lambda row: values[row] * scale
    valid = memoryview(array.buffers()[0])
    offset = array.offset

    def get_or_none(row: int) -> int | None:
        bit = row + offset
        return values[row] * scale if valid[bit >> 3] >> (bit & 7) & 1 else None

    return get_or_none


DENSE_FRACTION = 16
"""A column is converted whole once more than 1/16 of its rows were read."""


def _converts_whole(array: pa.Array) -> bool:
    """Return True if converting `array` whole beats reading values one by one.

    Per-value reads of strings, binary values, booleans and numbers with
    nulls cost several times more than an index into a converted list.
    Timestamps and dates are left out: pyarrow converts zoned timestamps
    more slowly than the per-value reader does.
    """
    kind = array.type
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_boolean(kind)
    ):
        return True
    return kind in _NUMBER_FORMATS and array.null_count > 0


def _adaptive_getter(
    array: pa.Array, getter: Getter, on_convert: Callable[[Getter], None]
) -> Getter:
    """Return a getter that reads in place, then converts the column when dense.

    While few rows are read, values come from the buffers one by one, so a
    plugin that reads a field of a few records converts nothing. Once more
    than 1/DENSE_FRACTION of the rows were read, the column is converted to
    a Python list in one call and `on_convert` receives the list's getter.
    """
    threshold = max(len(array) // DENSE_FRACTION, 8)
    reads = 0
    converted: list[Any] | None = None

    def read(row: int) -> Any:
        nonlocal reads, converted
        if converted is not None:
            return converted[row]
        reads += 1
        if reads <= threshold:
            return getter(row)
        converted = array.to_pylist()
        on_convert(converted.__getitem__)
        return converted[row]

    return read


class _BatchState(dict[str, Getter]):
    """Getters of one batch's value fields, built on the first access to each.

    It is a dict so that `record[name]` costs one dictionary look-up; a
    missing key builds the field's getter.
    """

    __slots__ = ("fields", "positions", "view")

    def __init__(self, view: RecordBatchView) -> None:
        super().__init__()
        self.view = view
        self.fields = view.fields
        self.positions = {name: i for i, name in enumerate(view.batch.schema.names)}

    def __missing__(self, name: str) -> Getter:
        if name in RESERVED_COLUMNS or name not in self.positions:
            raise UnknownFieldError(name, self.fields)
        array = self.view.batch.column(self.positions[name])
        getter = column_getter(array)
        if _converts_whole(array):

            def replace(converted: Getter) -> None:
                self[name] = converted

            getter = _adaptive_getter(array, getter, replace)
        self[name] = getter
        return getter


class RecordBatchView(Sequence["PluginRecord"]):
    """Per-record access to one Arrow record batch, without copying it.

    Args:
        batch: the batch to view. It is kept by reference; Arrow batches are
            immutable, so the views stay valid as long as they are referenced.

    Example::

        view = RecordBatchView(batch)
        delays = [r["dep_delay"] for r in view if r["origin"] == "JFK"]
    """

    __slots__ = ("_meta", "_state", "batch", "fields", "num_rows")

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self.num_rows: int = batch.num_rows
        self.fields: tuple[str, ...] = tuple(
            name for name in batch.schema.names if name not in RESERVED_COLUMNS
        )
        """Names of the value fields, in batch order (reserved columns left out)."""
        self._state = _BatchState(self)
        self._meta: dict[str, Getter] = {}

    def __len__(self) -> int:
        return self.num_rows

    @overload
    def __getitem__(self, row: int) -> PluginRecord: ...

    @overload
    def __getitem__(self, row: slice) -> list[PluginRecord]: ...

    def __getitem__(self, row: int | slice) -> PluginRecord | list[PluginRecord]:
        if isinstance(row, slice):
            return [PluginRecord(self, i) for i in range(*row.indices(self.num_rows))]
        if row < 0:
            row += self.num_rows
        if not 0 <= row < self.num_rows:
            raise IndexError(
                f"record {row} is out of range; the batch has {self.num_rows} rows"
            )
        return PluginRecord(self, row)

    def __iter__(self) -> Iterator[PluginRecord]:
        # Building records without __init__ saves a Python call per record.
        new = PluginRecord.__new__
        state = self._state
        for row in range(self.num_rows):
            record = new(PluginRecord)
            record._state = state
            record.row = row
            yield record

    def getter(self, name: str) -> Getter:
        """Return the reader of value field `name`: `getter(row)` is its value.

        Raises:
            UnknownFieldError: the batch has no value field `name`.
        """
        return self._state[name]

    def metadata_getter(self, column: str) -> Getter:
        """Return the reader of reserved column `column`; it returns None if absent."""
        getter = self._meta.get(column)
        if getter is None:
            index = self.batch.schema.get_field_index(column)
            if index < 0:
                getter = _none
            elif column == EVENT_TIME:
                getter = _event_time_us_getter(self.batch.column(index))
            else:
                getter = column_getter(self.batch.column(index))
            self._meta[column] = getter
        return getter


class PluginRecord(Mapping[str, Any]):
    """A read-only view of one row of a record batch.

    Value fields are read with `record[name]` or `record.get(name, default)`;
    iteration yields the value field names in batch order. Null values are
    None. Stream metadata is read through the properties below.

    A record is a row number and a reference to its batch view, so it costs
    the same whatever the width of the batch. Keeping a record keeps its
    batch alive. Build records with `RecordBatchView`, not directly.
    """

    __slots__ = ("_state", "row")

    _state: _BatchState
    row: int
    """Row number of the record in its batch."""

    def __init__(self, view: RecordBatchView, row: int) -> None:
        self._state = view._state
        self.row = row

    def __getitem__(self, name: str) -> Any:
        return self._state[name](self.row)

    def get(self, name: str, default: Any = None) -> Any:
        """Return the value of field `name`, or `default` if there is no such field.

        A field that exists but is null returns None, not `default`.
        """
        try:
            getter = self._state[name]
        except UnknownFieldError:
            return default
        return getter(self.row)

    def __contains__(self, name: object) -> bool:
        return name in self._state.fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._state.fields)

    def __len__(self) -> int:
        return len(self._state.fields)

    def __repr__(self) -> str:
        return f"PluginRecord(row={self.row}, {self.to_dict()!r})"

    @property
    def batch(self) -> pa.RecordBatch:
        """The record batch this record is a row of."""
        return self._state.view.batch

    def to_dict(self) -> dict[str, Any]:
        """Return the value fields as a new dict (reserved columns left out)."""
        state = self._state
        row = self.row
        return {name: state[name](row) for name in state.fields}

    def _metadata(self, column: str) -> Any:
        return self._state.view.metadata_getter(column)(self.row)

    @property
    def key(self) -> Any:
        """Record key from the `_key` column, or None."""
        return self._metadata(KEY)

    @property
    def event_time(self) -> datetime | None:
        """Event time from the `_event_time` column, as a UTC datetime, or None."""
        micros = self._metadata(EVENT_TIME)
        if micros is None:
            return None
        return _EPOCH_UTC + timedelta(microseconds=micros)

    @property
    def event_time_us(self) -> int | None:
        """Event time in microseconds since the Unix epoch (UTC), or None."""
        return self._metadata(EVENT_TIME)  # type: ignore[no-any-return]

    @property
    def partition(self) -> int | None:
        """Source partition from the `_partition` column, or None."""
        return self._metadata(PARTITION)  # type: ignore[no-any-return]

    @property
    def offset(self) -> int | None:
        """Offset in the source partition from the `_offset` column, or None."""
        return self._metadata(OFFSET)  # type: ignore[no-any-return]

    @property
    def headers(self) -> dict[str, Any] | None:
        """Headers from the `_headers` column as a dict, or None.

        A map column or a list of key/value pairs becomes a dict; a struct
        column becomes its dict of fields.
        """
        value = self._metadata(HEADERS)
        if value is None or isinstance(value, dict):
            return value
        return dict(value)

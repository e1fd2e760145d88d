"""The v1 batch encoding between the host and WebAssembly plugins.

`docs/plugin-batch-encoding.md` defines the byte layouts; this module is the
host's side of them:

- `BatchEncoder` turns the columns a plugin reads into one `DFB1` buffer,
  copying each Arrow buffer once into place (numpy views, no per-record
  Python);
- `decode_selection` turns a filter's `DFS1` output into an Arrow boolean
  mask without copying the bits more than once;
- `decode_batch` turns a map's `DFB1` output into Arrow arrays that share
  one copy of the output bytes, and checks them so that malformed output
  can never reach the rest of the pipeline.

`encode_arrays` and `encode_selection` build outputs the way a plugin
would; tests and Python reference plugins use them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import pyarrow as pa

BATCH_MAGIC = b"DFB1"
SELECTION_MAGIC = b"DFS1"
VERSION = 1
HEADER_SIZE = 16
DESCRIPTOR_SIZE = 12  # without the name bytes
SELECTION_HEADER_SIZE = 8
MAX_U32 = 0xFFFF_FFFF

_HEADER = struct.Struct("<4sHHII")
_DESCRIPTOR = struct.Struct("<BBHII")
_SELECTION_HEADER = struct.Struct("<4sI")

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")


class WireType(IntEnum):
    """Type codes of the v1 encoding."""

    INT64 = 1
    FLOAT64 = 2
    BOOL = 3
    UTF8 = 4
    TIMESTAMP = 5

    @property
    def label(self) -> str:
        """The name used for this type in manifests (`int64`, `utf8`, ...)."""
        return self.name.lower()

    def arrow_type(self) -> pa.DataType:
        """Return the Arrow type that the host decodes this wire type into."""
        return _ARROW_TYPES[self]


_ARROW_TYPES: dict[WireType, pa.DataType] = {
    WireType.INT64: pa.int64(),
    WireType.FLOAT64: pa.float64(),
    WireType.BOOL: pa.bool_(),
    WireType.UTF8: pa.string(),
    WireType.TIMESTAMP: TIMESTAMP_TYPE,
}

WIRE_TYPE_NAMES: dict[str, WireType] = {t.label: t for t in WireType}


class EncodingError(ValueError):
    """A batch cannot be encoded, for example a type the encoding lacks."""


class UnsupportedTypeError(EncodingError):
    """A field's Arrow type has no lossless v1 representation."""

    def __init__(self, field: str, type_: pa.DataType) -> None:
        self.field = field
        self.type = type_
        super().__init__(
            f"field {field!r} has type {type_}, which WebAssembly plugins cannot "
            "read: the batch encoding carries int64, float64, bool, utf8 and "
            "timestamp[us] (smaller integers, float32, other string types, dates "
            "and timestamps in s or ms are converted). Convert the field first, "
            "for example with a `cast` step, or leave it out of the manifest's "
            "`fields`."
        )


class MalformedOutputError(ValueError):
    """A plugin returned bytes that do not follow the v1 layout."""


@dataclass(frozen=True)
class ColumnPlan:
    """Encoding plan of one input column."""

    wire_name: str
    """Name written into the batch (the manifest's name for the field)."""
    input_name: str
    """Name of the column in the Arrow batch."""
    wire_type: WireType
    cast_to: pa.DataType | None
    """Arrow type to cast to before encoding, or None when none is needed."""


def wire_type_for(type_: pa.DataType) -> tuple[WireType, pa.DataType | None] | None:
    """Return the wire type of an Arrow type and the cast it needs first.

    Returns None for types without a lossless representation (uint64,
    decimals, nested types, timestamp[ns], ...).
    """
    if pa.types.is_int64(type_):
        return WireType.INT64, None
    if pa.types.is_integer(type_) and not pa.types.is_uint64(type_):
        return WireType.INT64, pa.int64()
    if pa.types.is_float64(type_):
        return WireType.FLOAT64, None
    if pa.types.is_floating(type_):
        return WireType.FLOAT64, pa.float64()
    if pa.types.is_boolean(type_):
        return WireType.BOOL, None
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return WireType.UTF8, None
    if pa.types.is_string_view(type_):
        return WireType.UTF8, pa.string()
    if pa.types.is_dictionary(type_) and (
        pa.types.is_string(type_.value_type)
        or pa.types.is_large_string(type_.value_type)
    ):
        return WireType.UTF8, pa.string()
    if pa.types.is_timestamp(type_):
        if type_.unit == "us":
            return WireType.TIMESTAMP, None
        if type_.unit in ("s", "ms"):
            return WireType.TIMESTAMP, pa.timestamp("us", tz=type_.tz)
        return None  # nanoseconds would lose precision
    if pa.types.is_date(type_):
        return WireType.TIMESTAMP, pa.timestamp("us")
    return None


def plan_columns(
    schema: pa.Schema, fields: Sequence[tuple[str, str]] | None
) -> list[ColumnPlan]:
    """Decide how to encode the columns a plugin reads.

    Args:
        schema: the input schema.
        fields: (wire name, input name) pairs, or None for every column of a
            supported type under its own name.

    Raises:
        KeyError: an input name is not in the schema (callers check first).
        UnsupportedTypeError: a named field has a type the encoding lacks.
    """
    plans = []
    if fields is None:
        for field in schema:
            found = wire_type_for(field.type)
            if found is not None:
                plans.append(ColumnPlan(field.name, field.name, *found))
        return plans
    for wire_name, input_name in fields:
        type_ = schema.field(input_name).type
        found = wire_type_for(type_)
        if found is None:
            raise UnsupportedTypeError(input_name, type_)
        plans.append(ColumnPlan(wire_name, input_name, *found))
    return plans


def _pad8(size: int) -> int:
    return (size + 7) & ~7


def _bitmap_bytes(rows: int) -> int:
    return (rows + 7) // 8


def _validity(array: pa.Array) -> np.ndarray | None:
    """Return the validity bitmap of `array` starting at bit 0, or None."""
    if array.null_count == 0:
        return None
    rows = len(array)
    buffer = array.buffers()[0]
    offset = array.offset
    if offset % 8 == 0:
        return np.frombuffer(
            buffer, np.uint8, count=_bitmap_bytes(rows), offset=offset // 8
        )
    bits = np.unpackbits(
        np.frombuffer(buffer, np.uint8), bitorder="little", count=offset + rows
    )
    return np.packbits(bits[offset:], bitorder="little")


def _column_parts(array: pa.Array, wire_type: WireType) -> list[np.ndarray]:
    """Return the value sections of one column as uint8 numpy views."""
    rows = len(array)
    offset = array.offset
    buffers = array.buffers()
    if wire_type in (WireType.INT64, WireType.FLOAT64, WireType.TIMESTAMP):
        if rows == 0:
            return [np.zeros(0, np.uint8)]
        return [np.frombuffer(buffers[1], np.uint8, count=8 * rows, offset=8 * offset)]
    if wire_type is WireType.BOOL:
        if rows == 0:
            return [np.zeros(0, np.uint8)]
        bits = np.unpackbits(
            np.frombuffer(buffers[1], np.uint8),
            bitorder="little",
            count=offset + rows,
        )
        return [bits[offset:]]
    # utf8, with 32-bit or 64-bit Arrow offsets
    large = pa.types.is_large_string(array.type)
    offset_type = np.int64 if large else np.int32
    width = 8 if large else 4
    if rows == 0 or buffers[1] is None:
        return [np.zeros(4, np.uint8), np.zeros(0, np.uint8)]
    offsets = np.frombuffer(
        buffers[1], offset_type, count=rows + 1, offset=width * offset
    )
    first, last = int(offsets[0]), int(offsets[-1])
    if last - first > MAX_U32:
        raise EncodingError(
            f"a string column contains {last - first} bytes in one batch, more than "
            "the 4 GiB the encoding allows; use smaller batches "
            "(execution.max_batch_rows)"
        )
    wire_offsets = (offsets - first).astype(np.uint32).view(np.uint8)
    data = (
        np.frombuffer(buffers[2], np.uint8, count=last - first, offset=first)
        if last > first
        else np.zeros(0, np.uint8)
    )
    return [wire_offsets, data]


class BatchEncoder:
    """Encoder of the columns a plugin reads, for batches of one schema.

    The header and the descriptors are packed with one precompiled struct
    per schema, so the per-batch Python work is a few calls per column.
    """

    def __init__(self, columns: Sequence[ColumnPlan]) -> None:
        self.columns = list(columns)
        self._names = [c.wire_name.encode() for c in self.columns]
        layout = "<4sHHII" + "".join(f"BBHII{len(n)}s" for n in self._names)
        self._header = struct.Struct(layout)
        self._data_start = _pad8(self._header.size)
        self._indices: tuple[pa.Schema, list[int]] | None = None

    def _column_indices(self, schema: pa.Schema) -> list[int]:
        if self._indices is None or self._indices[0] is not schema:
            indices = [schema.get_field_index(c.input_name) for c in self.columns]
            self._indices = (schema, indices)
        return self._indices[1]

    def encode(self, batch: pa.RecordBatch) -> np.ndarray:
        """Return the `DFB1` bytes of `batch` as a uint8 numpy array.

        Raises:
            EncodingError: a value cannot be represented (for example a
                string column above 4 GiB, or a timestamp out of range).
        """
        rows = batch.num_rows
        if rows > MAX_U32:
            raise EncodingError(f"a batch of {rows} rows is too large to encode")
        bitmap_size = _pad8(_bitmap_bytes(rows))
        fields: list[object] = [BATCH_MAGIC, VERSION, 0, rows, len(self.columns)]
        sections = []
        position = self._data_start
        indices = self._column_indices(batch.schema)
        for plan, index, name in zip(self.columns, indices, self._names, strict=True):
            array = batch.column(index)
            if plan.cast_to is not None:
                try:
                    array = array.cast(plan.cast_to)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise EncodingError(
                        f"field {plan.input_name!r} cannot be converted to "
                        f"{plan.cast_to} for the plugin: {exc}"
                    ) from exc
            validity = _validity(array)
            # Lay out the block: the bitmap, then each part at a multiple of 8.
            start = position
            if validity is not None:
                sections.append((position, validity))
                position += bitmap_size
            end = position
            for part in _column_parts(array, plan.wire_type):
                sections.append((position, part))
                end = position + part.size
                position = _pad8(end)
            fields += [
                int(plan.wire_type),
                0 if validity is None else 1,
                len(name),
                start,
                end - start,
                name,
            ]
        out = np.zeros(position, np.uint8)
        self._header.pack_into(memoryview(out), 0, *fields)  # type: ignore[arg-type]
        for at, section in sections:
            out[at : at + section.size] = section
        return out


def encode_batch(
    batch: pa.RecordBatch, fields: Sequence[tuple[str, str]] | None = None
) -> np.ndarray:
    """Encode `batch` (or the named fields of it) in one call; see BatchEncoder."""
    return BatchEncoder(plan_columns(batch.schema, fields)).encode(batch)


def encode_arrays(arrays: Mapping[str, pa.Array], rows: int = 0) -> bytes:
    """Encode Arrow arrays as a `DFB1` batch, as a plugin's output would be.

    `rows` is used only when `arrays` is empty.
    """
    if not arrays:
        header = bytearray(HEADER_SIZE)
        _HEADER.pack_into(header, 0, BATCH_MAGIC, VERSION, 0, rows, 0)
        return bytes(header)
    batch = pa.RecordBatch.from_arrays(list(arrays.values()), names=list(arrays))
    return encode_batch(batch).tobytes()


def encode_selection(mask: pa.Array | Sequence[bool]) -> bytes:
    """Encode a boolean mask as a `DFS1` selection vector (nulls drop)."""
    values = np.asarray(
        pa.array(mask, pa.bool_()).fill_null(False).to_numpy(zero_copy_only=False),
        dtype=bool,
    )
    bits = np.packbits(values, bitorder="little")
    return _SELECTION_HEADER.pack(SELECTION_MAGIC, len(values)) + bits.tobytes()


def _check_magic(data: memoryview, expected: bytes, what: str) -> None:
    magic = bytes(data[:4])
    if magic == expected:
        return
    if magic[:3] == expected[:3]:
        raise MalformedOutputError(
            f"{what} has encoding version {magic[3:4].decode(errors='replace')!r}; "
            f"this host reads version {expected[3:4].decode()} only; rebuild the "
            "plugin against the current SDK"
        )
    raise MalformedOutputError(
        f"{what} does not start with {expected.decode()!r} (got {magic!r}); "
        "the plugin must write its output with the DataFlare SDK's writer"
    )


def decode_selection(data: bytes | memoryview, rows: int) -> pa.BooleanArray:
    """Decode a `DFS1` selection vector for a batch of `rows` rows.

    Raises:
        MalformedOutputError: wrong magic, row count or length.
    """
    view = memoryview(data).cast("B")
    needed = SELECTION_HEADER_SIZE + _bitmap_bytes(rows)
    if len(view) < SELECTION_HEADER_SIZE:
        raise MalformedOutputError(
            f"the filter's output is {len(view)} bytes long, too short for a "
            "selection vector (8-byte header)"
        )
    _check_magic(view, SELECTION_MAGIC, "the filter's output")
    _, count = _SELECTION_HEADER.unpack_from(view, 0)
    if count != rows:
        raise MalformedOutputError(
            f"the selection vector is for {count} rows but the batch has {rows}"
        )
    if len(view) < needed:
        raise MalformedOutputError(
            f"the selection vector is {len(view)} bytes long; {rows} rows need "
            f"{needed} bytes"
        )
    bitmap = pa.py_buffer(bytes(view[SELECTION_HEADER_SIZE:needed]))
    return pa.Array.from_buffers(pa.bool_(), rows, [None, bitmap])


@dataclass(frozen=True)
class DecodedBatch:
    """A plugin's output batch: its row count and columns, in wire order."""

    rows: int
    columns: dict[str, pa.Array]
    flags: int


def decode_batch(data: bytes | memoryview) -> DecodedBatch:
    """Decode a `DFB1` batch into Arrow arrays.

    The output bytes are copied once; every array is a view into that copy.
    Each array is fully validated (offsets, UTF-8), so a malformed output
    raises here instead of corrupting later steps.

    Raises:
        MalformedOutputError: naming the column and what is wrong with it.
    """
    view = memoryview(data).cast("B")
    size = len(view)
    if size < HEADER_SIZE:
        raise MalformedOutputError(
            f"the output is {size} bytes long, too short for a batch header "
            f"({HEADER_SIZE} bytes)"
        )
    _check_magic(view, BATCH_MAGIC, "the output")
    _, version, flags, rows, count = _HEADER.unpack_from(view, 0)
    if version != VERSION:
        raise MalformedOutputError(
            f"the output's header has version {version}; this host reads "
            f"version {VERSION}"
        )
    raw = np.frombuffer(view, np.uint8).copy()
    buffer = pa.py_buffer(raw)
    columns: dict[str, pa.Array] = {}
    cursor = HEADER_SIZE
    for index in range(count):
        if cursor + DESCRIPTOR_SIZE > size:
            raise MalformedOutputError(
                f"the output declares {count} columns but ends inside the "
                f"descriptor of column {index}"
            )
        code, has_validity, name_length, start, length = _DESCRIPTOR.unpack_from(
            view, cursor
        )
        cursor += DESCRIPTOR_SIZE
        name_bytes = bytes(raw[cursor : cursor + name_length])
        cursor += name_length
        try:
            name = name_bytes.decode()
        except UnicodeDecodeError:
            raise MalformedOutputError(
                f"the name of output column {index} is not UTF-8: {name_bytes!r}"
            ) from None
        if not name or len(name_bytes) != name_length:
            raise MalformedOutputError(
                f"output column {index} has an empty or truncated name"
            )
        if name in columns:
            raise MalformedOutputError(f"the output has two columns named {name!r}")
        try:
            wire_type = WireType(code)
        except ValueError:
            raise MalformedOutputError(
                f"output column {name!r} has unknown type code {code}; "
                "v1 defines 1 to 5"
            ) from None
        if has_validity not in (0, 1):
            raise MalformedOutputError(
                f"output column {name!r} has has_validity={has_validity}; "
                "it must be 0 or 1"
            )
        if start % 8 or start < cursor or start + length > size:
            raise MalformedOutputError(
                f"output column {name!r} has its data at bytes {start} to "
                f"{start + length}, which is misaligned, overlaps the header or "
                f"lies outside the {size}-byte output"
            )
        columns[name] = _decode_column(
            name, wire_type, bool(has_validity), rows, raw, buffer, start, length
        )
    return DecodedBatch(rows, columns, flags)


def _decode_column(
    name: str,
    wire_type: WireType,
    has_validity: bool,
    rows: int,
    raw: np.ndarray,
    buffer: pa.Buffer,
    start: int,
    length: int,
) -> pa.Array:
    end = start + length
    position = start
    validity = None
    if has_validity:
        validity = buffer.slice(position, _bitmap_bytes(rows))
        position += _pad8(_bitmap_bytes(rows))

    def need(size: int, what: str) -> None:
        if position + size > end:
            raise MalformedOutputError(
                f"output column {name!r} is too short: its {what} needs "
                f"{size} bytes at offset {position} but the column's data "
                f"block ends at {end}"
            )

    arrow_type = wire_type.arrow_type()
    if wire_type in (WireType.INT64, WireType.FLOAT64, WireType.TIMESTAMP):
        need(8 * rows, "values")
        values = buffer.slice(position, 8 * rows)
        array = pa.Array.from_buffers(arrow_type, rows, [validity, values])
    elif wire_type is WireType.BOOL:
        need(rows, "values")
        bits = np.packbits(raw[position : position + rows] != 0, bitorder="little")
        array = pa.Array.from_buffers(arrow_type, rows, [validity, pa.py_buffer(bits)])
    else:
        need(4 * (rows + 1), "offsets")
        offsets = raw[position : position + 4 * (rows + 1)].view(np.uint32)
        byte_count = int(offsets[-1])
        if offsets[0] != 0 or (rows and np.any(offsets[1:] < offsets[:-1])):
            raise MalformedOutputError(
                f"output column {name!r} has string offsets that do not start "
                "at 0 and never decrease"
            )
        if byte_count >= 2**31:
            raise MalformedOutputError(
                f"output column {name!r} contains {byte_count} bytes of text, more "
                "than 2 GiB in one batch"
            )
        offsets_buffer = buffer.slice(position, 4 * (rows + 1))
        position = _pad8(position + 4 * (rows + 1))
        need(byte_count, "text bytes")
        data = buffer.slice(position, byte_count)
        array = pa.Array.from_buffers(
            arrow_type, rows, [validity, offsets_buffer, data]
        )
    try:
        array.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise MalformedOutputError(
            f"output column {name!r} is not a valid {wire_type.label} column: {exc}"
        ) from exc
    return array

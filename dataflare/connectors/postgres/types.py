"""PostgreSQL types and Arrow types, both ways, and COPY encoding.

Reading, a column's Arrow type follows its PostgreSQL type (by type OID,
with the precision and scale of `numeric(p, s)`). Types with no exact Arrow
counterpart are read as their text form (the SELECT casts them to `text`).

Writing, a new table gets a column type for each Arrow field, and batches
are sent with `COPY ... FROM STDIN (FORMAT csv)`, encoded by Arrow's CSV
writer: nulls are unquoted empty fields, and text is always quoted, so an
empty string stays distinct from null.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

# Type OIDs of the built-in types read as their own Arrow type.
_SCALARS: dict[int, pa.DataType] = {
    16: pa.bool_(),
    17: pa.binary(),
    18: pa.string(),  # "char"
    19: pa.string(),  # name
    20: pa.int64(),
    21: pa.int16(),
    23: pa.int32(),
    25: pa.string(),
    26: pa.int64(),  # oid
    700: pa.float32(),
    701: pa.float64(),
    1042: pa.string(),  # char(n)
    1043: pa.string(),  # varchar
    1082: pa.date32(),
    1083: pa.time64("us"),
    1114: pa.timestamp("us"),
    1184: pa.timestamp("us", tz="UTC"),
}

# One-dimensional arrays of those types.
_ARRAYS: dict[int, int] = {
    1000: 16,
    1005: 21,
    1007: 23,
    1016: 20,
    1021: 700,
    1022: 701,
    1009: 25,
    1015: 1043,
    1182: 1082,
    1115: 1114,
    1185: 1184,
}

NUMERIC = 1700
MAX_DECIMAL128 = 38


def arrow_type(
    oid: int, precision: int | None, scale: int | None
) -> pa.DataType | None:
    """Return the Arrow type of a PostgreSQL column; None: read it as text."""
    if oid in _SCALARS:
        return _SCALARS[oid]
    if oid == NUMERIC:
        if precision is not None and 0 < precision <= MAX_DECIMAL128:
            return pa.decimal128(precision, scale or 0)
        return None  # numeric without a precision: its exact text
    if oid in _ARRAYS:
        return pa.list_(_SCALARS[_ARRAYS[oid]])
    return None


def column_type(field: pa.Field) -> str:
    """Return the PostgreSQL type for a column that holds an Arrow field.

    Raises:
        ValueError: no PostgreSQL type holds it; the message names the field.
    """
    return _sql_type(field.type, field.name)


def _sql_type(dtype: pa.DataType, name: str) -> str:
    t = pa.types
    if t.is_dictionary(dtype):
        return _sql_type(dtype.value_type, name)
    if t.is_boolean(dtype):
        return "boolean"
    if t.is_int8(dtype) or t.is_int16(dtype) or t.is_uint8(dtype):
        return "smallint"
    if t.is_int32(dtype) or t.is_uint16(dtype):
        return "integer"
    if t.is_int64(dtype) or t.is_uint32(dtype):
        return "bigint"
    if t.is_uint64(dtype):
        return "numeric(20, 0)"
    if t.is_float16(dtype) or t.is_float32(dtype):
        return "real"
    if t.is_float64(dtype):
        return "double precision"
    if t.is_decimal(dtype):
        if dtype.precision > 1000:
            return "numeric"
        return f"numeric({dtype.precision}, {dtype.scale})"
    if t.is_string(dtype) or t.is_large_string(dtype) or t.is_null(dtype):
        return "text"
    if t.is_binary(dtype) or t.is_large_binary(dtype) or t.is_fixed_size_binary(dtype):
        return "bytea"
    if t.is_date(dtype):
        return "date"
    if t.is_timestamp(dtype):
        return "timestamp with time zone" if dtype.tz else "timestamp without time zone"
    if t.is_time(dtype):
        return "time"
    if t.is_duration(dtype):
        return "interval"
    if t.is_list(dtype) or t.is_large_list(dtype):
        inner = dtype.value_type
        if t.is_nested(inner):
            return "jsonb"
        return _sql_type(inner, name) + "[]"
    if t.is_struct(dtype) or t.is_map(dtype):
        return "jsonb"
    raise ValueError(
        f"field {name!r} has Arrow type {dtype}, which no PostgreSQL column type "
        "holds; cast it first (for example with a `cast` step)"
    )


# --- COPY encoding ----------------------------------------------------------------


def copy_csv(batch: pa.RecordBatch) -> bytes:
    """Encode a batch as CSV for `COPY ... FROM STDIN (FORMAT csv)`."""
    columns = [
        _wire(column, field.type)
        for column, field in zip(batch.columns, batch.schema, strict=True)
    ]
    table = pa.Table.from_arrays(columns, names=[f"c{i}" for i in range(len(columns))])
    out = io.BytesIO()
    pacsv.write_csv(
        table,
        out,
        write_options=pacsv.WriteOptions(include_header=False, quoting_style="needed"),
    )
    return out.getvalue()


def _wire(column: pa.Array, dtype: pa.DataType) -> pa.Array:
    """Turn a column into values whose CSV text PostgreSQL reads back exactly."""
    t = pa.types
    if t.is_dictionary(dtype):
        column = column.cast(dtype.value_type)
        dtype = dtype.value_type
    if t.is_string(dtype) or t.is_large_string(dtype):
        return column
    if t.is_binary(dtype) or t.is_large_binary(dtype) or t.is_fixed_size_binary(dtype):
        return pa.array(
            [None if v is None else "\\x" + v.hex() for v in column.to_pylist()],
            type=pa.string(),
        )
    if t.is_duration(dtype):
        micros = pc.cast(column, pa.duration("us")).cast(pa.int64())
        return pc.binary_join_element_wise(
            micros.cast(pa.string()), pa.scalar(" microseconds"), ""
        )
    if t.is_float16(dtype):
        return column.cast(pa.float32())
    if t.is_list(dtype) or t.is_large_list(dtype):
        if t.is_nested(dtype.value_type):
            return _json(column)
        return pa.array(
            [None if v is None else _array_literal(v) for v in column.to_pylist()],
            type=pa.string(),
        )
    if t.is_struct(dtype) or t.is_map(dtype):
        return _json(column)
    if t.is_null(dtype):
        return column.cast(pa.string())
    return column


def _json(column: pa.Array) -> pa.Array:
    return pa.array(
        [
            None if v is None else json.dumps(v, default=str, ensure_ascii=False)
            for v in column.to_pylist()
        ],
        type=pa.string(),
    )


def _array_literal(values: list[Any]) -> str:
    """Format a list as a PostgreSQL array literal: {1,"a b",NULL}."""
    parts = []
    for value in values:
        if value is None:
            parts.append("NULL")
        elif isinstance(value, bool):
            parts.append("t" if value else "f")
        elif isinstance(value, int | float):
            parts.append(repr(value) if isinstance(value, float) else str(value))
        else:
            text = value.isoformat() if hasattr(value, "isoformat") else str(value)
            escaped = text.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'"{escaped}"')
    return "{" + ",".join(parts) + "}"

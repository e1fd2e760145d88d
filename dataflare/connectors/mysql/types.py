"""MariaDB/MySQL column types and Arrow types, both ways.

Reading, a column's Arrow type follows the type code, length, flags and
character set that the server reports for it (so `tinyint(1)` is a
boolean and `bigint unsigned` a uint64). Writing, a new table gets a column
type for each Arrow field, and values are converted so that PyMySQL sends
them unchanged: zoned timestamps as UTC, nested values as JSON text.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

_UNSIGNED = 32
_BINARY_CHARSET = 63

DECIMAL, NEWDECIMAL = 0, 246
TINY, SHORT, LONG, FLOAT, DOUBLE, NULL = 1, 2, 3, 4, 5, 6
TIMESTAMP, LONGLONG, INT24, DATE, TIME, DATETIME, YEAR, NEWDATE = (
    7,
    8,
    9,
    10,
    11,
    12,
    13,
    14,
)
BIT, JSON = 16, 245


def arrow_type(
    type_code: int, length: int, scale: int, flags: int, charset: int
) -> pa.DataType:
    """Return the Arrow type of a result column as the server describes it."""
    unsigned = bool(flags & _UNSIGNED)
    if type_code == TINY:
        if length == 1 and not unsigned:
            return pa.bool_()
        return pa.int16() if unsigned else pa.int8()
    if type_code == SHORT:
        return pa.int32() if unsigned else pa.int16()
    if type_code == INT24:
        return pa.int32()
    if type_code == LONG:
        return pa.int64() if unsigned else pa.int32()
    if type_code == LONGLONG:
        return pa.uint64() if unsigned else pa.int64()
    if type_code == FLOAT:
        return pa.float32()
    if type_code == DOUBLE:
        return pa.float64()
    if type_code in (DECIMAL, NEWDECIMAL):
        precision = length - (1 if scale > 0 else 0) - (0 if unsigned else 1)
        if 0 < precision <= 38:
            return pa.decimal128(precision, scale)
        return pa.string()
    if type_code == TIMESTAMP:
        return pa.timestamp("us", tz="UTC")
    if type_code == DATETIME:
        return pa.timestamp("us")
    if type_code in (DATE, NEWDATE):
        return pa.date32()
    if type_code == TIME:
        return pa.duration("us")
    if type_code == YEAR:
        return pa.int16()
    if type_code == BIT:
        return pa.binary()
    if type_code == JSON:
        return pa.string()
    if type_code == NULL:
        return pa.string()
    return pa.binary() if charset == _BINARY_CHARSET else pa.string()


def column_type(field: pa.Field, *, key: bool = False) -> str:
    """Return the column type that holds an Arrow field.

    Key columns get bounded text types (`VARCHAR(255)`, `VARBINARY(255)`),
    since MariaDB and MySQL index only a prefix of TEXT and BLOB columns.

    Raises:
        ValueError: no column type holds it; the message names the field.
    """
    dtype = field.type
    t = pa.types
    if t.is_dictionary(dtype):
        dtype = dtype.value_type
    simple: list[tuple[Any, str]] = [
        (t.is_boolean, "BOOLEAN"),
        (t.is_int8, "TINYINT"),
        (t.is_int16, "SMALLINT"),
        (t.is_int32, "INT"),
        (t.is_int64, "BIGINT"),
        (t.is_uint8, "TINYINT UNSIGNED"),
        (t.is_uint16, "SMALLINT UNSIGNED"),
        (t.is_uint32, "INT UNSIGNED"),
        (t.is_uint64, "BIGINT UNSIGNED"),
        (t.is_float16, "FLOAT"),
        (t.is_float32, "FLOAT"),
        (t.is_float64, "DOUBLE"),
        (t.is_date, "DATE"),
        (t.is_time, "TIME(6)"),
        (t.is_duration, "TIME(6)"),
        (t.is_null, "TEXT"),
    ]
    for test, sql_type in simple:
        if test(dtype):
            return sql_type
    if t.is_decimal(dtype):
        if dtype.precision > 65:
            raise ValueError(
                f"field {field.name!r} has {dtype}, more digits than DECIMAL(65) "
                "holds; cast it to a smaller decimal or to a string"
            )
        return f"DECIMAL({dtype.precision}, {dtype.scale})"
    if t.is_timestamp(dtype):
        return "TIMESTAMP(6) NULL" if dtype.tz else "DATETIME(6)"
    if t.is_string(dtype) or t.is_large_string(dtype):
        return "VARCHAR(255)" if key else "LONGTEXT"
    if t.is_binary(dtype) or t.is_large_binary(dtype) or t.is_fixed_size_binary(dtype):
        return "VARBINARY(255)" if key else "LONGBLOB"
    if t.is_nested(dtype):
        return "JSON"
    raise ValueError(
        f"field {field.name!r} has Arrow type {dtype}, which no MariaDB/MySQL "
        "column type holds; cast it first (for example with a `cast` step)"
    )


def python_columns(batch: pa.RecordBatch) -> list[list[Any]]:
    """Return the batch's columns as Python values PyMySQL sends as they are."""
    columns = []
    for column in batch.columns:
        dtype = column.type
        if pa.types.is_dictionary(dtype):
            column = column.cast(dtype.value_type)
            dtype = dtype.value_type
        if pa.types.is_timestamp(dtype) and dtype.tz is not None:
            # The session runs in UTC: send the UTC wall time.
            column = column.cast(pa.timestamp(dtype.unit))
        if pa.types.is_nested(dtype):
            columns.append(
                [
                    None
                    if v is None
                    else json.dumps(v, default=str, ensure_ascii=False)
                    for v in column.to_pylist()
                ]
            )
            continue
        columns.append(column.to_pylist())
    return columns

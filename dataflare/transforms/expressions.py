"""SQL expressions over batches: parsed by Polars, evaluated by Polars or Arrow.

Expressions use SQL syntax (`dep_delay > 15 AND origin = 'JFK'`). Polars
was chosen by measurement (`bench/expression_engines.py`, 10k-row batches,
2-core AMD EPYC): its expressions ran about 9.9 M rows/s and its SQL about
7.2 M rows/s, against about 4.9 M rows/s for DuckDB SQL. Arrow compute ran
23.5 M rows/s but has no expression parser.

Polars parses every expression and stays the reference for its meaning.
`to_arrow_expression` translates the common simple expressions (columns,
integer, text and boolean literals, comparisons, `AND`, `OR`, `NOT`,
`IS [NOT] NULL`, `+`, `-` and `*`) into Arrow compute calls on the batch
itself. Converting a batch to a Polars frame and back costs a few hundred
microseconds per call, even on ten rows, which the Arrow calls avoid.

This module imports Polars only inside the functions that use it. So the
`jsonl` connector, which imports it for `scalar_from_buffers`, does not
load Polars.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from dataflare.plugin.interface import ConfigError, FieldNotFoundError

if TYPE_CHECKING:
    import polars as pl


def parse_expression(text: str, fields: Sequence[str], *, where: str) -> pl.Expr:
    """Parse a SQL expression and check that every field it reads exists.

    Raises:
        ValueError: the expression is not valid SQL.
        FieldNotFoundError: it names a field that is not in `fields`.
    """
    import polars as pl

    try:
        expr = pl.sql_expr(text)
    except Exception as exc:  # polars raises several error types for bad SQL
        raise ValueError(f"invalid SQL expression {text!r} in {where}: {exc}") from exc
    for name in expr.meta.root_names():
        if name not in fields:
            raise FieldNotFoundError(name, list(fields), where=where)
    return expr


def check_expression(text: str, schema: pa.Schema, *, where: str) -> pl.Expr:
    """Parse a SQL expression and type-check it against `schema` on no rows.

    Raises:
        ValueError: invalid SQL, or types that do not fit (comparing a string
            field with a number, for example).
        FieldNotFoundError: the expression names a field `schema` lacks.
    """
    import polars as pl

    expr = parse_expression(text, schema.names, where=where)
    empty = to_polars(empty_batch(schema))
    try:
        empty.select(expr)
    except pl.exceptions.PolarsError as exc:
        types = ", ".join(
            f"{name}: {schema.field(name).type}" for name in expr.meta.root_names()
        )
        first_line = str(exc).splitlines()[0]
        raise ConfigError(
            f"invalid expression {text!r}: {first_line} (field types: "
            f"{types}); cast the field first or declare its type in the source's "
            "schema",
            where=where,
        ) from exc
    return expr


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    """Return a batch with `schema` and no rows.

    Built from `pa.nulls`, because `pa.array`, `pa.scalar` and
    `RecordBatch.from_pylist` import pandas on their first call when it is
    installed (pyarrow 26), which costs about 0.3 s of start-up.
    """
    columns = [pa.nulls(0, field.type) for field in schema]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def to_polars(batch: pa.RecordBatch) -> pl.DataFrame:
    import polars as pl

    df = pl.from_arrow(batch)
    assert isinstance(df, pl.DataFrame)
    return df


def to_batch(df: pl.DataFrame) -> pa.RecordBatch:
    table = df.to_arrow()
    batches = table.combine_chunks().to_batches() if table.num_rows else []
    if batches:
        return batches[0]
    return empty_batch(table.schema)


def output_dtype_schema(schema: pa.Schema, exprs: Sequence[pl.Expr]) -> pa.Schema:
    """Return the schema of `select(exprs)` over `schema`, without data."""
    empty = to_polars(empty_batch(schema))
    return empty.lazy().select(exprs).collect().to_arrow().schema


def polars_dtype(dtype: pa.DataType) -> pl.DataType:
    """Return the Polars type that Polars gives an Arrow column of `dtype`."""
    import polars as pl

    series = pl.from_arrow(pa.nulls(0, dtype))
    assert isinstance(series, pl.Series)
    return series.dtype


# --- Arrow evaluation -------------------------------------------------------


class ArrowFallback(Exception):
    """Arrow compute cannot give Polars' result on this batch.

    Polars compares floats in a total order where NaN equals NaN and is
    greater than every number, and Arrow follows IEEE 754, where every
    comparison with NaN is false. A comparison raises this when a float
    operand contains NaN, so the caller evaluates that batch with Polars.
    """


@dataclass(frozen=True)
class ArrowExpression:
    """A Polars expression translated to Arrow compute calls for one schema.

    `evaluate(batch)` takes a batch with the schema given to
    `to_arrow_expression` and returns the values, nulls and type that Polars
    gives, or raises `ArrowFallback`.
    """

    type: pa.DataType
    evaluate: Callable[[pa.RecordBatch], pa.Array]


def to_arrow_expression(expr: pl.Expr, schema: pa.Schema) -> ArrowExpression | None:
    """Translate `expr` into Arrow compute calls over batches with `schema`.

    Returns None when the expression uses something the translation does
    not cover (other functions, casts that change the type, division,
    decimal literals, operands of different types), or when its result type
    differs from the type Polars gives. Integer arithmetic wraps around on
    overflow, as in Polars.
    """
    tree = arrow_tree(expr, schema)
    return None if tree is None else from_tree(tree, schema)


def arrow_tree(expr: pl.Expr, schema: pa.Schema) -> Any | None:
    """Return the tree of `expr` if `to_arrow_expression` translates it.

    The tree is the JSON form of Polars' serialized expression, which
    `from_tree` translates without Polars.
    """
    import polars as pl

    try:
        tree = json.loads(expr.meta.serialize(format="json"))
        node = _translate(tree, schema)
        if not isinstance(node, _Values) or not _same_type(expr, node, schema):
            return None
    except (_Untranslatable, pl.exceptions.PolarsError, *_TRANSLATION_ERRORS):
        return None
    return tree


def from_tree(tree: Any, schema: pa.Schema) -> ArrowExpression | None:
    """Translate a tree that `arrow_tree` returned for `schema`."""
    try:
        node = _translate(tree, schema)
    except (_Untranslatable, *_TRANSLATION_ERRORS):
        return None
    if not isinstance(node, _Values):
        return None
    return ArrowExpression(node.type, node.evaluate)


_TRANSLATION_ERRORS = (
    pa.ArrowException,
    ValueError,
    LookupError,  # a tree laid out unlike those of Polars 2.1
    TypeError,
)

_Evaluate = Callable[[pa.RecordBatch], Any]


class _Untranslatable(Exception):
    """The expression tree has a node that the translation does not cover."""


@dataclass(frozen=True)
class _Values:
    """A translated node that gives an array of one type per batch."""

    type: pa.DataType
    evaluate: _Evaluate


@dataclass(frozen=True)
class _Literal:
    """A literal whose Arrow type depends on the other operand, as in Polars."""

    value: int | str | bool


_SIGNED = {pa.int8(), pa.int16(), pa.int32(), pa.int64()}
_UNSIGNED = {pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()}
_FLOATS = {pa.float32(), pa.float64()}
_NUMBERS = _SIGNED | _UNSIGNED | _FLOATS
_TEXT = {pa.string(), pa.large_string(), pa.string_view()}
_COMPARABLE = _NUMBERS | _TEXT | {pa.bool_()}
# Types that come back from a Polars frame with the same values, so that a
# column passed through unchanged equals what the Polars path outputs.
_PASS_THROUGH = _COMPARABLE | {pa.binary(), pa.large_binary(), pa.date32()}
# Codes of the `struct` module for one value of each number type.
_STRUCT_CODES = {
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
# The largest integer that each float type represents exactly.
_EXACT_FLOAT_INT = {pa.float32(): 2**24, pa.float64(): 2**53}

_COMPARISONS = {
    "Eq": "equal",
    "Lt": "less",
    "LtEq": "less_equal",
    "Gt": "greater",
    "GtEq": "greater_equal",
}
# Arrow's unchecked kernels wrap around on integer overflow, as Polars does.
_ARITHMETIC = {"Plus": "add", "Minus": "subtract"}
_SQL_ARITHMETIC = {"Mul": "multiply"}  # Polars SQL's own `*` function
_LOGICAL = {"And": "and_kleene", "Or": "or_kleene"}
_POLARS_NAMES = {
    **{t: str(t).capitalize() for t in _SIGNED},  # int8 -> Int8
    **{t: "UInt" + str(t)[4:] for t in _UNSIGNED},  # uint8 -> UInt8
    pa.float32(): "Float32",
    pa.float64(): "Float64",
    pa.bool_(): "Boolean",
    **{t: "String" for t in _TEXT},
}


def _translate(node: Any, schema: pa.Schema) -> _Values | _Literal:
    if not isinstance(node, dict) or len(node) != 1:
        raise _Untranslatable(node)
    [(kind, body)] = node.items()
    if kind == "Column":
        return _column(body, schema)
    if kind == "Literal":
        return _literal(body)
    if kind == "Alias":
        return _translate(body[0], schema)
    if kind == "Cast":
        return _cast(body, schema)
    if kind == "BinaryExpr":
        left = _translate(body["left"], schema)
        right = _translate(body["right"], schema)
        return _binary(body["op"], left, right)
    if kind == "Function":
        inputs = [_translate(item, schema) for item in body["input"]]
        return _function(body["function"], inputs)
    raise _Untranslatable(kind)


def _column(name: Any, schema: pa.Schema) -> _Values:
    index = schema.get_field_index(name) if isinstance(name, str) else -1
    if index < 0:  # missing, or several fields with this name
        raise _Untranslatable(name)
    dtype = schema.field(index).type
    is_timestamp = pa.types.is_timestamp(dtype) and dtype.unit != "s"
    if dtype not in _PASS_THROUGH and not is_timestamp:
        raise _Untranslatable(dtype)
    return _Values(dtype, lambda batch: batch.column(index))


def _literal(body: Any) -> _Literal:
    match body:
        case {"Dyn": {"Int": int(value)}}:
            return _Literal(value)
        case {"Scalar": {"String": str(value)}}:
            return _Literal(value)
        case {"Scalar": {"Boolean": bool(value)}}:
            return _Literal(value)
    raise _Untranslatable(body)


def _cast(body: Any, schema: pa.Schema) -> _Values:
    """Translate a strict cast to the type the value already has (a no-op)."""
    inner = _translate(body["expr"], schema)
    target = body["dtype"]
    if not isinstance(inner, _Values) or body["options"] != "Strict":
        raise _Untranslatable(body)
    if target != {"Literal": _POLARS_NAMES.get(inner.type)}:
        raise _Untranslatable(target)
    return inner


def _function(function: Any, inputs: list[_Values | _Literal]) -> _Values:
    match function, inputs:
        case {"Boolean": "IsNull"}, [_Values() as values]:
            return _unary("is_null", values, pa.bool_())
        case {"Boolean": "IsNotNull"}, [_Values() as values]:
            return _unary("is_valid", values, pa.bool_())
        case {"Boolean": "Not"}, [_Values() as values] if values.type == pa.bool_():
            return _unary("invert", values, pa.bool_())
        case {"Sql": {"Binary": str(name)}}, [left, right] if name in _SQL_ARITHMETIC:
            return _arithmetic(_SQL_ARITHMETIC[name], left, right)
    raise _Untranslatable(function)


def _binary(op: Any, left: _Values | _Literal, right: _Values | _Literal) -> _Values:
    if op in _COMPARISONS:
        return _compare(_COMPARISONS[op], left, right)
    if op in _ARITHMETIC:
        return _arithmetic(_ARITHMETIC[op], left, right)
    if op in _LOGICAL:
        if not all(
            isinstance(v, _Values) and v.type == pa.bool_() for v in (left, right)
        ):
            raise _Untranslatable(op)
        return _call(_LOGICAL[op], left, right, pa.bool_())
    raise _Untranslatable(op)


def _compare(name: str, left: _Values | _Literal, right: _Values | _Literal) -> _Values:
    dtype = _operand_type(left, right)
    if dtype not in _COMPARABLE:
        raise _Untranslatable(dtype)
    return _call(name, left, right, pa.bool_(), check_nan=dtype in _FLOATS)


def _arithmetic(
    name: str, left: _Values | _Literal, right: _Values | _Literal
) -> _Values:
    dtype = _operand_type(left, right)
    if dtype not in _NUMBERS:
        raise _Untranslatable(dtype)
    return _call(name, left, right, dtype)


def _operand_type(left: _Values | _Literal, right: _Values | _Literal) -> pa.DataType:
    """Return the one type both operands have; a literal takes the other's type."""
    if isinstance(left, _Values) and isinstance(right, _Values):
        if left.type != right.type:
            raise _Untranslatable((left.type, right.type))
        return left.type
    if isinstance(left, _Values):
        return left.type
    if isinstance(right, _Values):
        return right.type
    raise _Untranslatable("two literals")


def _scalar(literal: _Literal, dtype: pa.DataType) -> pa.Scalar:
    """Return `literal` as a scalar of `dtype`, as Polars types it next to `dtype`.

    Polars gives an integer literal the other operand's type when the value
    fits and a wider type otherwise, so only values that fit are translated.
    """
    value: float | str = literal.value
    if isinstance(value, bool):
        fits = dtype == pa.bool_()
    elif isinstance(value, str):
        fits = dtype in _TEXT
    elif dtype in _FLOATS:
        fits = abs(value) <= _EXACT_FLOAT_INT[dtype]
        value = float(value)
    elif dtype in _SIGNED:
        fits = -(2 ** (dtype.bit_width - 1)) <= value < 2 ** (dtype.bit_width - 1)
    else:
        fits = dtype in _UNSIGNED and 0 <= value < 2**dtype.bit_width
    if not fits:
        raise _Untranslatable((value, dtype))
    return scalar_from_buffers(value, dtype)


def scalar_from_buffers(value: float | str, dtype: pa.DataType) -> pa.Scalar:
    """Build a scalar of a fixed-width or text type from its Arrow buffers.

    `pa.scalar` and `pa.array` import pandas on their first call when it is
    installed (pyarrow 26), which would add about 0.3 s to the first batch.
    """
    if isinstance(value, str):
        data = value.encode()
        large = dtype == pa.large_string()
        offsets = struct.pack("=qq" if large else "=ii", 0, len(data))
        buffers = [None, pa.py_buffer(offsets), pa.py_buffer(data)]
        text = pa.Array.from_buffers(
            pa.large_string() if large else pa.string(), 1, buffers
        )
        return text.cast(dtype)[0]  # string_view is built from string
    if isinstance(value, bool):
        data = bytes([value])  # the values bitmap, whose bit 0 is the value
    else:
        data = struct.pack("=" + _STRUCT_CODES[dtype], value)
    return pa.Array.from_buffers(dtype, 1, [None, pa.py_buffer(data)])[0]


def _unary(name: str, values: _Values, dtype: pa.DataType) -> _Values:
    function = pc.get_function(name)
    evaluate = values.evaluate
    return _Values(dtype, lambda batch: function.call([evaluate(batch)]))


def _call(
    name: str,
    left: _Values | _Literal,
    right: _Values | _Literal,
    dtype: pa.DataType,
    *,
    check_nan: bool = False,
) -> _Values:
    """Build a node that calls Arrow function `name` on the two operands."""
    operand_type = _operand_type(left, right)
    operands = [
        _constant(_scalar(v, operand_type)) if isinstance(v, _Literal) else v.evaluate
        for v in (left, right)
    ]
    first, second = operands
    function = pc.get_function(name)

    def evaluate(batch: pa.RecordBatch) -> Any:
        a, b = first(batch), second(batch)
        if check_nan:
            _raise_on_nan(a)
            _raise_on_nan(b)
        return function.call([a, b])

    return _Values(dtype, evaluate)


def _constant(value: pa.Scalar) -> _Evaluate:
    return lambda batch: value


def _raise_on_nan(values: Any) -> None:
    if isinstance(values, pa.Array) and pc.is_nan(values).true_count:
        raise ArrowFallback("NaN in a float comparison")


def _same_type(expr: pl.Expr, node: _Values, schema: pa.Schema) -> bool:
    """Check on no rows that Arrow gives the type that Polars gives."""
    import polars as pl

    empty = empty_batch(schema)
    result = pl.from_arrow(node.evaluate(empty))
    assert isinstance(result, pl.Series)
    expected = to_polars(empty).select(expr).to_series().dtype
    return result.dtype == expected and polars_dtype(node.type) == expected

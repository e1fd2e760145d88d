"""SQL expressions over batches, evaluated by Polars.

Expressions use SQL syntax (`dep_delay > 15 AND origin = 'JFK'`). Polars
was chosen by measurement (`bench/expression_engines.py`, 10k-row batches,
2-core AMD EPYC): its expressions ran about 9.9 M rows/s and its SQL about
7.2 M rows/s, against about 4.9 M rows/s for DuckDB SQL. Arrow compute ran
23.5 M rows/s but has no expression parser. Polars converts Arrow batches
without copying them.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import pyarrow as pa

from dataflare.plugin.interface import ConfigError, FieldNotFoundError


def parse_expression(text: str, fields: Sequence[str], *, where: str) -> pl.Expr:
    """Parse a SQL expression and check that every field it reads exists.

    Raises:
        ValueError: the expression is not valid SQL.
        FieldNotFoundError: it names a field that is not in `fields`.
    """
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
    expr = parse_expression(text, schema.names, where=where)
    empty = pl.from_arrow(pa.RecordBatch.from_pylist([], schema=schema))
    assert isinstance(empty, pl.DataFrame)
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


def to_polars(batch: pa.RecordBatch) -> pl.DataFrame:
    df = pl.from_arrow(batch)
    assert isinstance(df, pl.DataFrame)
    return df


def to_batch(df: pl.DataFrame) -> pa.RecordBatch:
    table = df.to_arrow()
    batches = table.combine_chunks().to_batches() if table.num_rows else []
    if batches:
        return batches[0]
    return pa.RecordBatch.from_pylist([], schema=table.schema)


def output_dtype_schema(schema: pa.Schema, exprs: Sequence[pl.Expr]) -> pa.Schema:
    """Return the schema of `select(exprs)` over `schema`, without data."""
    empty = pl.from_arrow(schema.empty_table())
    assert isinstance(empty, pl.DataFrame)
    return empty.lazy().select(exprs).collect().to_arrow().schema

"""`sql`: run a SQL query over each batch, with Polars SQL.

Example::

    transformations:
      speeds:
        type: sql
        inputs: [flights]
        config:
          query: |
            SELECT carrier, flight, distance / (air_time / 60.0) AS mph, _event_time
            FROM input
            WHERE air_time > 0

The query reads the batch as the table `input` (set `table` to use another
name) and runs on Polars' SQL engine (`polars.SQLContext`), so the SQL
dialect and functions are those of Polars SQL.

The query reads one batch at a time. Aggregates, `GROUP BY`, `ORDER BY`,
`DISTINCT`, `LIMIT` and window functions therefore work per batch, and how
records fall into batches depends on the source and the engine. Use the
`aggregate` transformation for results over the whole stream and the
`window` transformation for results per event-time window. An empty batch
gives no output.

The reserved `_event_time` column is kept only if the query selects it
(`SELECT *` does). Time-based steps after this one need it.

The query runs on an empty table with the input's schema before the
pipeline starts: that finds SQL errors and misspelt fields, and gives the
output schema. When the query fails on a batch at run time (for example a
strict `CAST` of a value that does not convert), every record of that batch
goes to the dead-letter output with the error as the reason, good records
included; `TRY_CAST` gives null in place of such values instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import polars as pl
import pyarrow as pa
from pydantic import Field

from dataflare.plugin.interface import (
    ConfigError,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.transforms.expressions import to_polars

_MISSING_COLUMN = re.compile(r'unable to find column "([^"]+)"')


class SqlConfig(PluginConfig):
    query: str = Field(
        min_length=1, description="SQL SELECT statement over the table `table`"
    )
    table: str = Field(
        "input",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name under which the query reads the batch",
    )


class SqlTransform(Transform[SqlConfig]):
    """Run a SQL query over each batch."""

    metadata = PluginMetadata(
        "sql", PluginKind.PROCESSOR, "Run a SQL query over each batch"
    )
    Config = SqlConfig

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        empty = to_polars(pa.RecordBatch.from_pylist([], schema=schema))
        try:
            result = self._run(empty)
        except pl.exceptions.ColumnNotFoundError as exc:
            match = _MISSING_COLUMN.search(str(exc))
            if match:
                raise FieldNotFoundError(
                    match.group(1), schema.names, where="query"
                ) from None
            raise ConfigError(
                f"invalid SQL query: {_first_line(exc)}", where="query"
            ) from None
        except pl.exceptions.PolarsError as exc:
            raise ConfigError(
                f"invalid SQL query: {_first_line(exc)}; the query reads the "
                f"batch as table {self.config.table!r}",
                where="query",
            ) from None
        first_word = self.config.query.lstrip(" (\n\t").split(None, 1)[:1]
        if not first_word or first_word[0].upper() not in ("SELECT", "WITH"):
            raise ConfigError(
                "query must be a SELECT statement (or WITH ... SELECT); "
                f"got {self.config.query[:40]!r}",
                where="query",
            )
        return _arrow_schema(result, schema)

    def open(self) -> None:
        self._schemas: dict[pa.Schema, pa.Schema] = {}

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if batch.num_rows == 0:
            return []
        schema = self._schemas.get(batch.schema)
        if schema is None:
            schema = self._schemas[batch.schema] = self.output_schema([batch.schema])
        try:
            result = self._run(to_polars(batch))
        except pl.exceptions.PolarsError as exc:
            self.context.reject(
                batch,
                f"SQL query failed on the batch with this record: "
                f"{_first_line(exc)}; fix the query (TRY_CAST gives null for "
                "values that do not convert) or the input",
            )
            return []
        table = result.to_arrow().cast(schema).combine_chunks()
        return [part for part in table.to_batches() if part.num_rows]

    def _run(self, frame: pl.DataFrame) -> pl.DataFrame:
        context = pl.SQLContext({self.config.table: frame})
        return context.execute(self.config.query, eager=True)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _arrow_schema(result: pl.DataFrame, inputs: pa.Schema) -> pa.Schema:
    """Return the Arrow schema of a query result.

    A column with the name and Polars type of an input field keeps that
    field's Arrow type. Other columns get standard Arrow types, because
    Polars exports strings and lists as `large_string` and `large_list`.
    """
    fields = []
    for field in result.to_arrow().schema:
        source = inputs.field(field.name) if field.name in inputs.names else None
        if source is not None and _same_polars_type(source.type, result[field.name]):
            fields.append(field.with_type(source.type))
        else:
            fields.append(field.with_type(_standard_type(field.type)))
    return pa.schema(fields)


def _same_polars_type(dtype: pa.DataType, column: pl.Series) -> bool:
    empty = pl.from_arrow(pa.array([], type=dtype))
    assert isinstance(empty, pl.Series)
    return empty.dtype == column.dtype


def _standard_type(dtype: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.string()
    if pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return pa.binary()
    if pa.types.is_large_list(dtype) or pa.types.is_list(dtype):
        item = dtype.value_field
        return pa.list_(item.with_type(_standard_type(item.type)))
    if pa.types.is_struct(dtype):
        return pa.struct([f.with_type(_standard_type(f.type)) for f in dtype])
    return dtype

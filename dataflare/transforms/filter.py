"""`filter`: keep the records for which a SQL condition is true.

Example::

    transformations:
      delayed:
        type: filter
        inputs: [flights]
        config: {condition: "dep_time IS NOT NULL AND dep_delay > 15"}

A record whose condition is null (for example `dep_delay > 15` with an
empty `dep_delay`) is dropped like a false one, as in SQL's WHERE. Dropped
records are counted as `filtered` in the run summary.

Polars parses the condition. Conditions that `to_arrow_expression`
translates (comparisons, `AND`, `OR`, `NOT`, `IS NULL`, `+`, `-`, `*` over
fields and literals) are evaluated with Arrow compute on the batch, with the
same result. Other conditions, and batches where a compared float
contains NaN, are evaluated by Polars. What Polars found is kept in the
plan cache (`plan_cache`), so a later run with the same condition and
input starts without loading Polars.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import Field

from dataflare.plugin.interface import (
    ConfigError,
    OperatorContext,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.transforms import plan_cache
from dataflare.transforms.expressions import (
    ArrowExpression,
    ArrowFallback,
    arrow_tree,
    check_expression,
    empty_batch,
    from_tree,
    parse_expression,
    to_polars,
)

if TYPE_CHECKING:
    import polars as pl

_MASK = "__condition"
_SLICE_ROWS = 16
"""Batches up to this many rows whose kept rows are adjacent are sliced, not
filtered. A slice costs about 0.3 us and Arrow's filter about 5 us whatever
the size, so the filter is most of the step's cost on the few-row batches of
a low-latency stream (2-core AMD EPYC, pyarrow 26)."""


_VIEW_TYPES = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}
"""View types that Arrow's filter has no kernel for (pyarrow 26), each with
the type whose kernel filters it instead."""


def _filter_views(batch: pa.RecordBatch, mask: pa.BooleanArray) -> pa.RecordBatch:
    """Return the rows of `batch` where `mask` is true, view columns included."""
    columns = []
    for field, column in zip(batch.schema, batch.columns, strict=True):
        other = _VIEW_TYPES.get(field.type)
        if other is None:
            columns.append(column.filter(mask))
        else:
            columns.append(column.cast(other).filter(mask).cast(field.type))
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


class FilterConfig(PluginConfig):
    condition: str = Field(
        min_length=1, description="SQL condition, e.g. 'dep_delay > 15'"
    )


class FilterTransform(Transform[FilterConfig]):
    """Keep records matching a SQL condition."""

    metadata = PluginMetadata(
        "filter", PluginKind.FILTER, "Keep records matching a SQL condition"
    )
    Config = FilterConfig
    input_count = None  # several inputs with one schema are merged

    def __init__(self, config: FilterConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._entries: dict[pa.Schema, dict[str, Any]] = {}

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        for other in inputs[1:]:
            if not other.equals(inputs[0]):
                raise ValueError(
                    "all inputs of a filter must have the same fields and types; "
                    f"got {inputs[0].names} and {other.names}"
                )
        self._cached(inputs[0])
        return inputs[0]

    def _cached(self, schema: pa.Schema) -> dict[str, Any]:
        """Check the condition on `schema`, or read the check from the cache.

        Returns the entry: `tree` is the condition's tree for Arrow, or None.
        """
        entry = self._entries.get(schema)
        if entry is None:
            entry = plan_cache.load("filter", self.config.condition, schema)
        if entry is None:
            entry = self._check(schema)
            plan_cache.store("filter", self.config.condition, schema, entry)
        self._entries[schema] = entry
        return entry

    def _check(self, schema: pa.Schema) -> dict[str, Any]:
        import polars as pl

        expr = check_expression(self.config.condition, schema, where="condition")
        empty = to_polars(empty_batch(schema))
        dtype = empty.select(expr.alias("condition")).schema["condition"]
        if dtype not in (pl.Boolean, pl.Null):
            raise ConfigError(
                f"condition {self.config.condition!r} gives {dtype}, not true or "
                "false; write a comparison such as 'age >= 18'",
                where="condition",
            )
        tree = arrow_tree(expr, schema)
        if tree is not None:
            arrow = from_tree(tree, schema)
            if arrow is None or arrow.type != pa.bool_():
                tree = None
        return {"tree": tree}

    def open(self) -> None:
        self._expr: pl.Expr | None = None
        self._schema: pa.Schema | None = None
        self._views = False  # whether the schema has `_VIEW_TYPES` fields
        self._arrow: ArrowExpression | None = None

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        mask = self._mask(batch)
        kept_rows = mask.true_count  # nulls are not counted, so they drop
        self.context.count("filtered", batch.num_rows - kept_rows)
        if kept_rows == batch.num_rows:
            return [batch] if kept_rows else []
        if not kept_rows:
            return []
        if batch.num_rows <= _SLICE_ROWS:
            flags = mask.to_pylist()  # None (a null condition) drops the row
            first = flags.index(True)
            if all(flags[first : first + kept_rows]):  # the kept rows are adjacent
                return [batch.slice(first, kept_rows)]
        if self._views:
            return [_filter_views(batch, mask)]
        return [batch.filter(mask)]

    def _mask(self, batch: pa.RecordBatch) -> pa.BooleanArray:
        """Evaluate the condition with Arrow compute, or with Polars where needed."""
        if self._schema is None or not batch.schema.equals(self._schema):
            self._prepare(batch.schema)
        if self._arrow is not None:
            try:
                return self._arrow.evaluate(batch)
            except (ArrowFallback, pa.ArrowException):
                pass  # Polars gives the result, or the error, below
        if self._expr is None:
            self._expr = parse_expression(
                self.config.condition, batch.schema.names, where="condition"
            )
        # with_columns repeats a constant condition (`FALSE`) on every row
        condition = self._expr.fill_null(False).alias(_MASK)
        frame = to_polars(batch).with_columns(condition)
        return frame.get_column(_MASK).to_arrow()

    def _prepare(self, schema: pa.Schema) -> None:
        tree = self._cached(schema)["tree"]
        arrow = None if tree is None else from_tree(tree, schema)
        self._arrow = arrow if arrow is not None and arrow.type == pa.bool_() else None
        self._schema = schema
        self._views = any(field.type in _VIEW_TYPES for field in schema)

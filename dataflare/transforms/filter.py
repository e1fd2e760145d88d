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
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import pyarrow as pa
from pydantic import Field

from dataflare.plugin.interface import (
    ConfigError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.transforms.expressions import (
    check_expression,
    parse_expression,
    to_polars,
)


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

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        for other in inputs[1:]:
            if not other.equals(inputs[0]):
                raise ValueError(
                    "all inputs of a filter must have the same fields and types; "
                    f"got {inputs[0].names} and {other.names}"
                )
        expr = check_expression(self.config.condition, inputs[0], where="condition")
        empty = to_polars(pa.RecordBatch.from_pylist([], schema=inputs[0]))
        dtype = empty.select(expr.alias("condition")).schema["condition"]
        if dtype not in (pl.Boolean, pl.Null):
            raise ConfigError(
                f"condition {self.config.condition!r} gives {dtype}, not true or "
                "false; write a comparison such as 'age >= 18'",
                where="condition",
            )
        return inputs[0]

    def open(self) -> None:
        self._expr: pl.Expr | None = None

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if self._expr is None:
            self._expr = parse_expression(
                self.config.condition, batch.schema.names, where="condition"
            )
        expr = self._expr
        assert expr is not None
        mask = to_polars(batch).select(expr.fill_null(False)).to_series()
        kept = batch.filter(mask.to_arrow())
        self.context.count("filtered", batch.num_rows - kept.num_rows)
        return [kept] if kept.num_rows else []

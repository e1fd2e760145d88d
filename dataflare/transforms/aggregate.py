"""`aggregate`: keyed running aggregations over the whole stream.

Example, delay statistics per carrier::

    transformations:
      per_carrier:
        type: aggregate
        inputs: [flights]
        config:
          group_by: [carrier]
          aggregations:
            flights: {fn: count}
            delayed: {fn: count, field: dep_delay}
            total_delay: {fn: sum, field: dep_delay}
            mean_delay: {fn: mean, field: dep_delay}
            worst: {fn: max, field: dep_delay}
            routes: {fn: count_distinct, field: dest}
            p90_delay: {fn: percentile, field: dep_delay, q: 0.9}
          emit_every: 100000      # optional: also emit updates

Functions, with SQL semantics for nulls:

- `count` without `field` counts records; with `field`, non-null values;
- `sum`, `min`, `max`, `mean` ignore nulls and give null for a group with
  no values; `sum` of integers is `int64`, `mean` is `float64`;
- `count_distinct` counts distinct non-null values;
- `percentile` is the `q` quantile (0 to 1) with linear interpolation
  between values, as numpy's and pandas' default.

Records with null keys form their own group, as in SQL's `GROUP BY`.
Without `group_by`, all records form one group, and a stream with no
records gives one row (count 0, other results null), as in SQL.

Results are emitted at the end of the input, one row per group with the
group's fields and one field per aggregation, so this step suits bounded
inputs. Each instance emits its groups in the order of their first
record. With `emit_every: N`, the groups that changed are also emitted
each time at least N more records have arrived. Each such row replaces
earlier rows of its group, and the rows emitted at the end are the final
results. Output records have no `_event_time`.

`count`, `sum`, `min`, `max` and `mean` keep a few numbers per group.
`count_distinct` keeps every distinct value of each group and `percentile`
keeps every value, so their memory grows with the input. All of it is keyed
state in the pipeline's state backend (in memory, or on disk with
`checkpointing.state_backend: disk`), saved in checkpoints.

With `parallelism` above 1, records are partitioned by `group_by`, so each
instance owns whole groups. An aggregation without `group_by` runs as one
instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from dataflare.plugin.interface import (
    ConfigError,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.state.keyed import (
    BYTES,
    FLOAT64,
    JSON,
    KeyedStateStore,
    RowCodec,
    encode_keys,
    from_physical,
    physical,
    row_kinds,
)
from dataflare.transforms.cast import type_kind
from dataflare.transforms.expressions import to_polars

AggregateFunction = Literal[
    "count", "sum", "min", "max", "mean", "count_distinct", "percentile"
]
NUMERIC_FUNCTIONS = ("sum", "mean", "percentile")
ORDERED_KINDS = ("integer", "float", "string", "bool", "timestamp", "date")
_GROUP = "__group"  # constant key when there is no group_by
_ROWS = "__rows"  # records per group, so that every group has a state row
_SEQ = "__seq"  # number of the group's first record, for the output order
_KEY = "__key"  # encoded group key
_META = b"meta"  # key of the operator's counters in the `meta` state


class Aggregation(PluginConfig):
    fn: AggregateFunction
    field: str | None = Field(
        None, description="Field to aggregate; count may omit it to count records"
    )
    q: float | None = Field(
        None, ge=0, le=1, description="Quantile for percentile, e.g. 0.9"
    )

    @model_validator(mode="after")
    def _needs(self) -> Aggregation:
        if self.fn != "count" and self.field is None:
            raise ValueError(f"aggregation {self.fn!r} needs 'field'")
        if self.fn == "percentile" and self.q is None:
            raise ValueError("percentile needs 'q', a quantile between 0 and 1")
        if self.fn != "percentile" and self.q is not None:
            raise ValueError(f"'q' applies only to percentile, not to {self.fn!r}")
        return self


class AggregateConfig(PluginConfig):
    group_by: list[str] = Field(
        default_factory=list,
        description="Fields that key the groups; empty for one group of all records",
    )
    aggregations: dict[str, Aggregation] = Field(
        min_length=1, description="Output field name and aggregation"
    )
    emit_every: int | None = Field(
        None,
        ge=1,
        description="Also emit the changed groups after every N input records",
    )

    @field_validator("group_by")
    @classmethod
    def _distinct(cls, group_by: list[str]) -> list[str]:
        if len(set(group_by)) != len(group_by):
            raise ValueError("group_by lists a field more than once; list each once")
        return group_by

    @model_validator(mode="after")
    def _names_distinct(self) -> AggregateConfig:
        for name in self.aggregations:
            if name in self.group_by:
                raise ValueError(
                    f"aggregation {name!r} has the name of a group_by field; "
                    "choose another output name"
                )
        return self


class AggregateTransform(Transform[AggregateConfig]):
    """Aggregate the whole stream per group; emit results at the end."""

    metadata = PluginMetadata(
        "aggregate", PluginKind.AGGREGATE, "Keyed running aggregations"
    )
    Config = AggregateConfig
    stateful = True

    # Output schema: from `output_schema` when the engine calls it on this
    # instance, else from the first batch.
    _schema: pa.Schema | None = None

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        fields = []
        for name in self.config.group_by:
            if name not in schema.names:
                raise FieldNotFoundError(name, schema.names, where="group_by")
            fields.append(schema.field(name))
        for name, aggregation in self.config.aggregations.items():
            fields.append(pa.field(name, _result_type(name, aggregation, schema)))
        self._schema = pa.schema(fields)
        self._input_schema = schema
        return self._schema

    def partition_key(self) -> list[str] | None:
        return list(self.config.group_by) or None

    def open(self) -> None:
        if self.context.parallelism > 1 and not self.config.group_by:
            raise ValueError(
                f"aggregate step {self.context.step!r} has no group_by, so it must "
                f"run as one instance, not {self.context.parallelism}; set "
                "parallelism: 1 or add group_by"
            )
        self._keys = list(self.config.group_by) or [_GROUP]
        self._store = KeyedStateStore.for_operator(self.context)
        # Group keys of the groups changed since the last `emit_every` output.
        self._changed = self._store.value_state("changed", BYTES)
        # Counters: next group number and records since the last output.
        self._meta = self._store.value_state("meta", JSON)
        self._layout: _Layout | None = None

    def close(self) -> None:
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()

    def snapshot_state(self) -> bytes | None:
        return self._store.snapshot()

    def restore_state(self, state: bytes) -> None:
        self._store.restore(state)

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if self._schema is None:
            self.output_schema([batch.schema])
        if batch.num_rows == 0:
            return []
        frame = self._keyed(to_polars(batch))
        meta = self._meta.get(_META) or {"next_group": 0, "since_emit": 0}
        changed = self._update_state(frame, meta)
        self._keep_values(frame)
        if self.config.emit_every is None:
            self._meta.put(_META, meta)
            return []
        self._changed.put_many((key, b"") for key in changed)
        meta["since_emit"] += batch.num_rows
        if meta["since_emit"] < self.config.emit_every:
            self._meta.put(_META, meta)
            return []
        meta["since_emit"] = 0
        self._meta.put(_META, meta)
        keys = [key for key, _ in self._changed.items()]
        self._changed.delete_many(keys)
        return self._emit(keys)

    def finish(self) -> list[pa.RecordBatch]:
        if self._schema is None:
            # NOTE: no batch arrived and the engine did not call output_schema
            # on this instance, so the empty global row cannot be typed and a
            # run without records gives no row at all.
            return []
        return self._emit(None)

    def _keyed(self, frame: pl.DataFrame) -> pl.DataFrame:
        if self.config.group_by:
            return frame
        return frame.with_columns(pl.lit(0, dtype=pl.Int8).alias(_GROUP))

    # --- state -------------------------------------------------------------

    def _state_exprs(self) -> tuple[list[pl.Expr], list[pl.Expr]]:
        """Return the partial expressions of a batch and those merging partials."""
        assert self._schema is not None
        partial_exprs = [pl.len().cast(pl.Int64).alias(_ROWS)]
        merge_exprs = [pl.col(_ROWS).sum(), pl.col(_SEQ).min()]
        for name, aggregation in self.config.aggregations.items():
            result_type = self._schema.field(name).type
            partial, merge = _state_exprs(name, aggregation, result_type)
            partial_exprs.extend(partial)
            merge_exprs.extend(merge)
        return partial_exprs, merge_exprs

    def _accumulators(self) -> _Layout:
        """Return the layout of the per-group state rows, made on first use."""
        if self._layout is None:
            assert self._schema is not None
            empty = pl.from_arrow(self._input_schema.empty_table())
            assert isinstance(empty, pl.DataFrame)
            partial_exprs, _ = self._state_exprs()
            rows = self._keyed(empty).group_by(self._keys).agg(partial_exprs)
            rows = rows.with_columns(pl.lit(0, pl.Int64).alias(_SEQ))
            self._layout = _Layout(self._store, rows.schema, physical(rows).schema)
        return self._layout

    def _update_state(self, frame: pl.DataFrame, meta: dict[str, int]) -> list[bytes]:
        """Merge this batch's partial aggregates into the state; return its keys."""
        layout = self._accumulators()
        partial_exprs, merge_exprs = self._state_exprs()
        partial = frame.group_by(self._keys, maintain_order=True).agg(partial_exprs)
        partial = partial.with_columns(
            (pl.int_range(pl.len(), dtype=pl.Int64) + meta["next_group"]).alias(_SEQ)
        )
        meta["next_group"] += partial.height
        partial = physical(partial.select(layout.logical.names()))
        keys = encode_keys(partial, self._keys)
        earlier = [row for row in layout.state.get_encoded(keys) if row is not None]
        if earlier:
            known = layout.codec.decode_frame(earlier, layout.physical)
            both = pl.concat([known, partial])
            merged = both.group_by(self._keys, maintain_order=True).agg(merge_exprs)
            partial = merged.select(layout.physical.names())
            keys = encode_keys(partial, self._keys)
        rows = layout.codec.encode_frame(partial)
        layout.state.put_encoded(zip(keys, rows, strict=True))
        return keys

    def _keep_values(self, frame: pl.DataFrame) -> None:
        """Keep the values that count_distinct and percentile need at the end."""
        for name, aggregation in self.config.aggregations.items():
            if aggregation.fn not in ("count_distinct", "percentile"):
                continue
            assert aggregation.field is not None
            values = frame.select([*self._keys, pl.col(aggregation.field).alias(name)])
            values = values.drop_nulls(name)
            if not values.height:
                continue
            if aggregation.fn == "count_distinct":
                values = physical(values.unique(maintain_order=True))
                codec = RowCodec(row_kinds(values.select(name).schema))
                distinct = self._store.map_state(f"distinct:{name}", codec, BYTES)
                keys = encode_keys(values, self._keys)
                distinct.put_many(
                    (key, (value,), b"")
                    for key, value in zip(keys, values[name].to_list(), strict=True)
                )
                continue
            lists = values.group_by(self._keys, maintain_order=True).agg(
                pl.col(name).cast(pl.Float64)
            )
            keys = encode_keys(lists, self._keys)
            numbers = self._store.list_state(f"values:{name}", FLOAT64)
            numbers.add_many(list(zip(keys, lists[name].to_list(), strict=True)))

    # --- results -----------------------------------------------------------

    def _emit(self, changed: list[bytes] | None) -> list[pa.RecordBatch]:
        """Return the results of the `changed` groups, or of all groups."""
        assert self._schema is not None
        results = self._results(changed)
        if not self.config.group_by:
            results = results.drop(_GROUP)
        table = results.select(self._schema.names).to_arrow().cast(self._schema)
        return [part for part in table.combine_chunks().to_batches() if part.num_rows]

    def _group_rows(
        self, changed: list[bytes] | None
    ) -> tuple[list[bytes], list[bytes]]:
        """Return the keys and encoded state rows of the `changed` groups, or all."""
        layout = self._accumulators()
        if changed is None:
            pairs = list(layout.state.items_encoded())
        else:
            found = layout.state.get_encoded(changed)
            pairs = [(k, row) for k, row in zip(changed, found, strict=True) if row]
        return [key for key, _ in pairs], [row for _, row in pairs]

    def _results(self, changed: list[bytes] | None) -> pl.DataFrame:
        layout = self._accumulators()
        keys, rows = self._group_rows(changed)
        if not rows and changed is None:
            return self._empty_results()

        state = layout.codec.decode_frame(rows, layout.physical)
        state = from_physical(state, layout.logical)
        state = state.with_columns(pl.Series(_KEY, keys, dtype=pl.Binary)).sort(_SEQ)
        results = state.select(
            [
                *self._keys,
                *(
                    _final_expr(name, aggregation)
                    for name, aggregation in self.config.aggregations.items()
                    if aggregation.fn not in ("count_distinct", "percentile")
                ),
            ]
        )

        ordered = state[_KEY].to_list()
        for name, aggregation in self.config.aggregations.items():
            if aggregation.fn == "count_distinct":
                counts = self._distinct_counts(name, ordered, changed is None)
                results = results.with_columns(pl.Series(name, counts, pl.Int64))
            elif aggregation.fn == "percentile":
                numbers = self._store.list_state(f"values:{name}", FLOAT64)
                q = aggregation.q or 0.0
                quantiles = [
                    _quantile(values, q) for values in numbers.get_many(ordered)
                ]
                results = results.with_columns(pl.Series(name, quantiles, pl.Float64))
        return results

    def _distinct_counts(self, name: str, keys: list[bytes], every: bool) -> list[int]:
        distinct = self._store.map_state(f"distinct:{name}", BYTES, BYTES)
        if every:
            sizes = distinct.sizes()
            return [sizes.get(key, 0) for key in keys]
        return [distinct.size(key) for key in keys]

    def _empty_results(self) -> pl.DataFrame:
        """Return no groups, or one all-empty group when there is no group_by."""
        assert self._schema is not None
        empty = pl.from_arrow(self._schema.empty_table())
        assert isinstance(empty, pl.DataFrame)
        if self.config.group_by:
            return empty
        row = {
            name: 0 if aggregation.fn in ("count", "count_distinct") else None
            for name, aggregation in self.config.aggregations.items()
        }
        only_row = pl.DataFrame([row], schema=empty.schema)
        return only_row.with_columns(pl.lit(0, dtype=pl.Int8).alias(_GROUP))


class _Layout:
    """Per-group state rows: their fields, with and without physical types."""

    def __init__(
        self, store: KeyedStateStore, logical: pl.Schema, physical: pl.Schema
    ) -> None:
        self.logical = logical
        self.physical = physical
        self.codec = RowCodec(row_kinds(physical))
        self.state = store.value_state("groups", self.codec)


def _quantile(values: list[float], q: float) -> float | None:
    """Return the `q` quantile with linear interpolation, as Polars computes it."""
    if not values:
        return None
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    position = q * (len(ordered) - 1)
    low = int(np.floor(position))
    high = int(np.ceil(position))
    value = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return float(value)


def _result_type(name: str, aggregation: Aggregation, schema: pa.Schema) -> pa.DataType:
    """Return the output type of one aggregation, checking its field.

    Raises:
        FieldNotFoundError: the field is not in the input.
        ConfigError: the function does not apply to the field's type.
    """
    if aggregation.field is None:
        return pa.int64()
    if aggregation.field not in schema.names:
        raise FieldNotFoundError(
            aggregation.field, schema.names, where=f"aggregations.{name}.field"
        )
    dtype = schema.field(aggregation.field).type
    kind = type_kind(dtype)
    if aggregation.fn in ("count", "count_distinct"):
        return pa.int64()
    if aggregation.fn in NUMERIC_FUNCTIONS and kind not in ("integer", "float", "null"):
        raise ConfigError(
            f"aggregation {name!r}: {aggregation.fn} needs a numeric field, but "
            f"{aggregation.field!r} is {dtype}; convert it with a cast step",
            where=f"aggregations.{name}.field",
        )
    if aggregation.fn in ("min", "max") and kind not in (*ORDERED_KINDS, "null"):
        raise ConfigError(
            f"aggregation {name!r}: {aggregation.fn} needs a field with ordered "
            f"values, but {aggregation.field!r} is {dtype}; aggregate a field of "
            "numbers, text, booleans, dates or timestamps",
            where=f"aggregations.{name}.field",
        )
    if aggregation.fn == "sum":
        return pa.int64() if kind == "integer" else pa.float64()
    if aggregation.fn in ("mean", "percentile"):
        return pa.float64()
    return dtype


def _state_column(name: str, part: str) -> str:
    return f"__{name}:{part}"


def _state_exprs(
    name: str, aggregation: Aggregation, result_type: pa.DataType
) -> tuple[list[pl.Expr], list[pl.Expr]]:
    """Return the per-batch partial expressions and the expressions merging them."""
    column = pl.col(aggregation.field) if aggregation.field else None
    n, total = _state_column(name, "n"), _state_column(name, "sum")
    low, high = _state_column(name, "min"), _state_column(name, "max")
    if aggregation.fn == "count":
        count = pl.len() if column is None else column.count()
        return [count.cast(pl.Int64).alias(n)], [pl.col(n).sum()]
    assert column is not None
    counted = column.count().cast(pl.Int64).alias(n)
    if aggregation.fn in ("sum", "mean"):
        # Sums of integers are Int64 so that narrow types do not overflow.
        number_type = pl.Int64 if pa.types.is_integer(result_type) else pl.Float64
        partial = [counted, column.cast(number_type).sum().alias(total)]
        return partial, [pl.col(n).sum(), pl.col(total).sum()]
    if aggregation.fn == "min":
        return [counted, column.min().alias(low)], [pl.col(n).sum(), pl.col(low).min()]
    if aggregation.fn == "max":
        return [counted, column.max().alias(high)], [
            pl.col(n).sum(),
            pl.col(high).max(),
        ]
    return [], []  # count_distinct and percentile keep values instead


def _final_expr(name: str, aggregation: Aggregation) -> pl.Expr:
    n = pl.col(_state_column(name, "n"))
    if aggregation.fn == "count":
        return n.alias(name)
    part = {"sum": "sum", "mean": "sum", "min": "min", "max": "max"}[aggregation.fn]
    value = pl.col(_state_column(name, part))
    if aggregation.fn == "mean":
        value = value / n
    return pl.when(n > 0).then(value).otherwise(None).alias(name)


def _value_expr(name: str, aggregation: Aggregation) -> pl.Expr:
    column = pl.col(name)
    if aggregation.fn == "count_distinct":
        return column.n_unique().cast(pl.Int64)
    return column.cast(pl.Float64).quantile(
        aggregation.q or 0.0, interpolation="linear"
    )


def _fill_value_result(name: str, aggregation: Aggregation) -> pl.Expr:
    """Give groups with no values a distinct count of 0 (a percentile stays null)."""
    if aggregation.fn == "count_distinct":
        return pl.col(name).fill_null(0)
    return pl.col(name)

"""`enrichment`: add fields from a lookup table, by key.

Example, the airline's name for each flight::

    transformations:
      named:
        type: enrichment
        inputs: [delayed]
        config:
          table: {path: data/airlines.csv}     # CSV, Parquet or JSON lines
          on: carrier                          # stream field(s)
          table_key: carrier                   # table field(s); default: same as `on`
          fields: {airline: name}              # output field: table field
          defaults: {airline: unknown}         # for keys the table lacks

The table may also be given inline as `rows: [{carrier: AA, name: ...}]`,
or live in Redis as `table: {redis: {url, key_prefix or hash, schema}}`
(see `dataflare.connectors.redis.lookup`): then each batch's keys are
looked up as it passes, with a cache. A file table is read when the
pipeline is validated and once more by each running
instance before its first batch. A key that appears more than once in
the table is a configuration error, because the match would be ambiguous.
Records whose key is not in the table keep flowing, with the `defaults`
(or nulls) in the added fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from dataflare.connectors.redis.config import RedisTable
from dataflare.plugin.interface import (
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.transforms.expressions import to_batch, to_polars

_MATCHED = "__dataflare_matched"


class LookupTable(PluginConfig):
    path: str = Field(description="CSV, Parquet or JSON lines file")
    null_values: list[str] = Field(default_factory=lambda: ["", "NA", "NULL"])


class EnrichmentConfig(PluginConfig):
    table: LookupTable | RedisTable | None = None
    rows: list[dict[str, Any]] | None = None
    on: str | list[str]
    table_key: str | list[str] | None = None
    fields: dict[str, str] | list[str] = Field(
        description="Table fields to add: a list, or {output name: table field}"
    )
    defaults: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_table(self) -> EnrichmentConfig:
        if (self.table is None) == (self.rows is None):
            raise ValueError(
                "set exactly one of 'table' (a file, or {redis: ...}) or 'rows' "
                "(inline)"
            )
        return self

    def stream_keys(self) -> list[str]:
        return [self.on] if isinstance(self.on, str) else list(self.on)

    def lookup_keys(self) -> list[str]:
        key = self.table_key if self.table_key is not None else self.on
        return [key] if isinstance(key, str) else list(key)

    def field_map(self) -> dict[str, str]:
        if isinstance(self.fields, list):
            return {name: name for name in self.fields}
        return dict(self.fields)


class EnrichmentTransform(Transform[EnrichmentConfig]):
    """Add fields from a lookup table (file or inline rows) by key."""

    metadata = PluginMetadata(
        "enrichment", PluginKind.MAP, "Add fields from a lookup table by key"
    )
    Config = EnrichmentConfig

    def _redis(self) -> Any:
        """Return the lookup of a `table: {redis: ...}` (imports redis-py)."""
        from dataflare.connectors.redis.lookup import RedisLookup

        assert isinstance(self.config.table, RedisTable)
        if self.config.table_key is not None:
            raise ValueError(
                "table_key does not apply to a Redis table, whose keys are the "
                "values of 'on'; remove table_key"
            )
        return RedisLookup(
            self.config.table.redis,
            on=self.config.stream_keys(),
            fields=self.config.field_map(),
            step=self.context.step,
        )

    def _load(self) -> pl.DataFrame:
        config = self.config
        if config.rows is not None:
            return pl.DataFrame(config.rows)
        assert isinstance(config.table, LookupTable)
        path = Path(config.table.path)
        if not path.is_file():
            raise ValueError(f"lookup table file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".jsonl", ".ndjson", ".json"):
            return pl.read_ndjson(path)
        return pl.read_csv(
            path, null_values=config.table.null_values, infer_schema_length=None
        )

    def _lookup(self, stream: pa.Schema) -> pl.DataFrame:
        if isinstance(self.config.table, RedisTable):
            return self._redis_table(stream)
        table = self._load()
        keys, lookup_keys = self.config.stream_keys(), self.config.lookup_keys()
        if len(keys) != len(lookup_keys):
            raise ValueError("'on' and 'table_key' must name the same number of fields")
        for key in keys:
            if key not in stream.names:
                raise FieldNotFoundError(key, stream.names, where="on")
        for key in lookup_keys:
            if key not in table.columns:
                raise FieldNotFoundError(key, table.columns, where="table_key")
        fields = self.config.field_map()
        for out, source in fields.items():
            if source not in table.columns:
                raise FieldNotFoundError(source, table.columns, where=f"fields.{out}")
            if out in stream.names:
                raise ValueError(
                    f"output field {out!r} already exists in the stream; "
                    "choose another name in 'fields'"
                )
        unknown = set(self.config.defaults) - set(fields)
        if unknown:
            raise ValueError(
                f"defaults name fields that are not added: {sorted(unknown)}"
            )
        duplicated = table.filter(table.select(lookup_keys).is_duplicated())
        if duplicated.height:
            sample = duplicated.select(lookup_keys).row(0)
            raise ValueError(
                f"lookup table has more than one row for key {sample!r}; "
                "keys must be unique"
            )
        # Match the stream's key types so that, say, an int key finds "42".
        stream_types = to_polars(pa.RecordBatch.from_pylist([], schema=stream)).schema
        casts = [
            pl.col(t).cast(stream_types[s])
            for s, t in zip(keys, lookup_keys, strict=True)
        ]
        renamed = table.with_columns(casts).select(
            [pl.col(t).alias(s) for s, t in zip(keys, lookup_keys, strict=True)]
            + [pl.col(source).alias(out) for out, source in fields.items()]
        )
        return renamed

    def _redis_table(self, stream: pa.Schema) -> pl.DataFrame:
        """Check a Redis table's config against `stream`; return it empty."""
        for key in self.config.stream_keys():
            if key not in stream.names:
                raise FieldNotFoundError(key, stream.names, where="on")
        fields = self.config.field_map()
        for out in fields:
            if out in stream.names:
                raise ValueError(
                    f"output field {out!r} already exists in the stream; "
                    "choose another name in 'fields'"
                )
        unknown = set(self.config.defaults) - set(fields)
        if unknown:
            raise ValueError(
                f"defaults name fields that are not added: {sorted(unknown)}"
            )
        lookup = self._redis()
        try:
            empty: pl.DataFrame = lookup.empty_frame(stream)
        finally:
            lookup.close()
        return empty

    _table: pl.DataFrame | None = None
    _redis_lookup: Any = None

    def open(self) -> None:
        if isinstance(self.config.table, RedisTable):
            self._redis_lookup = self._redis()

    def close(self) -> None:
        if self._redis_lookup is not None:
            self._redis_lookup.close()

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        self._table = self._lookup(inputs[0])
        empty = to_polars(pa.RecordBatch.from_pylist([], schema=inputs[0]))
        return to_batch(self._join(empty, self._table)).schema

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        frame = to_polars(batch)
        if self._redis_lookup is not None:
            self._table = self._redis_lookup.frame(frame)
        elif self._table is None:
            self._table = self._lookup(batch.schema)
        assert self._table is not None
        joined = self._join(frame, self._table, count=True)
        return [to_batch(joined)]

    def _join(
        self, df: pl.DataFrame, lookup: pl.DataFrame, *, count: bool = False
    ) -> pl.DataFrame:
        keys = self.config.stream_keys()
        marked = lookup.with_columns(pl.lit(True).alias(_MATCHED))
        out = df.join(
            marked, on=keys, how="left", maintain_order="left", nulls_equal=False
        )
        if count:
            missing = out[_MATCHED].null_count()
            if missing:
                self.context.count("unmatched", missing)
        out = out.drop(_MATCHED)
        fill = [
            pl.col(name).fill_null(pl.lit(value)).alias(name)
            for name, value in self.config.defaults.items()
        ]
        return out.with_columns(fill) if fill else out

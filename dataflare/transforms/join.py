"""`join`: look up each stream record in a table read from a second input.

Example, flights with their plane's model::

    transformations:
      with_planes:
        type: join
        inputs: [flights, planes]     # 1st: the stream, 2nd: the table
        config:
          on: tailnum                 # or left_on: [...] and right_on: [...]
          how: left                   # inner (default) or left
          fields: [manufacturer, model, year]
          suffix: _plane              # added to table fields whose names clash
          max_buffered_rows: 1000000

Semantics:

- The second input is the table. It must be bounded: the join reads it to
  its end before it joins any stream record. If a key occurs more than once
  in the table, its last row wins, so each stream record matches at most
  one table row and the join never multiplies records.
- Stream records that arrive before the table has ended wait in memory.
  At most `max_buffered_rows` of them may wait, and the run fails with an
  error when more arrive. They are joined, in arrival order, when the
  table ends.
- `how: inner` drops stream records without a match (counted as
  `unmatched`); `how: left` keeps them with nulls in the table fields.
  Null keys never match.
- `fields` lists the table fields to add (default: every table field but
  the keys and the reserved stream columns). A table field whose name is
  already in the stream gets `suffix` appended.
- Output records are the stream records, with their `_event_time`, followed
  by the table fields. The table's own reserved columns are never added.
- Table key types are cast to the stream's key types, so `int32` keys join
  `int64` keys. Keys of other kinds (`string` against `int64`) are a
  validation error.
- With `parallelism` above 1, both inputs are partitioned by the key, which
  needs `on` (the same key names on both sides) and equal key types.
- Give the table's source no `event_time`. Its watermark then stays at the
  start until it ends, so buffered stream records are not late for later
  time-based steps.
- Checkpoints save the table rows read so far and the stream records that
  wait, as Arrow IPC. The table stays in memory, not in the keyed state
  backend, because each stream batch is joined in one vectorized lookup,
  which per-key reads from a backend would turn into one read per record.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from typing import Literal

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from dataflare.plugin.interface import (
    RESERVED_COLUMNS,
    ConfigError,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)
from dataflare.transforms.cast import type_kind
from dataflare.transforms.expressions import to_polars

STREAM, TABLE = 0, 1
_ROW = "__stream_row"
_TABLE_ROW = "__table_row"


class JoinConfig(PluginConfig):
    on: list[str] | str | None = Field(
        None, description="Key field(s), named the same in the stream and the table"
    )
    left_on: list[str] | str | None = Field(None, description="Stream key field(s)")
    right_on: list[str] | str | None = Field(None, description="Table key field(s)")
    how: Literal["inner", "left"] = Field(
        "inner",
        description="inner drops stream records without a match, left keeps them",
    )
    fields: list[str] | None = Field(
        None, description="Table fields to add; default all but keys"
    )
    suffix: str = Field(
        "_right", min_length=1, description="Added to table field names that clash"
    )
    max_buffered_rows: int = Field(
        1_000_000,
        ge=0,
        description="Stream records that may wait for the table to end",
    )

    @model_validator(mode="after")
    def _keys(self) -> JoinConfig:
        if self.on is not None and (
            self.left_on is not None or self.right_on is not None
        ):
            raise ValueError(
                "set either 'on' or both 'left_on' and 'right_on', not both"
            )
        if self.on is None and (self.left_on is None or self.right_on is None):
            raise ValueError(
                "set the join key: 'on' (same names on both sides) or both "
                "'left_on' and 'right_on'"
            )
        left, right = self.stream_keys, self.table_keys
        if len(left) != len(right) or not left:
            raise ValueError(
                f"left_on has {len(left)} field(s) and right_on {len(right)}; "
                "give both the same number of key fields"
            )
        return self

    @property
    def stream_keys(self) -> list[str]:
        return _as_list(self.on if self.on is not None else self.left_on)

    @property
    def table_keys(self) -> list[str]:
        return _as_list(self.on if self.on is not None else self.right_on)


def _as_list(value: list[str] | str | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class JoinTransform(Transform[JoinConfig]):
    """Join stream records (first input) with a bounded table (second input)."""

    metadata = PluginMetadata(
        "join", PluginKind.PROCESSOR, "Look up stream records in a table by key"
    )
    Config = JoinConfig
    input_count = 2
    stateful = True

    # Schema of the table input: from `output_schema` when the engine calls
    # it on this instance, else from the first table batch.
    _table_schema: pa.Schema | None = None

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        stream, table = inputs[STREAM], inputs[TABLE]
        self._check_keys(stream, table)
        self._table_schema = table
        return self._joined_schema(stream, table)

    def _joined_schema(self, stream: pa.Schema, table: pa.Schema) -> pa.Schema:
        added = self._added_fields(stream, table)
        return pa.schema([*stream, *added.values()], metadata=stream.metadata)

    def partition_key(self) -> list[str] | None:
        keys = self.config.stream_keys
        return keys if keys == self.config.table_keys else None

    def _check_keys(self, stream: pa.Schema, table: pa.Schema) -> None:
        where_left = "on" if self.config.on is not None else "left_on"
        where_right = "on" if self.config.on is not None else "right_on"
        for name in self.config.stream_keys:
            if name not in stream.names:
                raise FieldNotFoundError(name, stream.names, where=where_left)
        for name in self.config.table_keys:
            if name not in table.names:
                raise FieldNotFoundError(name, table.names, where=where_right)
        for left, right in zip(
            self.config.stream_keys, self.config.table_keys, strict=True
        ):
            left_type, right_type = stream.field(left).type, table.field(right).type
            if not _joinable(left_type, right_type):
                raise ConfigError(
                    f"join key {left!r} is {left_type} in the stream but {right!r} is "
                    f"{right_type} in the table; convert one with a cast step",
                    where=where_left,
                )

    def _added_fields(self, stream: pa.Schema, table: pa.Schema) -> dict[str, pa.Field]:
        """Return the table fields to add, by table field name, with output names."""
        if self.config.fields is None:
            chosen = [
                name
                for name in table.names
                if name not in self.config.table_keys and name not in RESERVED_COLUMNS
            ]
        else:
            chosen = self.config.fields
        added: dict[str, pa.Field] = {}
        for name in chosen:
            if name not in table.names:
                raise FieldNotFoundError(name, table.names, where="fields")
            if name in RESERVED_COLUMNS:
                raise ConfigError(
                    f"fields lists {name!r}, a reserved stream column of the table, "
                    "which the join never adds; remove it",
                    where="fields",
                )
            output = name + self.config.suffix if name in stream.names else name
            existing_names = [*stream.names, *(f.name for f in added.values())]
            if output in existing_names:
                raise ConfigError(
                    f"table field {name!r} would be named {output!r}, which is already "
                    "a field; choose another suffix or rename the field first",
                    where="suffix",
                )
            added[name] = table.field(name).with_name(output)
        return added

    def open(self) -> None:
        if self.context.parallelism > 1 and self.partition_key() is None:
            raise ValueError(
                f"join step {self.context.step!r} runs {self.context.parallelism} "
                "instances, which needs the same key names on both sides; use 'on' "
                "(rename the table keys first) or set parallelism: 1"
            )
        self._table_parts: list[pa.RecordBatch] = []
        self._table: pa.Table | None = None
        self._lookup: pl.DataFrame | None = None
        self._waiting: list[pa.RecordBatch] = []
        self._waiting_rows = 0

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if input_index == TABLE:
            self._add_table(batch)
            return []
        if self._lookup is None:
            self._buffer(batch)
            return []
        return self._join(batch)

    def on_input_end(self, input_index: int) -> list[pa.RecordBatch]:
        """Build the lookup table when the table input ends; join waiting records.

        NOTE: the engine does not call this hook yet, so `finish()` builds the
        table when every input has ended, and stream records wait until then.
        """
        if input_index != TABLE or self._lookup is not None:
            return []
        self._build_lookup()
        waiting, self._waiting, self._waiting_rows = self._waiting, [], 0
        return [joined for batch in waiting for joined in self._join(batch)]

    def finish(self) -> list[pa.RecordBatch]:
        return self.on_input_end(TABLE)

    # --- checkpoints ---

    def snapshot_state(self) -> bytes | None:
        built = self._lookup is not None
        if built:
            table_batches = [] if self._table is None else self._table.to_batches()
        else:
            table_batches = self._table_parts
        header = orjson.dumps({"built": built, "waiting_rows": self._waiting_rows})
        parts = [
            header,
            _ipc(table_batches, self._table_schema),
            _ipc(self._waiting, None),
        ]
        return b"".join(_SIZE.pack(len(part)) + part for part in parts)

    def restore_state(self, state: bytes) -> None:
        parts = []
        offset = 0
        while offset < len(state):
            (size,) = _SIZE.unpack_from(state, offset)
            parts.append(state[offset + _SIZE.size : offset + _SIZE.size + size])
            offset += _SIZE.size + size
        if len(parts) != 3:
            raise ValueError(
                f"join step {self.context.step!r}: saved state has {len(parts)} "
                "parts instead of 3; the checkpoint is corrupt, so run with "
                "--from-scratch"
            )
        header, table, waiting = parts
        settings = orjson.loads(header)
        self._table_parts = _read_ipc(table)
        if self._table_parts and self._table_schema is None:
            self._table_schema = self._table_parts[0].schema
        self._waiting = _read_ipc(waiting)
        self._waiting_rows = int(settings["waiting_rows"])
        self._table = None
        self._lookup = None
        if settings["built"]:
            self._build_lookup()

    def _add_table(self, batch: pa.RecordBatch) -> None:
        if self._lookup is not None:
            raise ValueError(
                f"join step {self.context.step!r} received table records after the "
                "table input ended"
            )
        if self._table_schema is None:
            self._table_schema = batch.schema
        if batch.num_rows:
            self._table_parts.append(batch)

    def _buffer(self, batch: pa.RecordBatch) -> None:
        if self._waiting_rows + batch.num_rows > self.config.max_buffered_rows:
            raise ValueError(
                f"join step {self.context.step!r} cannot buffer {batch.num_rows} "
                f"more stream records: {self._waiting_rows} already wait for the "
                "table input to end, and max_buffered_rows is "
                f"{self.config.max_buffered_rows}. Make sure the table input is "
                "bounded, or raise max_buffered_rows"
            )
        if batch.num_rows:
            self._waiting.append(batch)
            self._waiting_rows += batch.num_rows

    def _build_lookup(self) -> None:
        """Index the last table row of each non-null key."""
        keys = self.config.table_keys
        self._lookup = pl.DataFrame({_TABLE_ROW: pl.Series([], dtype=pl.Int64)})
        if self._table_parts:
            self._table = pa.Table.from_batches(self._table_parts).combine_chunks()
            frame = to_polars(self._table.select(keys)).with_row_index(_TABLE_ROW)
            frame = frame.drop_nulls(keys)
            frame = frame.unique(subset=keys, keep="last", maintain_order=True)
            self._lookup = frame.with_columns(pl.col(_TABLE_ROW).cast(pl.Int64))
        self._table_parts = []

    def _join(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        if self.context.parallelism > 1:
            self._check_partitioned_types(batch.schema)
        rows, table_rows = self._match(batch)
        if self.config.how == "inner":
            matched = table_rows >= 0
            self.context.count("unmatched", int(np.sum(~matched)))
            rows, table_rows = rows[matched], table_rows[matched]
        if len(rows) == 0:
            return []
        stream_part = batch.take(pa.array(rows))
        names = list(stream_part.schema.names)
        columns = list(stream_part.columns)
        for output, values in self._table_columns(batch.schema, table_rows):
            names.append(output)
            columns.append(values)
        return [pa.RecordBatch.from_arrays(columns, names=names)]

    def _check_partitioned_types(self, stream: pa.Schema) -> None:
        """Raise if the two inputs' keys hash differently across instances.

        The engine partitions each input by hashing its key values, so equal
        keys of different types (int32 and int64) may reach different
        instances and never meet.
        """
        if self._table_schema is None:
            return
        for name in self.config.stream_keys:
            stream_type = stream.field(name).type
            table_type = self._table_schema.field(name).type
            if _polars_type(stream_type) != _polars_type(table_type):
                raise ValueError(
                    f"join step {self.context.step!r} runs "
                    f"{self.context.parallelism} instances, so key {name!r} needs "
                    f"one type on both sides, but it is {stream_type} in the stream "
                    f"and {table_type} in the table; cast one side, or set "
                    "parallelism: 1"
                )

    def _match(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """Return each stream row and its table row (-1 for none), in stream order."""
        assert self._lookup is not None
        stream_keys = self.config.stream_keys
        table_keys = self.config.table_keys
        left = to_polars(batch.select(stream_keys)).with_row_index(_ROW)
        if self._table is None:
            rows = left[_ROW].cast(pl.Int64).to_numpy()
            return rows, np.full(len(rows), -1, dtype=np.int64)
        left, right = _align_key_types(left, self._lookup, stream_keys, table_keys)
        joined = left.join(
            right,
            left_on=stream_keys,
            right_on=table_keys,
            how="left",
            maintain_order="left",
        )
        rows = joined[_ROW].cast(pl.Int64).to_numpy()
        table_rows = joined[_TABLE_ROW].fill_null(-1).to_numpy()
        return rows, table_rows

    def _table_columns(
        self, stream: pa.Schema, table_rows: np.ndarray
    ) -> list[tuple[str, pa.Array]]:
        """Return the added table fields for `table_rows` (null where -1)."""
        if self._table_schema is None:
            # NOTE: the table input sent no record and the engine did not call
            # output_schema on this instance, so the field types are unknown.
            return [
                (name, pa.nulls(len(table_rows))) for name in self.config.fields or []
            ]
        added = self._added_fields(stream, self._table_schema)
        indices = pa.array(table_rows, mask=table_rows < 0)
        columns = []
        for name, field in added.items():
            if self._table is None:
                columns.append((field.name, pa.nulls(len(table_rows), type=field.type)))
            else:
                values = self._table.column(name).combine_chunks()
                columns.append((field.name, values.take(indices)))
        return columns


_SIZE = struct.Struct(">Q")


def _ipc(batches: Sequence[pa.RecordBatch], schema: pa.Schema | None) -> bytes:
    """Return `batches` as an Arrow IPC stream (empty bytes if no schema)."""
    schema = batches[0].schema if batches else schema
    if schema is None:
        return b""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def _read_ipc(data: bytes) -> list[pa.RecordBatch]:
    if not data:
        return []
    return [batch for batch in pa.ipc.open_stream(pa.py_buffer(data)) if batch.num_rows]


def _align_key_types(
    left: pl.DataFrame, right: pl.DataFrame, left_keys: list[str], right_keys: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cast key pairs of different types to one type, so that equal values match.

    Numbers become Float64 if either side is a float, else Int64. Other
    kinds take the stream's type. A value that does not convert becomes
    null, and null keys never match.
    """
    left_casts, right_casts = [], []
    for left_key, right_key in zip(left_keys, right_keys, strict=True):
        left_type, right_type = left.schema[left_key], right.schema[right_key]
        if left_type == right_type:
            continue
        if left_type.is_numeric() and right_type.is_numeric():
            common: pl.DataType = pl.Int64()
            if left_type.is_float() or right_type.is_float():
                common = pl.Float64()
            left_casts.append(pl.col(left_key).cast(common, strict=False))
        else:
            common = left_type
        right_casts.append(pl.col(right_key).cast(common, strict=False))
    return left.with_columns(left_casts), right.with_columns(right_casts)


def _polars_type(dtype: pa.DataType) -> pl.DataType:
    empty = pl.from_arrow(pa.array([], type=dtype))
    assert isinstance(empty, pl.Series)
    return empty.dtype


def _joinable(left: pa.DataType, right: pa.DataType) -> bool:
    left_kind, right_kind = type_kind(left), type_kind(right)
    numeric = {"integer", "float"}
    if left_kind in numeric and right_kind in numeric:
        return True
    return left == right or (left_kind == right_kind and left_kind != "other")

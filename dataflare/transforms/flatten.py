"""`flatten` and `explode`: unnest struct and list fields.

Example::

    transformations:
      flat:
        type: flatten
        inputs: [events]
        config:
          separator: "_"        # user.address.city -> user_address_city
          fields: [user]        # default: every struct field
      items:
        type: explode
        inputs: [flat]
        config:
          field: items          # one output record per element of `items`
          keep_empty: true      # keep records with an empty or null list

`flatten` replaces each struct field by its child fields, named
`parent<separator>child`, in place. With `recursive: true` (the default),
structs inside structs are flattened too. A null struct gives nulls in
all its child fields. A new name that is already a field is a validation
error, which another `separator` avoids.

`explode` outputs one record per element of the list field `field`, with
the element in place of the list and the other fields repeated. Records
keep their order, and elements keep their list order. A null element gives
a record with a null value. A record whose list is empty or null is
dropped, or with `keep_empty: true` kept once with a null value. Dropped
records are counted as `empty_lists`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from dataflare.plugin.interface import (
    ConfigError,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)


class FlattenConfig(PluginConfig):
    separator: str = Field(
        ".", min_length=1, description="Text between parent and child names"
    )
    fields: list[str] | None = Field(
        None, description="Struct fields to flatten; default every struct field"
    )
    recursive: bool = Field(True, description="Also flatten structs inside structs")


class FlattenTransform(Transform[FlattenConfig]):
    """Replace struct fields by their child fields."""

    metadata = PluginMetadata(
        "flatten", PluginKind.MAP, "Replace struct fields by their child fields"
    )
    Config = FlattenConfig

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        chosen = self._chosen(schema)
        fields: list[pa.Field] = []
        for field in schema:
            if field.name in chosen:
                fields.extend(self._flat_fields(field, field.name))
            else:
                fields.append(field)
        names = [field.name for field in fields]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(
                    f"flattening gives two fields named {name!r}; choose another "
                    f"separator than {self.config.separator!r}",
                    where="separator",
                )
        return pa.schema(fields, metadata=schema.metadata)

    def _chosen(self, schema: pa.Schema) -> set[str]:
        if self.config.fields is None:
            return {f.name for f in schema if pa.types.is_struct(f.type)}
        for name in self.config.fields:
            if name not in schema.names:
                raise FieldNotFoundError(name, schema.names, where="fields")
            dtype = schema.field(name).type
            if not pa.types.is_struct(dtype):
                raise ConfigError(
                    f"field {name!r} in fields is {dtype}, not a struct, so it "
                    "cannot be flattened; remove it from fields",
                    where="fields",
                )
        return set(self.config.fields)

    def _flat_fields(self, field: pa.Field, name: str) -> list[pa.Field]:
        fields = []
        for child in field.type:
            child_name = f"{name}{self.config.separator}{child.name}"
            if self.config.recursive and pa.types.is_struct(child.type):
                fields.extend(self._flat_fields(child, child_name))
            else:
                # A child of a null struct is null, so every child is nullable.
                fields.append(child.with_name(child_name).with_nullable(True))
        return fields

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if batch.num_rows == 0:
            return []
        schema = self.output_schema([batch.schema])
        chosen = self._chosen(batch.schema)
        columns: list[pa.Array] = []
        for field, column in zip(batch.schema, batch.columns, strict=True):
            if field.name in chosen:
                columns.extend(self._flat_columns(column))
            else:
                columns.append(column)
        return [pa.RecordBatch.from_arrays(columns, schema=schema)]

    def _flat_columns(self, column: pa.StructArray) -> list[pa.Array]:
        # StructArray.flatten() makes a child null where its parent is null.
        columns = []
        for child in column.flatten():
            if self.config.recursive and pa.types.is_struct(child.type):
                columns.extend(self._flat_columns(child))
            else:
                columns.append(child)
        return columns


class ExplodeConfig(PluginConfig):
    field: str = Field(min_length=1, description="List field to explode")
    keep_empty: bool = Field(
        False,
        description="Keep a record whose list is empty or null, with a null value",
    )


class ExplodeTransform(Transform[ExplodeConfig]):
    """Output one record per element of a list field."""

    metadata = PluginMetadata(
        "explode", PluginKind.FLAT_MAP, "One record per element of a list field"
    )
    Config = ExplodeConfig

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        name = self.config.field
        if name not in schema.names:
            raise FieldNotFoundError(name, schema.names, where="field")
        dtype = schema.field(name).type
        if not _is_list(dtype):
            raise ConfigError(
                f"field {name!r} is {dtype}, not a list, so it cannot be exploded; "
                "name a list field",
                where="field",
            )
        index = schema.get_field_index(name)
        element = pa.field(name, dtype.value_type)
        return schema.set(index, element)

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if batch.num_rows == 0:
            return []
        schema = self.output_schema([batch.schema])
        index = batch.schema.get_field_index(self.config.field)
        lists = batch.column(index)
        parents, values = self._element_rows(lists)
        empty = int(np.count_nonzero(_lengths(lists) == 0))
        if empty and not self.config.keep_empty:
            self.context.count("empty_lists", empty)
        if len(parents) == 0:
            return []
        columns = [column.take(pa.array(parents)) for column in batch.columns]
        columns[index] = values
        return [pa.RecordBatch.from_arrays(columns, schema=schema)]

    def _element_rows(self, lists: pa.Array) -> tuple[np.ndarray, pa.Array]:
        """Return the input row of each output record and the element values."""
        # flatten() respects the slice offset and skips the contents of null lists.
        elements = lists.flatten()
        lengths = _lengths(lists)
        if not self.config.keep_empty:
            parents = np.repeat(np.arange(len(lists)), lengths)
            return parents, elements
        # An empty or null list takes one output row, pointing at no element.
        slots = np.maximum(lengths, 1)
        parents = np.repeat(np.arange(len(lists)), slots)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        offsets = np.arange(len(parents)) - np.repeat(np.cumsum(slots) - slots, slots)
        positions = np.repeat(starts, slots) + offsets
        missing = np.repeat(lengths == 0, slots)
        indices = pa.array(positions, mask=missing)
        return parents, elements.take(indices)


def _is_list(dtype: pa.DataType) -> bool:
    checks = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    return any(check(dtype) for check in checks)


def _lengths(lists: pa.Array) -> np.ndarray:
    """Return the number of elements per list, 0 for a null list."""
    lengths = pc.fill_null(pc.list_value_length(lists), 0)
    counts: np.ndarray = lengths.to_numpy(zero_copy_only=False).astype(np.int64)
    return counts

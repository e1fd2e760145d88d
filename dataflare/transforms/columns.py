"""`select` and `rename`: choose and rename fields.

Example::

    transformations:
      slim:
        type: select
        inputs: [flights]
        config: {fields: [carrier, flight, dep_delay]}
      named:
        type: rename
        inputs: [slim]
        config: {fields: {dep_delay: departure_delay_minutes}}

`select` outputs the listed fields in the listed order, followed by the
reserved stream columns (`_event_time`, `_key`, ...) of the input, which it
always keeps. List a reserved column to place it elsewhere.

`rename` keeps every field in place and renames those listed as
`{old: new}`. Names may be swapped (`{a: b, b: a}`). Reserved stream
columns cannot be renamed, and no new name may be a reserved one.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
from pydantic import Field, field_validator

from dataflare.plugin.interface import (
    RESERVED_COLUMNS,
    ConfigError,
    FieldNotFoundError,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Transform,
)


class SelectConfig(PluginConfig):
    fields: list[str] = Field(
        min_length=1, description="Fields to keep, in output order"
    )

    @field_validator("fields")
    @classmethod
    def _distinct(cls, fields: list[str]) -> list[str]:
        repeated = sorted({name for name in fields if fields.count(name) > 1})
        if repeated:
            raise ValueError(
                f"fields lists {', '.join(map(repr, repeated))} more than once; "
                "list each field once"
            )
        return fields


class SelectTransform(Transform[SelectConfig]):
    """Keep the listed fields, in order, and the reserved stream columns."""

    metadata = PluginMetadata("select", PluginKind.MAP, "Keep the listed fields")
    Config = SelectConfig
    _last: tuple[pa.Schema, list[str]] | None = None  # last input schema, its output

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        return pa.schema(
            [schema.field(name) for name in self._names(schema)],
            metadata=schema.metadata,
        )

    def _names(self, schema: pa.Schema) -> list[str]:
        for name in self.config.fields:
            if name not in schema.names:
                raise FieldNotFoundError(name, schema.names, where="fields")
        reserved = [
            name
            for name in schema.names
            if name in RESERVED_COLUMNS and name not in self.config.fields
        ]
        return [*self.config.fields, *reserved]

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if self._last is None or not batch.schema.equals(self._last[0]):
            self._last = (batch.schema, self._names(batch.schema))
        selected = batch.select(self._last[1])
        return [selected] if selected.num_rows else []


class RenameConfig(PluginConfig):
    fields: dict[str, str] = Field(
        min_length=1, description="New name per field, as {old: new}"
    )

    @field_validator("fields")
    @classmethod
    def _valid_names(cls, fields: dict[str, str]) -> dict[str, str]:
        for old, new in fields.items():
            if old in RESERVED_COLUMNS:
                raise ValueError(
                    f"field {old!r} is a reserved stream column and cannot be "
                    "renamed; remove it from fields"
                )
            if new in RESERVED_COLUMNS:
                raise ValueError(
                    f"new name {new!r} for field {old!r} is a reserved stream "
                    "column name; choose another name"
                )
            if not new:
                raise ValueError(f"new name for field {old!r} is empty")
        targets = list(fields.values())
        repeated = sorted({new for new in targets if targets.count(new) > 1})
        if repeated:
            raise ValueError(
                f"several fields are renamed to {', '.join(map(repr, repeated))}; "
                "give each field its own new name"
            )
        return fields


class RenameTransform(Transform[RenameConfig]):
    """Rename fields, keeping their order and values."""

    metadata = PluginMetadata("rename", PluginKind.MAP, "Rename fields")
    Config = RenameConfig
    _last: tuple[pa.Schema, list[str]] | None = None  # last input schema, new names

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        names = self._new_names(schema)
        return pa.schema(
            [field.with_name(name) for field, name in zip(schema, names, strict=True)],
            metadata=schema.metadata,
        )

    def _new_names(self, schema: pa.Schema) -> list[str]:
        renames = self.config.fields
        for old in renames:
            if old not in schema.names:
                raise FieldNotFoundError(old, schema.names, where=f"fields.{old}")
        names = [renames.get(name, name) for name in schema.names]
        for old, new in renames.items():
            if names.count(new) > 1:
                raise ConfigError(
                    f"renaming {old!r} to {new!r} clashes with the existing field "
                    f"{new!r}; rename that field too, or choose another name",
                    where=f"fields.{old}",
                )
        return names

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        if self._last is None or not batch.schema.equals(self._last[0]):
            self._last = (batch.schema, self._new_names(batch.schema))
        renamed = batch.rename_columns(self._last[1])
        return [renamed] if renamed.num_rows else []

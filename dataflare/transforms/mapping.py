"""`mapping`: build output records from field mappings (DataFlare's field mappings).

Example::

    transformations:
      users:
        type: mapping
        inputs: [raw]
        config:
          keep_unmapped: false
          mappings:
            - {source: id, destination: user.id, transform: int}
            - {source: name, destination: user.name, transform: trim}
            - {source: country, destination: country, transform: uppercase,
               default: "ZZ"}
            - {source: signup, destination: signed_up_at, transform: timestamp,
               format: "%d/%m/%Y %H:%M"}

Each mapping reads `source` (a field, or `a.b` for field `b` of struct `a`),
applies `transform` and writes `destination`. A dotted destination such as
`user.name` builds struct columns: mappings sharing the prefix `user` fill
one struct column `user`. Transforms:

- `uppercase`, `lowercase`, `trim`: text operations on a string field;
- `string`, `int`, `float`, `boolean`, `timestamp`: type conversions as in the
  `cast` transformation (a `timestamp` mapping may give a strftime `format`,
  or `unix_s`, `unix_ms` or `unix_us` for numbers);
- none: the value as it is.

`default` is the value written where the source is null (or an empty string
converted to a non-string type). It is given in the destination's type, and
timestamps are given as ISO 8601 text.

A record with a value that does not convert (for example `int` of `"abc"`)
goes to the dead-letter output with a reason naming the field and the value.
The rest of the batch goes on.

The output has the mapped destinations in mapping order, then, with
`keep_unmapped: true`, the input fields that no mapping reads (a destination
replaces an input field of the same name), then the reserved stream
columns such as `_event_time`, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
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
from dataflare.transforms.cast import (
    TIMESTAMP_TYPE,
    Conversion,
    check_conversion,
    convert,
    drop_rejected,
    type_kind,
)
from dataflare.transforms.expressions import empty_batch

TransformName = Literal[
    "uppercase", "lowercase", "trim", "string", "int", "float", "boolean", "timestamp"
]
TEXT_FUNCTIONS = {
    "uppercase": pc.utf8_upper,
    "lowercase": pc.utf8_lower,
    "trim": pc.utf8_trim_whitespace,
}
CONVERSION_TYPES = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "boolean": pa.bool_(),
    "timestamp": TIMESTAMP_TYPE,
}


class FieldMapping(PluginConfig):
    source: str = Field(
        min_length=1, description="Input field, or a.b for field b of struct a"
    )
    destination: str = Field(
        min_length=1, description="Output field; a.b writes field b of struct column a"
    )
    transform: TransformName | None = Field(
        None, description="Text operation or type conversion to apply"
    )
    format: str | None = Field(
        None,
        description="strftime pattern (or unix_s, "
        "unix_ms, unix_us) for transform: timestamp",
    )
    default: Any = Field(None, description="Value written where the source is null")

    @model_validator(mode="after")
    def _check(self) -> FieldMapping:
        if self.format is not None and self.transform != "timestamp":
            raise ValueError(
                "'format' applies only to transform: timestamp; remove it "
                "or set transform: timestamp"
            )
        if any(not part for part in self.destination.split(".")):
            raise ValueError(
                f"invalid destination {self.destination!r}: each part of "
                "a dotted path needs a name, as in 'user.name'"
            )
        if self.destination.split(".")[0] in RESERVED_COLUMNS:
            raise ValueError(
                f"destination {self.destination!r} is a reserved stream "
                "column; choose another name"
            )
        return self

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.destination.split("."))


class MappingConfig(PluginConfig):
    mappings: list[FieldMapping] = Field(
        min_length=1, description="Field mappings, applied in order"
    )
    keep_unmapped: bool = Field(
        False, description="Also output the input fields that no mapping reads"
    )

    @model_validator(mode="after")
    def _destinations_distinct(self) -> MappingConfig:
        seen: dict[tuple[str, ...], int] = {}
        for index, mapping in enumerate(self.mappings):
            path = mapping.path
            for other, other_index in seen.items():
                if _overlaps(path, other):
                    shared = path if len(path) <= len(other) else other
                    raise ValueError(
                        f"mappings {other_index} and {index} both write "
                        f"{'.'.join(shared)!r}; give each destination its own name"
                    )
            seen[path] = index
        return self


def _overlaps(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


@dataclass
class _Column:
    """One mapped value column with its destination path."""

    path: tuple[str, ...]
    values: pa.Array


@dataclass(frozen=True)
class _Layout:
    """Output plan of `process` for inputs with schema `input`."""

    input: pa.Schema
    output: pa.Schema
    copied: list[int]  # input columns that follow the mapped ones
    defaults: list[pa.Scalar | None]  # each mapping's default, as its output type


class MappingTransform(Transform[MappingConfig]):
    """Build output records from field mappings, with conversions and defaults."""

    metadata = PluginMetadata(
        "mapping", PluginKind.MAP, "Build output records from field mappings"
    )
    Config = MappingConfig

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        schema = inputs[0]
        empty = empty_batch(schema)
        columns = []
        for index, mapping in enumerate(self.config.mappings):
            source = _source_type(schema, mapping.source, f"mappings.{index}.source")
            _check_mapping(index, mapping, source)
            values = _apply(mapping, _read(empty, mapping.source)).values
            columns.append(_Column(mapping.path, values))
        return _assemble(empty, columns, self._copied(schema)).schema

    def open(self) -> None:
        self._layout: _Layout | None = None

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        layout = self._layout
        if layout is None or not batch.schema.equals(layout.input):
            layout = self._layout = self._make_layout(batch.schema)
        columns = []
        reasons: dict[int, list[str]] = {}
        for mapping, default in zip(self.config.mappings, layout.defaults, strict=True):
            result = _apply(mapping, _read(batch, mapping.source), default)
            columns.append(_Column(mapping.path, result.values))
            for row, reason in result.reasons.items():
                reasons.setdefault(row, []).append(reason)
        mapped = _assemble(batch, columns, layout.copied)
        if not mapped.schema.equals(layout.output):
            mapped = mapped.cast(layout.output)
        kept = drop_rejected(self, batch, mapped, reasons)
        return [kept] if kept.num_rows else []

    def _make_layout(self, schema: pa.Schema) -> _Layout:
        output = self.output_schema([schema])
        defaults: list[pa.Scalar | None] = []
        for mapping in self.config.mappings:
            source = _source_type(schema, mapping.source, "")
            output_type = _output_type(mapping, source)
            if mapping.default is None:
                defaults.append(None)
            else:
                defaults.append(_default_scalar(mapping, output_type))
        return _Layout(schema, output, self._copied(schema), defaults)

    def _copied(self, schema: pa.Schema) -> list[int]:
        """Return the input columns copied to the output, reserved ones last.

        A destination replaces an input field of the same name. With
        `keep_unmapped`, the fields that no mapping reads are copied, and the
        reserved stream columns always are.
        """
        mappings = self.config.mappings
        destinations = {mapping.path[0] for mapping in mappings}
        read = {_top_level(schema, mapping.source) for mapping in mappings}
        copied = [
            index
            for index, name in enumerate(schema.names)
            if name not in destinations
            and (
                (self.config.keep_unmapped and name not in read)
                or name in RESERVED_COLUMNS
            )
        ]
        reserved = [i for i in copied if schema.names[i] in RESERVED_COLUMNS]
        return [i for i in copied if i not in reserved] + reserved


def _assemble(
    batch: pa.RecordBatch, columns: list[_Column], copied: list[int]
) -> pa.RecordBatch:
    """Return the mapped columns, nested into structs, then the `copied` inputs."""
    nested = _nest(columns)
    names = [name for name, _ in nested]
    arrays = [values for _, values in nested]
    input_names = batch.schema.names
    for index in copied:
        names.append(input_names[index])
        arrays.append(batch.column(index))
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _source_type(schema: pa.Schema, source: str, where: str) -> pa.DataType:
    """Return the type of `source`: a field, or a dotted path into struct fields."""
    if source in schema.names:
        return schema.field(source).type
    fields: list[pa.Field] = list(schema)
    dtype: pa.DataType | None = None
    for part in source.split("."):
        match = next((f for f in fields if f.name == part), None)
        if match is None:
            raise FieldNotFoundError(source, _all_paths(schema), where=where)
        dtype = match.type
        fields = list(dtype) if pa.types.is_struct(dtype) else []
    assert dtype is not None
    return dtype


def _top_level(schema: pa.Schema, source: str) -> str:
    return source if source in schema.names else source.split(".")[0]


def _all_paths(schema: Any, prefix: str = "") -> list[str]:
    paths = []
    for field in schema:
        paths.append(prefix + field.name)
        if pa.types.is_struct(field.type):
            paths.extend(_all_paths(list(field.type), f"{prefix}{field.name}."))
    return paths


def _check_mapping(index: int, mapping: FieldMapping, source: pa.DataType) -> None:
    """Check that the mapping's transform and default fit the source type.

    Raises:
        ConfigError: they do not, with the config key at fault.
    """
    where = f"mappings.{index}"
    if mapping.transform in TEXT_FUNCTIONS:
        if type_kind(source) not in ("string", "null"):
            raise ConfigError(
                f"transform {mapping.transform!r} needs a string field, but "
                f"{mapping.source!r} is {source}; use transform: string to convert it",
                where=f"{where}.transform",
            )
    elif mapping.transform is not None:
        target = CONVERSION_TYPES[mapping.transform]
        try:
            check_conversion(mapping.source, source, target, mapping.format)
        except ValueError as exc:
            raise ConfigError(str(exc), where=f"{where}.transform") from None
    if mapping.default is not None:
        try:
            _default_scalar(mapping, _output_type(mapping, source))
        except ValueError as exc:
            raise ConfigError(str(exc), where=f"{where}.default") from None


def _output_type(mapping: FieldMapping, source: pa.DataType) -> pa.DataType:
    if mapping.transform in CONVERSION_TYPES:
        return CONVERSION_TYPES[mapping.transform]
    if mapping.transform in TEXT_FUNCTIONS:
        return pa.string()
    return source


def _read(batch: pa.RecordBatch, source: str) -> pa.Array:
    if source in batch.schema.names:
        return batch.column(source)
    first, *rest = source.split(".")
    return pc.struct_field(batch.column(first), rest)


def _apply(
    mapping: FieldMapping, values: pa.Array, default: pa.Scalar | None = None
) -> Conversion:
    """Apply the mapping's transform and default to the source values.

    `default` is the mapping's default as a scalar of the output type, made
    once per input schema. Without it, the default is converted here.
    """
    name = mapping.source
    if mapping.transform in CONVERSION_TYPES:
        result = convert(
            values, CONVERSION_TYPES[mapping.transform], name=name, fmt=mapping.format
        )
    elif mapping.transform in TEXT_FUNCTIONS:
        text = values.cast(pa.string())
        result = Conversion(TEXT_FUNCTIONS[mapping.transform](text))
    else:
        result = Conversion(values)
    if mapping.default is not None:
        if default is None or default.type != result.values.type:
            default = _default_scalar(mapping, result.values.type)
        result.values = _fill_default(mapping, result.values, values, default)
    return result


def _fill_default(
    mapping: FieldMapping, result: pa.Array, source: pa.Array, default: pa.Scalar
) -> pa.Array:
    """Write the default where the source is null or blank.

    Blank text counts only where it is converted to a non-string type,
    because `convert` turns it into null there.
    """
    missing = pc.is_null(source)
    converts_text = (
        mapping.transform in CONVERSION_TYPES and mapping.transform != "string"
    )
    if converts_text and type_kind(source.type) == "string":
        blank = pc.equal(pc.utf8_trim_whitespace(source.cast(pa.string())), "")
        missing = pc.or_(missing, pc.fill_null(blank, False))
    return pc.if_else(missing, default, result)


def _default_scalar(mapping: FieldMapping, dtype: pa.DataType) -> pa.Scalar:
    """Return the mapping's default as a scalar of type `dtype`.

    Raises:
        ValueError: the default is not a valid value of `dtype`.
    """
    value = mapping.default
    try:
        scalar = pa.scalar(value)
        if type_kind(dtype) in ("timestamp", "date") and isinstance(value, str):
            converted = convert(pa.array([value]), dtype, name="default")
            if converted.reasons:
                raise ValueError(converted.reasons[0])
            return converted.values[0]
        return scalar.cast(dtype)
    except (
        pa.ArrowInvalid,
        pa.ArrowTypeError,
        pa.ArrowNotImplementedError,
        ValueError,
    ) as exc:
        raise ValueError(
            f"invalid default {value!r} for destination {mapping.destination!r}: it is "
            f"not a valid {dtype} value ({exc}); give a default of that type"
        ) from None


def _nest(columns: list[_Column]) -> list[tuple[str, pa.Array]]:
    """Group columns by the first part of their paths into nested struct arrays."""
    groups: dict[str, list[_Column]] = {}
    for column in columns:
        groups.setdefault(column.path[0], []).append(column)
    nested = []
    for name, members in groups.items():
        if len(members) == 1 and len(members[0].path) == 1:
            nested.append((name, members[0].values))
            continue
        children = _nest([_Column(m.path[1:], m.values) for m in members])
        arrays = [values for _, values in children]
        names = [child for child, _ in children]
        nested.append((name, pa.StructArray.from_arrays(arrays, names=names)))
    return nested

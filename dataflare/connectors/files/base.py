"""What every file source shares: paths, globs, directories, following, types.

`path` may name one file, a glob (`data/*.csv`, `logs/**/*.jsonl`) or a
directory (every file in it whose name ends with the format's extension,
in name order). With `follow: true` the source keeps running: it reads
lines appended to files it has seen and files that appear later.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from pydantic import Field, field_validator

from dataflare.plugin.interface import PluginConfig, Progress
from dataflare.streaming.spec import Duration

TYPE_NAMES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "str": pa.string(),
    "int": pa.int64(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "integer": pa.int64(),
    "float": pa.float64(),
    "float64": pa.float64(),
    "double": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "boolean": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "datetime": pa.timestamp("us", tz="UTC"),
}


def parse_type(name: str) -> pa.DataType:
    try:
        return TYPE_NAMES[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown type {name!r}; use one of: {', '.join(sorted(set(TYPE_NAMES)))}"
        ) from None


class FileSourceConfig(PluginConfig):
    path: str = Field(description="File, glob pattern or directory to read")
    follow: bool = Field(False, description="Keep reading data appended to the "
                         "files and new files that appear; runs until stopped")
    poll_interval: Duration = Field(timedelta(milliseconds=200),
                                    description="How often `follow` looks for new data")
    schema_: dict[str, str] | None = Field(
        None, alias="schema",
        description="Field types, e.g. {id: int, name: string}; inferred if unset")

    @field_validator("schema_")
    @classmethod
    def _known_types(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for type_name in (value or {}).values():
            parse_type(type_name)
        return value

    def declared_schema(self) -> pa.Schema | None:
        if self.schema_ is None:
            return None
        return pa.schema([(name, parse_type(t)) for name, t in self.schema_.items()])


def resolve_paths(pattern: str, extensions: Sequence[str]) -> list[Path]:
    """List the files `pattern` names, sorted; empty if none exist yet."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.is_file() and p.name.lower().endswith(tuple(extensions)))
    if glob.has_magic(pattern):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                      if os.path.isfile(p))
    return [path] if path.is_file() else []


def missing_input_error(pattern: str, follow: bool) -> ValueError:
    hint = ("set `schema` so that the source can start before the first file "
            "appears" if follow else "check the path, or use follow: true to wait for files")
    return ValueError(f"no input files match path {pattern!r}; {hint}")


class ByteProgress:
    """Bytes read against total bytes of the files, for progress bars."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.total = sum(_size(p) for p in files)
        self.done = 0

    def progress(self) -> Progress:
        return Progress(done=min(self.done, self.total), total=self.total, unit="bytes")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def cast_strings(
    batch: pa.RecordBatch, schema: pa.Schema
) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """Convert string columns to `schema`'s types, cell by cell where needed.

    Returns the typed batch and, for each row with a value that does not
    convert, the row index and the reason. Such rows stay in the batch with
    a null in place of the bad value; the caller removes them.
    """
    df = pl.from_arrow(batch)
    assert isinstance(df, pl.DataFrame)
    exprs = []
    bad: dict[int, str] = {}
    for field in schema:
        if field.name not in df.columns:
            exprs.append(pl.lit(None).alias(field.name))
            continue
        target = pl.from_arrow(pa.schema([field]).empty_table()).schema[field.name]
        column = df[field.name]
        if column.dtype == target:
            exprs.append(pl.col(field.name))
            continue
        converted = _convert(column, target)
        failed = (converted.is_null() & column.is_not_null()).arg_true().to_list()
        for row in failed:
            if row not in bad:
                bad[row] = (f"field {field.name!r} value {column[row]!r} is not a valid "
                            f"{_type_word(field.type)}")
        exprs.append(converted.alias(field.name))
    table = df.select(exprs).to_arrow().cast(schema).combine_chunks()
    batches = table.to_batches()
    result = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=schema)
    return result, sorted(bad.items())


def _convert(column: pl.Series, target: Any) -> pl.Series:
    if column.dtype == pl.String:
        text = column.str.strip_chars()
        if target == pl.Boolean:
            lowered = text.str.to_lowercase()
            flags = (
                pl.when(lowered.is_in(["true", "t", "yes", "1"])).then(True)
                .when(lowered.is_in(["false", "f", "no", "0"])).then(False)
                .otherwise(None)
            )
            return pl.select(flags).to_series().alias(column.name)
        if isinstance(target, pl.Datetime):
            parsed = text.str.to_datetime(time_unit="us", strict=False)
            if parsed.dtype.time_zone is None:  # type: ignore[union-attr]
                parsed = parsed.dt.replace_time_zone("UTC")
            return parsed.dt.convert_time_zone("UTC")
        if target == pl.Date:
            return text.str.to_date(strict=False)
        return text.cast(target, strict=False)
    return column.cast(target, strict=False)


def _type_word(dtype: pa.DataType) -> str:
    if pa.types.is_integer(dtype):
        return "integer"
    if pa.types.is_floating(dtype):
        return "number"
    if pa.types.is_boolean(dtype):
        return "boolean (true or false)"
    if pa.types.is_timestamp(dtype):
        return "timestamp (ISO 8601)"
    if pa.types.is_date(dtype):
        return "date (YYYY-MM-DD)"
    return str(dtype)

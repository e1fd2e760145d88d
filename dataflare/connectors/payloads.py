"""Message payloads of the broker connectors (Kafka, NATS, Redis Streams).

A message carries one record. With `format: json` (the default) the payload
is one JSON object, read against the declared `schema`; with `format: raw`
the payload becomes the binary field `value`, unparsed.

`PayloadDecoder` turns the payloads of a poll into one Arrow batch. It first
parses them together with Arrow's JSON reader (through `JsonLinesParser`,
one payload per line). Only when that fails does it parse them one at a
time, so that each bad payload is rejected with its own reason while the
good ones go on. A line break inside a JSON text can only be whitespace
between tokens (inside strings it must be escaped), so a payload written
over several lines is joined onto one line first.

`PayloadEncoder` does the reverse for sinks: one JSON object per record,
encoded as the `jsonl` sink encodes lines (timestamps as ISO 8601 text), or
the bytes of the `value` field with `format: raw`.

The Kafka, NATS and Redis connectors share this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from dataflare.connectors.files.base import parse_type
from dataflare.connectors.files.jsonl import (
    JsonLinesParser,
    LineError,
    encode_json_lines,
)
from dataflare.plugin.interface import RESERVED_COLUMNS, PluginConfig

RAW_FIELD = "value"
"""The field that contains the payload with `format: raw`."""

HEADERS_TYPE = pa.map_(pa.string(), pa.binary())
"""Type of the `_headers` column: header name to value bytes."""

_TEXT_LIMIT = 65536


class PayloadConfig(PluginConfig):
    """Mapping of message payloads to records: `format` and `schema`."""

    format: Literal["json", "raw"] = Field(
        "json",
        description="json: each payload is one JSON object of `schema`; "
        "raw: each payload becomes the binary field `value`",
    )
    schema_: dict[str, str] | None = Field(
        None,
        alias="schema",
        description="Field types of the JSON records, e.g. {id: int, name: string}; "
        "required with format: json",
    )

    @field_validator("schema_")
    @classmethod
    def _known_types(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for type_name in (value or {}).values():
            parse_type(type_name)
        return value

    @model_validator(mode="after")
    def _schema_fits_format(self) -> PayloadConfig:
        if self.format == "json" and not self.schema_:
            raise ValueError(
                "format: json needs `schema` with the field types of the records, "
                "for example schema: {id: int, name: string}; or use format: raw "
                "to read payloads as bytes"
            )
        if self.format == "raw" and self.schema_:
            raise ValueError(
                "format: raw reads each payload into the binary field `value`; "
                "remove `schema`, or use format: json"
            )
        return self

    def payload_schema(self) -> pa.Schema:
        """Return the schema of the records decoded from payloads."""
        if self.format == "raw":
            return pa.schema([(RAW_FIELD, pa.binary())])
        assert self.schema_ is not None
        return pa.schema([(name, parse_type(t)) for name, t in self.schema_.items()])


@dataclass
class Decoded:
    """Payloads decoded into a batch, and the payloads rejected.

    `kept` lists, for each row of `batch`, the index of its payload in the
    list decoded; `rejected` lists (index, record, reason) for the others,
    where `record` is the parsed object or the payload's text.
    """

    batch: pa.RecordBatch
    kept: list[int]
    rejected: list[tuple[int, Any, str]] = field(default_factory=list)


class PayloadDecoder:
    """Decode message payloads into batches of the config's schema.

    Args:
        config: The connector config with `format` and `schema`.
    """

    def __init__(self, config: PayloadConfig) -> None:
        self.format = config.format
        self.schema = config.payload_schema()
        self._parser = JsonLinesParser(self.schema, "")

    def decode(self, payloads: Sequence[bytes | None]) -> Decoded:
        """Decode `payloads`, each one record.

        Returns:
            The records and the payloads that cannot be records, with the
            reason for each: not JSON, not an object, a value of the wrong
            type, an empty payload or none at all.
        """
        if self.format == "raw":
            batch = pa.RecordBatch.from_arrays(
                [pa.array(payloads, type=pa.binary())], schema=self.schema
            )
            return Decoded(batch, list(range(len(payloads))))
        if not payloads:
            return Decoded(pa.RecordBatch.from_pylist([], schema=self.schema), [])
        fast = self._decode_block(payloads)
        if fast is not None:
            return Decoded(fast, list(range(len(payloads))))
        return self._decode_each(payloads)

    def _decode_block(self, payloads: Sequence[bytes | None]) -> pa.RecordBatch | None:
        lines = []
        for payload in payloads:
            if payload is None or not payload.strip():
                return None
            lines.append(_one_line(payload))
        parsed = self._parser.parse(b"\n".join(lines), 1)
        if parsed.rejects.records or parsed.batch.num_rows != len(payloads):
            return None
        return parsed.batch

    def _decode_each(self, payloads: Sequence[bytes | None]) -> Decoded:
        rows: list[dict[str, Any]] = []
        kept: list[int] = []
        rejected: list[tuple[int, Any, str]] = []
        for index, payload in enumerate(payloads):
            if payload is None:
                rejected.append(
                    (index, None, "message has no payload: expected a JSON object")
                )
                continue
            if not payload.strip():
                rejected.append((index, "", "empty payload: expected a JSON object"))
                continue
            try:
                rows.append(self._parser.parse_line(_one_line(payload)))
            except LineError as exc:
                rejected.append((index, exc.record, exc.reason))
                continue
            kept.append(index)
        batch = pa.RecordBatch.from_pylist(rows, schema=self.schema)
        return Decoded(batch, kept, rejected)


def _one_line(payload: bytes) -> bytes:
    if b"\n" in payload or b"\r" in payload:
        return payload.replace(b"\r", b" ").replace(b"\n", b" ")
    return payload


def payload_text(payload: bytes | None, limit: int = _TEXT_LIMIT) -> str | None:
    """Return a payload as text for the dead-letter output, cut at `limit` bytes."""
    if payload is None:
        return None
    text = payload[:limit].decode("utf-8", errors="replace")
    if len(payload) > limit:
        text += f"... ({len(payload) - limit} more bytes)"
    return text


class PayloadEncoder:
    """Encode records as message payloads, one payload per record.

    Args:
        format: `json` (one JSON object per record, reserved columns left
            out) or `raw` (the bytes of the `value` field).
    """

    def __init__(self, format: Literal["json", "raw"]) -> None:
        self.format = format

    def check(self, schema: pa.Schema | None) -> None:
        """Raise ValueError if records of `schema` cannot become payloads."""
        if self.format != "raw" or schema is None:
            return
        if RAW_FIELD not in schema.names:
            fields = ", ".join(schema.names) or "(none)"
            raise ValueError(
                f"format: raw writes the field {RAW_FIELD!r} as each message's "
                f"payload, but the records have no such field (fields: {fields}); "
                "rename a field to 'value' or use format: json"
            )
        dtype = schema.field(RAW_FIELD).type
        if not (
            pa.types.is_binary(dtype)
            or pa.types.is_large_binary(dtype)
            or pa.types.is_string(dtype)
            or pa.types.is_large_string(dtype)
        ):
            raise ValueError(
                f"format: raw needs the field {RAW_FIELD!r} to be binary or string, "
                f"but it is {dtype}; cast it first or use format: json"
            )

    def encode(self, batch: pa.RecordBatch) -> list[bytes | None]:
        """Return one payload per record of `batch`."""
        if batch.num_rows == 0:
            return []
        if self.format == "raw":
            self.check(batch.schema)
            column = batch.column(RAW_FIELD)
            if not pa.types.is_binary(column.type):
                column = pc.cast(column, pa.binary())
            return column.to_pylist()  # type: ignore[no-any-return]
        reserved = [n for n in batch.schema.names if n in RESERVED_COLUMNS]
        if reserved:
            batch = batch.drop_columns(reserved)
        data = encode_json_lines(batch)
        lines: list[bytes | None] = list(data.rstrip(b"\n").split(b"\n"))
        if len(lines) != batch.num_rows:  # a record with no field gives "{}"
            raise AssertionError("one JSON line per record expected")
        return lines


def text_column(batch: pa.RecordBatch, name: str) -> list[bytes | None]:
    """Return field `name` of `batch` as bytes per record (UTF-8 for text).

    Numbers and other values are written as their text form, so a key field
    of type int gives the key `b"42"`.
    """
    column = batch.column(name)
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column.to_pylist()  # type: ignore[no-any-return]
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    return [None if v is None else v.encode() for v in column.to_pylist()]


def headers_column(batch: pa.RecordBatch) -> list[list[tuple[str, bytes]] | None]:
    """Return the `_headers` column of `batch` as lists of (name, value) pairs.

    Accepts a map or a list of key/value structs with text or binary values.
    """
    values = batch.column("_headers").to_pylist()
    result: list[list[tuple[str, bytes]] | None] = []
    for value in values:
        if value is None:
            result.append(None)
            continue
        pairs = value.items() if isinstance(value, dict) else value
        headers = []
        for pair in pairs:
            key, item = (pair["key"], pair["value"]) if isinstance(pair, dict) else pair
            if isinstance(item, str):
                item = item.encode()
            headers.append((str(key), b"" if item is None else bytes(item)))
        result.append(headers)
    return result

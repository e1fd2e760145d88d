"""JSON records in messages and requests: decoding to batches, encoding back.

The message connectors (`rabbitmq`, `mqtt`, `http`) carry one JSON object
per message, or per element of an HTTP request's array. `JsonRecordDecoder`
turns a list of such payloads into one Arrow batch of a declared schema:

- the fast path joins the payloads into one block of JSON lines and parses
  it with Arrow's JSON reader through `JsonLinesParser`;
- when any payload of the list is bad, the list is decoded again one payload
  at a time, so each bad payload can be rejected with its own position and
  reason while the good ones go on.

A raw line break inside a JSON text can only be whitespace between tokens
(inside strings it must be escaped), so payloads spanning several lines are
joined onto one line before parsing.

`encode_records` does the reverse for sinks: one JSON object per record,
encoded as `jsonl` files encode them (timestamps as ISO 8601 text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from dataflare.connectors.files.base import parse_type
from dataflare.connectors.files.jsonl import (
    JsonLinesParser,
    LineError,
    encode_json_lines,
)
from dataflare.plugin.interface import Origin, PluginConfig


class JsonRecordsConfig(PluginConfig):
    """Config of sources whose messages are JSON objects of a declared schema."""

    schema_: dict[str, str] = Field(
        alias="schema",
        min_length=1,
        description="Field types of the JSON records, e.g. {id: int, name: string}",
    )

    @field_validator("schema_")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        for type_name in value.values():
            parse_type(type_name)
        return value

    def declared_schema(self) -> pa.Schema:
        """Return the Arrow schema named by `schema`."""
        return pa.schema([(name, parse_type(t)) for name, t in self.schema_.items()])


@dataclass(frozen=True)
class MessageOrigin(Origin):
    """Positions of the rows of a batch decoded from messages.

    Row `i` is message `numbers[i]` of `where[i]`, for example
    `rabbitmq queue orders message 17`.
    """

    where: Sequence[str]
    numbers: Sequence[int]
    unit: str = "message"

    def position(self, row: int) -> str:
        return f"{self.where[row]} {self.unit} {self.numbers[row]}"


@dataclass
class Decoded:
    """The result of decoding payloads: a batch and the payloads rejected.

    `kept` contains, for each row of `batch`, the index of its payload in
    the decoded list. `rejected` contains (index, record, reason) for the
    other payloads, where `record` is the parsed object or the payload's text.
    """

    batch: pa.RecordBatch
    kept: list[int]
    rejected: list[tuple[int, Any, str]] = field(default_factory=list)


class JsonRecordDecoder:
    """Decode JSON object payloads into batches of a fixed schema.

    Args:
        schema: The schema of the batches returned.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._parser = JsonLinesParser(schema, "")

    def decode(self, payloads: Sequence[bytes]) -> Decoded:
        """Decode `payloads`, each one JSON object.

        Returns:
            The records that fit the schema and the payloads that do not,
            with the reason for each (not JSON, not an object, a value of
            the wrong type, an empty payload).
        """
        if not payloads:
            return Decoded(pa.RecordBatch.from_pylist([], schema=self.schema), [])
        fast = self._decode_block(payloads)
        if fast is not None:
            return Decoded(fast, list(range(len(payloads))))
        return self._decode_each(payloads)

    def _decode_block(self, payloads: Sequence[bytes]) -> pa.RecordBatch | None:
        lines = []
        for payload in payloads:
            if b"\n" in payload or b"\r" in payload:
                payload = payload.replace(b"\r", b" ").replace(b"\n", b" ")
            if not payload.strip():
                return None
            lines.append(payload)
        parsed = self._parser.parse(b"\n".join(lines), 1)
        if parsed.rejects.records or parsed.batch.num_rows != len(payloads):
            return None
        return parsed.batch

    def _decode_each(self, payloads: Sequence[bytes]) -> Decoded:
        rows: list[dict[str, Any]] = []
        kept: list[int] = []
        rejected: list[tuple[int, Any, str]] = []
        for index, payload in enumerate(payloads):
            if not payload.strip():
                rejected.append((index, "", "empty payload: expected a JSON object"))
                continue
            line = payload.replace(b"\r", b" ").replace(b"\n", b" ")
            try:
                rows.append(self._parser.parse_line(line))
            except LineError as exc:
                rejected.append((index, exc.record, exc.reason))
                continue
            kept.append(index)
        batch = pa.RecordBatch.from_pylist(rows, schema=self.schema)
        return Decoded(batch, kept, rejected)


def encode_records(batch: pa.RecordBatch) -> list[bytes]:
    """Encode each record of `batch` as one JSON object (no line break)."""
    if batch.num_rows == 0:
        return []
    data = encode_json_lines(batch)
    return data.rstrip(b"\n").split(b"\n")


def encode_array(batch: pa.RecordBatch) -> bytes:
    """Encode `batch` as one JSON array of objects."""
    if batch.num_rows == 0:
        return b"[]"
    data = encode_json_lines(batch)
    return b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]"


def payload_text(payload: bytes, limit: int = 65536) -> str:
    """Return a payload as text for the dead-letter output, cut at `limit` bytes."""
    text = payload[:limit].decode("utf-8", errors="replace")
    if len(payload) > limit:
        text += f"... ({len(payload) - limit} more bytes)"
    return text

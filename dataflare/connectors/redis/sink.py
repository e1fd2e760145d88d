"""The Redis Streams sink (type `redis` under `destinations`): XADD per record.

Example::

    destinations:
      events:
        type: redis
        inputs: [clean]
        config:
          url: redis://127.0.0.1:6379/0
          stream: events-clean
          max_length: 1000000

Each record becomes one stream entry whose field `field` (default `data`)
contains the record as one JSON object, or with `format: raw` the bytes of its
`value` field. With `include_metadata: true`, the `_headers` of a record
become further fields of its entry. `max_length` trims the stream to about
that many entries (`XADD MAXLEN ~`).

Entries are added in pipelined chunks of `chunk` records. While Redis is
unreachable the sink retries a chunk with backoff for `reconnect_for`; a
chunk that Redis had partly applied before the connection broke is added
again in full. Records written after the last checkpoint are written again
after a crash. Delivery is therefore at least once.
"""

from __future__ import annotations

import logging
from typing import Literal

import pyarrow as pa
import redis
from pydantic import Field

from dataflare.connectors.common import reconnecting
from dataflare.connectors.payloads import PayloadEncoder, headers_column
from dataflare.connectors.redis.client import CONNECTION_ERRORS, connect
from dataflare.connectors.redis.config import RedisConnectionConfig
from dataflare.plugin.interface import (
    HEADERS,
    OperatorContext,
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    SinkInfo,
)

logger = logging.getLogger(__name__)


class RedisSinkConfig(RedisConnectionConfig, SinkConfig):
    stream: str = Field(min_length=1, description="Key of the stream to add to")
    format: Literal["json", "raw"] = Field(
        "json",
        description="json: each record as one JSON object; raw: the bytes of "
        "the field `value`",
    )
    field: str = Field("data", description="Entry field that contains the payload")
    max_length: int | None = Field(
        None, ge=1, description="Trim the stream to about this many entries"
    )
    chunk: int = Field(1000, ge=1, description="Entries added per round trip")


class RedisSink(Sink[RedisSinkConfig]):
    """Add records to a Redis stream."""

    metadata = PluginMetadata(
        "redis", PluginKind.SINK, "Records to a Redis stream (XADD)"
    )
    Config = RedisSinkConfig

    def __init__(self, config: RedisSinkConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._client: redis.Redis | None = None

    def open(self) -> None:
        self._encoder = PayloadEncoder(self.config.format)
        self._encoder.check(self.input_schema)
        self._client = connect(self.config)
        self._where = f"Redis stream {self.config.stream!r} at {self.config.address()}"

    def close(self) -> None:
        client = self._client
        self._client = None
        if client is not None:
            client.close()

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        payloads = self._encoder.encode(batch)
        extra = (
            headers_column(batch)
            if HEADERS in batch.schema.names
            else [None] * batch.num_rows
        )
        field = self.config.field.encode()
        entries: list[dict[bytes, bytes]] = []
        for payload, pairs in zip(payloads, extra, strict=True):
            entry = {k.encode(): v for k, v in pairs or [] if k.encode() != field}
            entry[field] = payload if payload is not None else b""
            entries.append(entry)
        size = self.config.chunk
        for start in range(0, len(entries), size):
            chunk = entries[start : start + size]
            reconnecting(
                lambda chunk=chunk: self._add(chunk),  # type: ignore[misc]
                step=self.context.step,
                what=f"add {len(chunk)} entries to {self._where}",
                errors=CONNECTION_ERRORS,
                give_up_after=self.config.reconnect_for.total_seconds(),
            )

    def _add(self, entries: list[dict[bytes, bytes]]) -> None:
        client = self._client
        assert client is not None
        pipe = client.pipeline(transaction=False)
        for entry in entries:
            pipe.xadd(
                self.config.stream,
                entry,  # type: ignore[arg-type]
                maxlen=self.config.max_length,
                approximate=True,
            )
        pipe.execute()

    def info(self) -> SinkInfo:
        return SinkInfo(
            paths=[f"redis stream {self.config.stream}"], delivery="at-least-once"
        )

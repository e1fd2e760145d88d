"""The NATS JetStream sink (type `nats` under `destinations`).

Example::

    destinations:
      alerts:
        type: nats
        inputs: [hot]
        config:
          servers: nats://127.0.0.1:4222
          subject: alerts.temperature

Each record becomes one message on `subject`, which a JetStream stream must
capture: its fields as one JSON object, or with `format: raw` the bytes of
its `value` field. With `include_metadata: true`, `_headers` become message
headers. The sink waits for the stream's acknowledgement of every message.

Deduplication: every message carries a `Nats-Msg-Id` header, and the
stream drops a message whose id it has seen within its `duplicate_window`
(two minutes unless the stream sets another). With `id_field`, the id is
that field's value. Otherwise the sink derives it:

- with checkpointing, from a token kept in the checkpoint, the number of
  the checkpoint the record follows, a digest of the payload, and how many
  records with the same payload came before it since that checkpoint. A run
  resumed after a crash writes again the records after the checkpoint, in
  any order, with the same ids, so the stream drops the copies: exactly
  once, as long as the run resumes within the duplicate window;
- without checkpointing, from a token of the run and a counter, so that
  publishes retried after a lost connection are not stored twice.

While NATS is unreachable the sink retries each publish with backoff for
`reconnect_for`; the ids make retries safe.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from typing import Any, Literal

import nats.js.errors
import pyarrow as pa
from pydantic import Field

from dataflare.connectors.nats.client import NatsConnection, NatsConnectionConfig
from dataflare.connectors.payloads import (
    PayloadEncoder,
    headers_column,
    text_column,
)
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

MSG_ID = "Nats-Msg-Id"


class NatsSinkConfig(NatsConnectionConfig, SinkConfig):
    subject: str = Field(min_length=1, description="Subject to publish to")
    format: Literal["json", "raw"] = Field(
        "json",
        description="json: each record as one JSON object; raw: the bytes of "
        "the field `value`",
    )
    id_field: str | None = Field(
        None,
        description="Field whose value is each message's Nats-Msg-Id; by "
        "default the sink derives ids",
    )
    max_in_flight: int = Field(
        1000, ge=1, description="Maximum messages published before waiting for acks"
    )


class NatsSink(Sink[NatsSinkConfig]):
    """Publish records to JetStream with ids for broker-side deduplication."""

    metadata = PluginMetadata(
        "nats", PluginKind.SINK, "Records to a NATS JetStream subject"
    )
    Config = NatsSinkConfig

    def __init__(self, config: NatsSinkConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._conn: NatsConnection | None = None
        self._token = uuid.uuid4().hex[:16]
        self._epoch = 0
        self._counter = 0
        self._seen: dict[bytes, int] = {}
        self.duplicates = 0

    def open(self) -> None:
        config = self.config
        self._encoder = PayloadEncoder(config.format)
        self._encoder.check(self.input_schema)
        schema = self.input_schema
        if config.id_field is not None and schema is not None:  # noqa: SIM102
            if config.id_field not in schema.names:
                raise ValueError(
                    f"id_field {config.id_field!r} is not in the records reaching "
                    f"step {self.context.step!r} (fields: {', '.join(schema.names)})"
                )
        self._conn = NatsConnection(config, self.context.step, None)
        self._stream = self._conn.retry(
            self._find_stream,
            f"find the JetStream stream of subject {config.subject!r}",
        )

    async def _find_stream(self) -> str:
        assert self._conn is not None and self._conn.client is not None
        js = self._conn.client.jetstream()
        try:
            name: str = await js.find_stream_name_by_subject(self.config.subject)
        except nats.js.errors.NotFoundError:
            raise ValueError(
                f"no JetStream stream at {self.config.address()} captures subject "
                f"{self.config.subject!r}; create one (for example `nats stream "
                f"add --subjects {self.config.subject}`) or fix the subject"
            ) from None
        return name

    def close(self) -> None:
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.close()

    # --- writing ---

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        payloads = [p if p is not None else b"" for p in self._encoder.encode(batch)]
        extra = (
            headers_column(batch)
            if HEADERS in batch.schema.names
            else [None] * batch.num_rows
        )
        ids = self._ids(batch, payloads)
        messages: list[tuple[bytes, dict[str, str]]] = []
        for payload, pairs, message_id in zip(payloads, extra, ids, strict=True):
            headers = {k: v.decode("utf-8", "replace") for k, v in pairs or []}
            headers[MSG_ID] = message_id
            messages.append((payload, headers))
        size = self.config.max_in_flight
        for start in range(0, len(messages), size):
            self._publish(messages[start : start + size])

    def _ids(self, batch: pa.RecordBatch, payloads: list[bytes]) -> list[str]:
        if self.config.id_field is not None:
            values = text_column(batch, self.config.id_field)
            for row, value in enumerate(values):
                if value is None:
                    raise ValueError(
                        f"step {self.context.step!r}: id_field "
                        f"{self.config.id_field!r} is null in a record; every "
                        f"message needs an id (record {row + 1} of the batch: "
                        f"{batch.slice(row, 1).to_pylist()[0]})"
                    )
            return [v.decode("utf-8", "replace") for v in values if v is not None]
        if not self.transactional:
            first = self._counter
            self._counter += len(payloads)
            return [f"{self._token}.{first + i}" for i in range(len(payloads))]
        ids = []
        for payload in payloads:
            digest = hashlib.blake2b(payload, digest_size=12).digest()
            count = self._seen.get(digest, 0)
            self._seen[digest] = count + 1
            ids.append(f"{self._token}.{self._epoch}.{digest.hex()}.{count}")
        return ids

    def _publish(self, messages: list[tuple[bytes, dict[str, str]]]) -> None:
        assert self._conn is not None
        subject = self.config.subject

        async def publish() -> list[Any]:
            assert self._conn is not None and self._conn.client is not None
            js = self._conn.client.jetstream()
            futures = [
                await js.publish_async(subject, payload, headers=dict(headers))
                for payload, headers in messages
            ]
            return await asyncio.wait_for(asyncio.gather(*futures), timeout=10)

        acks = self._conn.retry(
            publish, f"publish to NATS subject {subject!r}", timeout=30
        )
        duplicates = sum(1 for ack in acks if getattr(ack, "duplicate", False))
        if duplicates:
            self.duplicates += duplicates
            self.context.count("deduplicated", duplicates)

    # --- checkpoints ---

    def prepare_commit(self, checkpoint_id: int) -> Any:
        """Start a new id epoch: records after this barrier follow `checkpoint_id`.

        Every record written so far has been acknowledged by the stream, so
        only the token needs keeping.
        """
        self._epoch = checkpoint_id
        self._seen = {}
        return {"token": self._token}

    def restore(self, state: Any, checkpoint_id: int) -> None:
        """Take up the ids of the run that wrote checkpoint `checkpoint_id`."""
        if state and state.get("token"):
            self._token = str(state["token"])
        self._epoch = checkpoint_id
        self._seen = {}

    def info(self) -> SinkInfo:
        delivery = "exactly-once" if self.transactional else "at-least-once"
        return SinkInfo(
            paths=[f"nats subject {self.config.subject}"], delivery=delivery
        )

"""The Kafka sink (type `kafka` under `destinations`): one message per record.

Example::

    destinations:
      enriched:
        type: kafka
        inputs: [named]
        config:
          bootstrap_servers: 127.0.0.1:9092
          topic: orders-enriched
          key: order_id

Each record becomes one message: its fields as one JSON object, or with
`format: raw` the bytes of its `value` field. `key` names the field whose
value becomes the message key (text as UTF-8, other types as their text),
so records with the same key go to the same partition. With
`include_metadata: true`, the reserved columns travel as message metadata
instead of payload fields: `_key` is the key (unless `key` is set),
`_headers` the headers and `_event_time` the message timestamp.

Delivery: the producer is idempotent (`enable.idempotence`), so the
brokers discard the copies its own retries would write. At a checkpoint
the sink waits until the brokers have acknowledged every record written
before it, so nothing is lost; records written after the last checkpoint
are written again after a crash: at least once. The sink does not use Kafka
transactions: the broker the tests run against (tansu 0.6) accepts
transactions but still hands aborted records to `read_committed` readers,
so exactly-once could not be verified.

While the brokers are unreachable, librdkafka keeps the records and
reconnects with backoff; the sink gives up after `reconnect_for`. If the
producer fails for good (for example a broker restarted and forgot the
producer's sequence numbers), the sink starts a new producer and sends
again the records not yet acknowledged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from pydantic import Field

from dataflare.connectors.kafka.client import (
    ErrorReporter,
    KafkaConnectionConfig,
    LibrdkafkaLog,
)
from dataflare.connectors.payloads import (
    PayloadEncoder,
    headers_column,
    text_column,
)
from dataflare.plugin.interface import (
    EVENT_TIME,
    HEADERS,
    KEY,
    OperatorContext,
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    SinkInfo,
)

logger = logging.getLogger(__name__)

Pending = tuple[bytes | None, bytes | None, Any, int | None]
"""A record to send again: payload, key, headers and timestamp (ms)."""


class KafkaSinkConfig(KafkaConnectionConfig, SinkConfig):
    topic: str = Field(min_length=1, description="Topic to write to")
    format: Literal["json", "raw"] = Field(
        "json",
        description="json: each record as one JSON object; raw: the bytes of "
        "the field `value`",
    )
    key: str | None = Field(
        None, description="Field whose value becomes the message key"
    )
    create_topic: bool = Field(
        False, description="Create the topic when it does not exist"
    )
    partitions: int = Field(
        1, ge=1, description="Partitions of a topic created with create_topic"
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Compression of message batches"
    )
    linger_ms: int = Field(
        5, ge=0, description="How long the producer waits to fill a batch"
    )


class KafkaSink(Sink[KafkaSinkConfig]):
    """Write records to a Kafka topic with an idempotent producer."""

    metadata = PluginMetadata(
        "kafka", PluginKind.SINK, "Records to a Kafka topic (one per message)"
    )
    Config = KafkaSinkConfig

    def __init__(self, config: KafkaSinkConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._producer: Producer | None = None
        self._resend: list[Pending] = []
        self._failure: str | None = None

    def open(self) -> None:
        config = self.config
        self._encoder = PayloadEncoder(config.format)
        self._encoder.check(self.input_schema)
        schema = self.input_schema
        if (
            config.key is not None
            and schema is not None
            and config.key not in schema.names
        ):
            raise ValueError(
                f"key field {config.key!r} is not in the records reaching step "
                f"{self.context.step!r} (fields: {', '.join(schema.names)}); name "
                "one of them"
            )
        self._servers = config.servers()
        if config.create_topic:
            self._create_topic()
        self._producer = self._new_producer()

    def _settings(self) -> dict[str, Any]:
        config = self.config
        settings = config.client_config()
        settings.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": config.compression,
                "linger.ms": config.linger_ms,
                "message.timeout.ms": int(config.reconnect_for.total_seconds() * 1000),
                "logger": LibrdkafkaLog(),
            }
        )
        return settings

    def _new_producer(self) -> Producer:
        self._errors = ErrorReporter(self.context.step, self._servers)
        settings = self._settings()
        settings["error_cb"] = self._errors
        return Producer(settings)

    def _create_topic(self) -> None:
        config = self.config
        admin = AdminClient(
            {k: v for k, v in self._settings().items() if not _producer_only(k)}
        )
        futures = admin.create_topics(
            [NewTopic(config.topic, num_partitions=config.partitions)]
        )
        try:
            futures[config.topic].result(30)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if (
                isinstance(error, KafkaError)
                and error.code() == KafkaError.TOPIC_ALREADY_EXISTS
            ):
                return
            raise ValueError(
                f"cannot create Kafka topic {config.topic!r} at {self._servers}: "
                f"{exc}; create it yourself or check the broker"
            ) from None
        logger.info(
            "step %r: created Kafka topic %r with %d partitions",
            self.context.step,
            config.topic,
            config.partitions,
        )

    def close(self) -> None:
        producer = self._producer
        self._producer = None
        if producer is not None:
            producer.flush(5)

    # --- writing ---

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        payloads = self._encoder.encode(batch)
        keys = self._keys(batch)
        headers = (
            headers_column(batch)
            if HEADERS in batch.schema.names
            else [None] * batch.num_rows
        )
        stamps = self._timestamps(batch)
        for record in zip(payloads, keys, headers, stamps, strict=True):
            self._send(record)
        self._check()

    def _keys(self, batch: pa.RecordBatch) -> list[bytes | None]:
        name = self.config.key
        if name is None and KEY in batch.schema.names:
            name = KEY
        if name is None:
            return [None] * batch.num_rows
        return text_column(batch, name)

    def _timestamps(self, batch: pa.RecordBatch) -> list[int | None]:
        if EVENT_TIME not in batch.schema.names:
            return [None] * batch.num_rows
        column = batch.column(EVENT_TIME).cast(pa.timestamp("us", tz="UTC"))
        millis = pc.divide(column.cast(pa.int64()), 1000)
        return millis.to_pylist()  # type: ignore[no-any-return]

    def _send(self, record: Pending) -> None:
        value, key, headers, stamp = record
        while True:
            producer = self._live_producer()
            try:
                if stamp is None:
                    producer.produce(
                        self.config.topic,
                        value=value,
                        key=key,
                        headers=headers,
                        on_delivery=self._delivered,
                    )
                else:
                    producer.produce(
                        self.config.topic,
                        value=value,
                        key=key,
                        headers=headers,
                        timestamp=stamp,
                        on_delivery=self._delivered,
                    )
                producer.poll(0)
                return
            except BufferError:
                # The local queue is full: let deliveries make room.
                producer.poll(0.1)
            except KafkaException as exc:
                if self._errors.fatal is None:
                    raise self._error(
                        f"cannot send to {self._target()}: {exc}"
                    ) from None
                # A fatal producer error: _live_producer starts a new one.

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self._errors.working()
            return
        timestamp_type, stamp = message.timestamp()
        record: Pending = (
            message.value(),
            message.key(),
            message.headers(),
            stamp if timestamp_type != 0 else None,  # 0 means "not available"
        )
        if error.fatal() or error.code() == KafkaError._FATAL or error.retriable():
            self._resend.append(record)
        elif error.code() == KafkaError._MSG_TIMED_OUT:
            self._failure = (
                f"records could not be delivered to {self._target()} within "
                f"reconnect_for ({self.config.reconnect_for}): {error.str()}; "
                "check that the brokers are up and reachable"
            )
        else:
            self._failure = (
                f"Kafka rejected a record for {self._target()}: {error.str()}"
            )

    def _live_producer(self) -> Producer:
        """Return the producer, replacing it after a fatal error."""
        producer = self._producer
        assert producer is not None
        if self._errors.fatal is None:
            return producer
        fatal = self._errors.fatal
        producer.flush(0)  # collect the failed deliveries to send again
        logger.warning(
            "step %r: starting a new Kafka producer after a fatal error (%s); "
            "records not yet acknowledged are sent again",
            self.context.step,
            fatal.str(),
        )
        self._producer = self._new_producer()
        return self._producer

    def _check(self) -> None:
        if self._failure is not None:
            raise self._error(self._failure)
        if self._resend:
            records, self._resend = self._resend, []
            for record in records:
                self._send(record)

    def flush(self) -> None:
        """Wait until the brokers have acknowledged every record written."""
        deadline = time.monotonic() + self.config.reconnect_for.total_seconds() + 30
        while True:
            producer = self._live_producer()
            remaining = producer.flush(1.0)
            self._check()
            if remaining == 0 and not self._resend and self._errors.fatal is None:
                return
            if time.monotonic() > deadline:
                raise self._error(
                    f"{remaining} records were not acknowledged by {self._target()} "
                    f"within reconnect_for ({self.config.reconnect_for}); check "
                    "that the brokers are up"
                )

    def _target(self) -> str:
        return f"Kafka topic {self.config.topic!r} at {self._servers}"

    def _error(self, message: str) -> RuntimeError:
        return RuntimeError(f"step {self.context.step!r}: {message}")

    def info(self) -> SinkInfo:
        return SinkInfo(
            paths=[f"kafka://{self.config.servers()}/{self.config.topic}"],
            delivery="at-least-once",
        )


def _producer_only(key: str) -> bool:
    return key in {
        "enable.idempotence",
        "acks",
        "compression.type",
        "linger.ms",
        "message.timeout.ms",
    }

"""The Kafka source (type `kafka`): records from the partitions of topics.

Example::

    sources:
      orders:
        type: kafka
        config:
          bootstrap_servers: 127.0.0.1:9092
          topic: orders
          group_id: orders-etl
          schema: {id: int, item: string, at: timestamp}

Each message carries one record: a JSON object of `schema`, or with
`format: raw` the payload bytes in the field `value`. The reserved columns
`_key` (text, or bytes with `key_format: binary`), `_headers` (map of name
to bytes), `_partition` and `_offset` carry the message's metadata. A
message whose payload does not fit goes to the dead-letter output with the
position `kafka topic T partition P offset O`.

Partitions: the partitions of all topics, in (topic, partition) order, are
dealt round-robin to the step's parallel instances, so instance `i` of `n`
reads the partitions at positions `i`, `i + n`, ... The source assigns them
itself rather than letting the group coordinator balance them, so that a
checkpoint's offsets always belong to the instance that resumes from them.
Partitions added while the run goes on are picked up by the next run.

Offsets: a partition starts at the offset saved in the checkpoint the run
resumes from; else at the offset committed for `group_id`; else at the
`start_from` end of the partition.

- With checkpointing, each checkpoint stores the next offset of every
  partition (`snapshot_position`), and the offsets are committed to the
  group once the checkpoint is complete (`notify_checkpoint_complete`), so
  tools that watch the group's lag see only what is safely processed. A run
  resumed from a checkpoint reads exactly the messages after it.
- Without checkpointing, offsets are committed after each batch has been
  handed to the pipeline; a crash loses the records still on their way.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import pyarrow as pa
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from pydantic import Field

from dataflare.connectors.common import reconnecting
from dataflare.connectors.kafka.client import (
    ErrorReporter,
    KafkaConnectionConfig,
    LibrdkafkaLog,
)
from dataflare.connectors.payloads import (
    HEADERS_TYPE,
    PayloadConfig,
    PayloadDecoder,
    payload_text,
)
from dataflare.plugin.interface import (
    HEADERS,
    IDLE,
    KEY,
    OFFSET,
    PARTITION,
    Idle,
    OperatorContext,
    Origin,
    PluginKind,
    PluginMetadata,
    Source,
    SourceBatch,
)
from dataflare.state.checkpoint import FINAL_CHECKPOINT
from dataflare.streaming.spec import Duration

logger = logging.getLogger(__name__)

Partition = tuple[str, int]


class KafkaSourceConfig(KafkaConnectionConfig, PayloadConfig):
    topic: str | list[str] = Field(description="Topic, or list of topics, to read")
    group_id: str = Field(
        min_length=1, description="Consumer group whose offsets are committed"
    )
    start_from: Literal["earliest", "latest"] = Field(
        "earliest",
        description="Where a partition starts without a checkpoint or a "
        "committed offset",
    )
    key_format: Literal["string", "binary"] = Field(
        "string", description="Type of the `_key` column: UTF-8 text or bytes"
    )
    max_batch: int = Field(
        10000, ge=1, description="Maximum messages taken in one poll (one batch)"
    )
    poll_timeout: Duration = Field(
        timedelta(milliseconds=100),
        description="How long one poll waits for messages before the source "
        "reports itself idle",
    )

    def topics(self) -> list[str]:
        return [self.topic] if isinstance(self.topic, str) else list(self.topic)


@dataclass(frozen=True)
class KafkaOrigin(Origin):
    """Positions of the rows of one batch: topic, partition and offset each."""

    topics: Sequence[str]
    partitions: Sequence[int]
    offsets: Sequence[int]

    def position(self, row: int) -> str:
        return position(self.topics[row], self.partitions[row], self.offsets[row])


def position(topic: str, partition: int, offset: int) -> str:
    """Return the dead-letter position of one message."""
    return f"kafka topic {topic} partition {partition} offset {offset}"


class KafkaSource(Source[KafkaSourceConfig]):
    """Read records from Kafka topics; offsets go into checkpoints."""

    metadata = PluginMetadata(
        "kafka", PluginKind.SOURCE, "Records from Kafka topics (one per message)"
    )
    Config = KafkaSourceConfig

    def __init__(self, config: KafkaSourceConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._consumer: Consumer | None = None
        self._next: dict[Partition, int] = {}  # next offset to read
        self._restored: dict[Partition, int] = {}
        self._snapshots: collections.deque[dict[Partition, int]] = collections.deque()
        self._committed: dict[Partition, int] = {}
        self._partitions: list[Partition] = []
        self._assigned = False

    @property
    def bounded(self) -> bool:
        return False

    def schema(self) -> pa.Schema:
        key_type = pa.string() if self.config.key_format == "string" else pa.binary()
        payload = self.config.payload_schema()
        return pa.schema(
            [
                *payload,
                pa.field(KEY, key_type),
                pa.field(HEADERS, HEADERS_TYPE),
                pa.field(PARTITION, pa.int32()),
                pa.field(OFFSET, pa.int64()),
            ]
        )

    # --- lifecycle ---

    def open(self) -> None:
        config = self.config
        self._schema = self.schema()
        self._decoder = PayloadDecoder(config)
        self._checkpointing = bool(getattr(self.context, "checkpointing", False))
        self._servers = config.servers()
        self._errors = ErrorReporter(self.context.step, self._servers)
        settings = config.client_config()
        settings.update(
            {
                "group.id": config.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": config.start_from,
                "error_cb": self._errors,
                "on_commit": self._on_commit,
                "logger": LibrdkafkaLog(),
            }
        )
        self._consumer = Consumer(settings)
        self._partitions = self._mine(self._all_partitions())

    def close(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        try:
            if not self._checkpointing and self._next:
                self._commit(self._next, wait=True)
        finally:
            self._consumer = None
            consumer.close()

    # --- partitions and offsets ---

    def _all_partitions(self) -> list[Partition]:
        """List every partition of the configured topics, sorted."""
        consumer = self._consumer
        assert consumer is not None
        timeout = 10.0
        found: list[Partition] = []
        for topic in self.config.topics():
            metadata = reconnecting(
                lambda topic=topic: consumer.list_topics(  # type: ignore[misc]
                    topic, timeout=timeout
                ),
                step=self.context.step,
                what=f"read the partitions of Kafka topic {topic!r} at {self._servers}",
                errors=(KafkaException,),
                give_up_after=self.config.reconnect_for.total_seconds(),
                should_stop=lambda: self.context.stopping,
            )
            described = metadata.topics.get(topic)
            error = described.error if described is not None else None
            if described is None or error is not None or not described.partitions:
                reason = error.str() if error is not None else "no partitions"
                raise ValueError(
                    f"Kafka topic {topic!r} at {self._servers} cannot be read "
                    f"({reason}); check the topic name or create the topic first"
                )
            found += [(topic, p) for p in described.partitions]
        return sorted(found)

    def _mine(self, partitions: list[Partition]) -> list[Partition]:
        """Return the partitions this parallel instance reads."""
        count = max(self.context.parallelism, 1)
        mine = partitions[self.context.instance :: count]
        if not mine:
            logger.warning(
                "step %r instance %d: no partition to read (%d partitions for %d "
                "instances); this instance stays idle",
                self.context.step,
                self.context.instance,
                len(partitions),
                count,
            )
        return mine

    def _assign(self) -> None:
        """Assign this instance's partitions at their starting offsets."""
        consumer = self._consumer
        assert consumer is not None
        self._assigned = True
        if not self._partitions:
            return
        requested = [TopicPartition(t, p) for t, p in self._partitions]
        committed = reconnecting(
            lambda: consumer.committed(requested, timeout=10.0),
            step=self.context.step,
            what=f"read the committed offsets of group {self.config.group_id!r}",
            errors=(KafkaException,),
            give_up_after=self.config.reconnect_for.total_seconds(),
            should_stop=lambda: self.context.stopping,
        )
        start = OFFSET_BEGINNING if self.config.start_from == "earliest" else OFFSET_END
        assignment = []
        for tp in committed:
            key = (tp.topic, tp.partition)
            if key in self._restored:
                offset = self._restored[key]
            elif tp.offset >= 0:
                offset = tp.offset
            else:
                offset = start
            if offset >= 0:
                self._next[key] = offset
            assignment.append(TopicPartition(tp.topic, tp.partition, offset))
        consumer.assign(assignment)
        logger.info(
            "step %r instance %d reads %s",
            self.context.step,
            self.context.instance,
            ", ".join(f"{t}[{p}]" for t, p in self._partitions),
        )

    def snapshot_position(self) -> Any:
        """Return the next offset of every partition read so far."""
        offsets = dict(self._next)
        self._snapshots.append(offsets)
        return {"offsets": [[t, p, o] for (t, p), o in sorted(offsets.items())]}

    def restore_position(self, position: Any) -> None:
        """Start each partition at the offset saved in a checkpoint."""
        if not position:
            return
        self._restored = {(str(t), int(p)): int(o) for t, p, o in position["offsets"]}

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Commit the offsets of checkpoint `checkpoint_id` to the group.

        Checkpoints complete in the order they were taken, so the oldest
        snapshot not yet committed belongs to this checkpoint. The final
        checkpoint of a run commits every offset read.
        """
        if checkpoint_id >= FINAL_CHECKPOINT:
            self._snapshots.clear()
            self._commit(self._next, wait=True)
        elif self._snapshots:
            self._commit(self._snapshots.popleft(), wait=False)

    def _commit(self, offsets: dict[Partition, int], *, wait: bool) -> None:
        changed = {k: v for k, v in offsets.items() if self._committed.get(k) != v}
        consumer = self._consumer
        if not changed or consumer is None:
            return
        partitions = [TopicPartition(t, p, o) for (t, p), o in changed.items()]
        try:
            if wait:
                consumer.commit(offsets=partitions, asynchronous=False)
            else:
                consumer.commit(offsets=partitions, asynchronous=True)
        except KafkaException as exc:
            # The offsets are safe in the checkpoint; the next commit covers them.
            logger.warning(
                "step %r: could not commit offsets of group %r to Kafka at %s: %s; "
                "the next checkpoint commits them",
                self.context.step,
                self.config.group_id,
                self._servers,
                exc,
            )
            return
        self._committed.update(changed)

    def _on_commit(self, error: KafkaError | None, partitions: Any) -> None:
        if error is not None:
            logger.warning(
                "step %r: committing offsets of group %r failed: %s; the next "
                "commit covers them",
                self.context.step,
                self.config.group_id,
                error.str(),
            )

    # --- reading ---

    def read(self) -> Iterator[SourceBatch | Idle]:
        consumer = self._consumer
        assert consumer is not None
        if not self._assigned:
            self._assign()
        timeout = self.config.poll_timeout.total_seconds()
        while not self.context.stopping:
            if self._errors.fatal is not None:
                raise RuntimeError(
                    f"the Kafka consumer of step {self.context.step!r} failed: "
                    f"{self._errors.fatal.str()}"
                )
            messages = consumer.consume(self.config.max_batch, timeout)
            batch = self._decode([m for m in messages if self._usable(m)])
            if batch is None:
                yield IDLE
                continue
            self._errors.working()
            if batch.batch.num_rows:
                yield batch
            if not self._checkpointing:
                self._commit(self._next, wait=False)

    def _usable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() == KafkaError._PARTITION_EOF:
            return False
        if error.fatal() or not error.retriable():
            raise RuntimeError(
                f"step {self.context.step!r} cannot read Kafka topic "
                f"{message.topic()!r} partition {message.partition()}: {error.str()}"
            )
        logger.warning(
            "step %r: reading Kafka topic %r: %s; retrying",
            self.context.step,
            message.topic(),
            error.str(),
        )
        return False

    def _decode(self, messages: list[Message]) -> SourceBatch | None:
        """Turn messages into a batch; reject those that do not fit."""
        if not messages:
            return None
        topics: list[str] = []
        partitions: list[int] = []
        offsets: list[int] = []
        keys: list[Any] = []
        headers: list[Any] = []
        payloads: list[bytes | None] = []
        rejected: list[tuple[int, Any, str, str]] = []  # (offset, ...)
        text_keys = self.config.key_format == "string"
        for message in messages:
            topic, partition, offset = (
                message.topic() or "",
                message.partition() or 0,
                message.offset() or 0,
            )
            self._next[(topic, partition)] = offset + 1
            key: bytes | str | None = message.key()
            if text_keys and isinstance(key, bytes):
                try:
                    key = key.decode("utf-8")
                except UnicodeDecodeError:
                    rejected.append(
                        (
                            offset,
                            payload_text(message.value()),
                            "the message key is not UTF-8 text; set "
                            "key_format: binary to read keys as bytes",
                            position(topic, partition, offset),
                        )
                    )
                    continue
            topics.append(topic)
            partitions.append(partition)
            offsets.append(offset)
            keys.append(key)
            headers.append(message.headers())
            payloads.append(message.value())
        decoded = self._decoder.decode(payloads)
        for index, record, reason in decoded.rejected:
            if isinstance(record, bytes):
                record = payload_text(record)
            where = position(topics[index], partitions[index], offsets[index])
            rejected.append((offsets[index], record, reason, where))
        if rejected:
            rejected.sort(key=lambda r: r[0])
            self.context.reject(
                [r for _, r, _, _ in rejected],
                [reason for _, _, reason, _ in rejected],
                [where for _, _, _, where in rejected],
            )
        kept = decoded.kept
        if len(kept) != len(payloads):
            topics = [topics[i] for i in kept]
            partitions = [partitions[i] for i in kept]
            offsets = [offsets[i] for i in kept]
            keys = [keys[i] for i in kept]
            headers = [headers[i] for i in kept]
        schema = self._schema
        columns = [
            *decoded.batch.columns,
            pa.array(keys, type=schema.field(KEY).type),
            pa.array(headers, type=HEADERS_TYPE),
            pa.array(partitions, type=pa.int32()),
            pa.array(offsets, type=pa.int64()),
        ]
        batch = pa.RecordBatch.from_arrays(columns, schema=schema)
        return SourceBatch(batch, KafkaOrigin(topics, partitions, offsets))

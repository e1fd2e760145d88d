"""The MQTT source: JSON messages from topics, QoS 1, persistent session.

Example::

    sources:
      readings:
        type: mqtt
        config:
          topics: [sensors/+/reading]
          client_id: dataflare-readings     # fixed: the broker keeps the session
          schema: {sensor: string, value: float, at: timestamp}

The source connects with MQTT 3.1.1, `clean_session: false` and the fixed
`client_id`, and subscribes with QoS 1. The broker keeps the subscription
and the QoS 1 messages published while the pipeline is down and delivers
them when the source connects again. The session starts with the first
connection: messages published before the source ever connected are not
kept.

Each message's payload is one JSON object. A payload that is not one, or
whose values do not fit the schema, goes to the dead-letter output with the
position `mqtt topic TOPIC message N`, where N counts the messages received.

Acknowledgements (`acknowledge`), sent in the order messages arrived:

- `receive` (default): a message is acknowledged (PUBACK) as soon as it is
  in the source's buffer, while the buffer holds fewer than
  `buffer_messages`; once it is full, acknowledgements wait until the
  pipeline takes messages, so the broker holds back the rest. A graceful
  stop passes every acknowledged message on; a crash loses those still in
  the buffer or on their way through the pipeline.
- `checkpoint`: a message is acknowledged once a checkpoint taken after it
  was emitted is complete, so after a crash the broker delivers the others
  again. Without checkpointing the source acts as with `receive`.

Broker limits: Mosquitto sends a client at most `max_inflight_messages`
unacknowledged messages (20 by default) and queues at most
`max_queued_messages` more for it (1000 by default), dropping QoS 1
messages beyond that. With `checkpoint`, the source reads at most
`max_inflight_messages` messages per checkpoint interval, so raise both
limits before choosing it; with either mode, a publisher that outruns the
pipeline by more than the queue limit loses messages at the broker.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pyarrow as pa
from pydantic import Field

from dataflare.connectors.http.records import (
    JsonRecordDecoder,
    JsonRecordsConfig,
    MessageOrigin,
    payload_text,
)
from dataflare.connectors.mqtt.client import QOS, MqttConnectionConfig, MqttSession
from dataflare.plugin.interface import (
    IDLE,
    Idle,
    OperatorContext,
    PluginKind,
    PluginMetadata,
    Source,
    SourceBatch,
)
from dataflare.streaming.spec import Duration


class MqttSourceConfig(MqttConnectionConfig, JsonRecordsConfig):
    topics: list[str] = Field(
        min_length=1, description="Topic filters to subscribe to (+ and # allowed)"
    )
    client_id: str = Field(
        min_length=1,
        description="Fixed client id: the broker keeps the session (subscriptions "
        "and undelivered messages) under it",
    )
    acknowledge: Literal["receive", "checkpoint"] = Field(
        "receive",
        description="When messages are acknowledged: once in the source's buffer, "
        "or once a completed checkpoint covers them",
    )
    buffer_messages: int = Field(
        10_000,
        ge=1,
        description="Messages received and not yet taken by the pipeline, beyond "
        "which acknowledgements wait (acknowledge: receive)",
    )
    batch_messages: int = Field(
        5_000, ge=1, description="Maximum messages per emitted batch"
    )
    poll_interval: Duration = Field(
        timedelta(milliseconds=100),
        description="How long to wait for messages before reporting the source idle",
    )


@dataclass(slots=True)
class _Received:
    generation: int  # the connection it came on
    message: mqtt.MQTTMessage
    acked: bool


class MqttSource(Source[MqttSourceConfig]):
    """Receive JSON messages from MQTT topics with a persistent QoS 1 session."""

    metadata = PluginMetadata(
        "mqtt",
        PluginKind.SOURCE,
        "JSON messages from MQTT topics (QoS 1, persistent session)",
    )
    Config = MqttSourceConfig

    def __init__(self, config: MqttSourceConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._schema = config.declared_schema()
        self._session: MqttSession | None = None
        self._lock = threading.Lock()  # guards the buffer and what follows
        self._buffer: collections.deque[_Received] = collections.deque()
        self._waiting_acks = 0  # messages in the buffer not acknowledged
        self._accepting = True
        self._arrived = threading.Event()
        self._received = 0
        # acknowledge: checkpoint. Emitted and not acknowledged, oldest
        # first, all of one connection.
        self._unacked: collections.deque[mqtt.MQTTMessage] = collections.deque()
        self._unacked_generation = 0
        self._emitted = 0  # messages emitted on that connection
        self._acked = 0  # of which acknowledged
        self._snapshots: collections.deque[tuple[int, int]] = collections.deque()
        self._ended = False  # read() returned: every later checkpoint covers all

    @property
    def bounded(self) -> bool:
        return False

    def schema(self) -> pa.Schema:
        return self._schema

    def open(self) -> None:
        if self.context.parallelism > 1:
            raise ValueError(
                f"the mqtt source {self.context.step!r} runs as one instance: "
                "instances would share the client id and each receive every "
                "message; remove `parallelism`"
            )
        self._decoder = JsonRecordDecoder(self._schema)
        checkpointing = bool(getattr(self.context, "checkpointing", False))
        self._ack_on_checkpoint = (
            checkpointing and self.config.acknowledge == "checkpoint"
        )
        self._session = MqttSession(
            self.config,
            self.config.client_id,
            clean_session=False,
            step=self.context.step,
            topics=self.config.topics,
            on_message=self._on_message,
        )
        self._session.start(lambda: self.context.stopping)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    # --- receiving (on the I/O thread) ---

    def _on_message(self, generation: int, message: mqtt.MQTTMessage) -> None:
        session = self._session
        with self._lock:
            if not self._accepting or session is None:
                return  # not acknowledged: the broker delivers it again
            item = _Received(generation, message, acked=False)
            if self._ack_on_checkpoint:
                pass
            elif self._waiting_acks or len(self._buffer) >= self.config.buffer_messages:
                self._waiting_acks += 1
            else:
                session.client.ack(message.mid, QOS)
                item.acked = True
            self._buffer.append(item)
        self._arrived.set()

    def _take(self, timeout: float) -> list[_Received]:
        """Take buffered messages, acknowledging them with `receive`."""
        if not self._buffer and timeout > 0:
            self._arrived.wait(timeout)
        self._arrived.clear()
        session = self._session
        assert session is not None
        taken: list[_Received] = []
        with self._lock:
            while self._buffer and len(taken) < self.config.batch_messages:
                taken.append(self._buffer.popleft())
            if not self._ack_on_checkpoint:
                self._acknowledge_waiting(taken, session)
            if self._buffer:
                self._arrived.set()
        current = session.generation
        # Messages not acknowledged on an earlier connection come again.
        return [m for m in taken if m.acked or m.generation == current]

    def _acknowledge_waiting(
        self, taken: list[_Received], session: MqttSession
    ) -> None:
        """Acknowledge, in order, the messages whose acknowledgement waited."""
        if not self._waiting_acks:
            return
        room = len(self._buffer) < self.config.buffer_messages
        pending = [m for m in taken if not m.acked]
        if room:
            pending += [m for m in self._buffer if not m.acked]
        for item in pending:
            if item.generation == session.generation:
                session.client.ack(item.message.mid, QOS)
                item.acked = True
            self._waiting_acks -= 1

    # --- reading ---

    def read(self) -> Iterator[SourceBatch | Idle]:
        timeout = self.config.poll_interval.total_seconds()
        session = self._session
        assert session is not None
        while True:
            session.raise_failure()
            stopping = self.context.stopping
            if stopping:
                self._ended = True
                if self._ack_on_checkpoint:
                    return  # what was not emitted is not acknowledged
                with self._lock:
                    self._accepting = False  # pass on what was acknowledged
            taken = self._take(0 if stopping else timeout)
            if not taken:
                if stopping:
                    return
                yield IDLE
                continue
            messages = [item.message for item in taken]
            if self._ack_on_checkpoint:
                self._track(taken[0].generation, messages)
            batch = self._decode(messages)
            if batch is not None:
                yield batch

    def _track(self, generation: int, messages: list[mqtt.MQTTMessage]) -> None:
        """Count `messages` as emitted, before the yield that emits them."""
        if generation != self._unacked_generation:
            # A new connection: the broker delivers anything not
            # acknowledged on the old one again.
            self._unacked.clear()
            self._snapshots.clear()
            self._unacked_generation = generation
            self._emitted = self._acked = 0
        self._unacked.extend(messages)
        self._emitted += len(messages)

    def _decode(self, messages: list[mqtt.MQTTMessage]) -> SourceBatch | None:
        first = self._received + 1
        self._received += len(messages)
        decoded = self._decoder.decode([bytes(m.payload) for m in messages])
        where = [f"mqtt topic {m.topic}" for m in messages]
        if decoded.rejected:
            self.context.reject(
                [
                    payload_text(record) if isinstance(record, bytes) else record
                    for _, record, _ in decoded.rejected
                ],
                [reason for _, _, reason in decoded.rejected],
                [f"{where[i]} message {first + i}" for i, _, _ in decoded.rejected],
            )
        if not decoded.batch.num_rows:
            return None
        origin = MessageOrigin(
            [where[i] for i in decoded.kept], [first + i for i in decoded.kept]
        )
        return SourceBatch(decoded.batch, origin)

    # --- acknowledging at checkpoints ---

    def snapshot_position(self) -> Any:
        """Remember how many messages were emitted before this checkpoint.

        The broker keeps unacknowledged messages in the session, so there is
        no position to restore; the returned data only describes the source.
        """
        self._snapshots.append((self._unacked_generation, self._emitted))
        return {"client_id": self.config.client_id, "received": self._received}

    def restore_position(self, position: Any) -> None:
        """Nothing to seek: the broker delivers unacknowledged messages again."""

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Acknowledge the messages emitted before checkpoint `checkpoint_id`.

        Checkpoints complete in the order they were taken, so the oldest
        snapshot not yet acknowledged belongs to this checkpoint. A
        checkpoint this source took no snapshot for completed after it
        stopped reading (the final one, for example) and covers every
        message it emitted. Does nothing with `acknowledge: receive`, where
        messages were acknowledged already.
        """
        if self._snapshots:
            generation, emitted = self._snapshots.popleft()
            if generation == self._unacked_generation:
                self._acknowledge_emitted(emitted)
        elif self._ended:
            self._acknowledge_emitted(self._emitted)

    def _acknowledge_emitted(self, upto: int) -> None:
        """Acknowledge, in order, the messages emitted up to number `upto`."""
        session = self._session
        if session is None:
            return
        if session.generation != self._unacked_generation:
            self._unacked.clear()  # the connection changed: these come again
            return
        while self._acked < upto and self._unacked:
            message = self._unacked.popleft()
            session.client.ack(message.mid, QOS)
            self._acked += 1

"""The RabbitMQ source: JSON messages from a queue, acknowledged manually.

Example::

    sources:
      orders:
        type: rabbitmq
        config:
          queue: orders
          password: {env: RABBITMQ_PASSWORD}
          username: pipeline
          schema: {id: int, item: string, at: timestamp}

Each message body is one JSON object. Messages whose body is not a JSON
object of the schema's types go to the dead-letter output with the position
`rabbitmq queue NAME message N` (N counts the messages this source received).

Acknowledgements: the source consumes with manual acknowledgements, so the
broker keeps every message until the source acknowledges it and delivers it
again if the connection ends first.

- With checkpointing, the messages emitted before checkpoint `n` are
  acknowledged when `n` is complete (`notify_checkpoint_complete`). After a
  crash, the broker delivers the others again and the run resumes from the
  checkpoint: at least once.
- Without checkpointing, each batch is acknowledged as soon as it has been
  handed to the pipeline. A crash then loses the records still on their way
  through the pipeline.

`prefetch` bounds the messages delivered and not yet acknowledged. With
checkpointing, the source reads at most `prefetch` messages per checkpoint
interval, so set it above the message rate times the interval.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pyarrow as pa
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import AMQPChannelError, ChannelNotFoundEntity
from pydantic import Field

from dataflare.connectors.common import reconnecting
from dataflare.connectors.http.records import (
    JsonRecordDecoder,
    JsonRecordsConfig,
    MessageOrigin,
    payload_text,
)
from dataflare.connectors.rabbitmq.client import (
    CONNECTION_ERRORS,
    EntityUnavailable,
    EventLoopThread,
    RabbitMQConnectionConfig,
    describe_channel_error,
)
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

logger = logging.getLogger(__name__)


class RabbitMQSourceConfig(RabbitMQConnectionConfig, JsonRecordsConfig):
    queue: str = Field(min_length=1, description="Queue to consume from")
    declare: bool = Field(
        True,
        description="Declare the queue (create it if missing); false requires "
        "it to exist",
    )
    durable: bool = Field(True, description="Declare the queue durable")
    prefetch: int = Field(
        10_000,
        ge=0,
        description="Maximum messages delivered and not yet acknowledged (0: no limit)",
    )
    batch_messages: int = Field(
        5_000, ge=1, description="Maximum messages per emitted batch"
    )
    poll_interval: Duration = Field(
        timedelta(milliseconds=100),
        description="How long to wait for messages before reporting the source idle",
    )


class _Delivered:
    """Messages received from the broker and not yet taken by `read()`."""

    def __init__(self) -> None:
        self.messages: collections.deque[tuple[int, AbstractIncomingMessage]] = (
            collections.deque()
        )
        self.arrived = threading.Event()

    def take(
        self, limit: int, timeout: float
    ) -> list[tuple[int, AbstractIncomingMessage]]:
        if not self.messages:
            self.arrived.wait(timeout)
        self.arrived.clear()
        taken: list[tuple[int, AbstractIncomingMessage]] = []
        while self.messages and len(taken) < limit:
            taken.append(self.messages.popleft())
        if self.messages:
            self.arrived.set()
        return taken


class RabbitMQSource(Source[RabbitMQSourceConfig]):
    """Consume JSON messages from a RabbitMQ queue with manual acknowledgements."""

    metadata = PluginMetadata(
        "rabbitmq",
        PluginKind.SOURCE,
        "JSON messages from a RabbitMQ queue, acknowledged at checkpoints",
    )
    Config = RabbitMQSourceConfig

    def __init__(self, config: RabbitMQSourceConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._schema = config.declared_schema()
        self._where = f"rabbitmq queue {config.queue}"
        self._io: EventLoopThread | None = None
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._generation = 0
        self._lost: BaseException | None = None
        self._closing = False  # closing on purpose: not a lost connection
        self._delivered = _Delivered()
        self._received = 0  # messages received, numbering positions
        self._last_emitted: AbstractIncomingMessage | None = None
        self._last_acked: AbstractIncomingMessage | None = None
        self._snapshots: collections.deque[AbstractIncomingMessage | None] = (
            collections.deque()
        )
        self._ended = False  # read() returned: every later checkpoint covers all

    @property
    def bounded(self) -> bool:
        return False

    def schema(self) -> pa.Schema:
        return self._schema

    # --- connecting ---

    def open(self) -> None:
        self._decoder = JsonRecordDecoder(self._schema)
        self._checkpointing = bool(getattr(self.context, "checkpointing", False))
        self._io = EventLoopThread(f"{self.context.step}-rabbitmq")
        self._reconnect(first=True)

    def _reconnect(self, *, first: bool) -> None:
        """Connect, retrying with backoff while the broker is unreachable.

        `first` is True for the first connection of the run, where a missing
        queue that the step may not declare is a configuration error.
        """
        config = self.config
        reconnecting(
            lambda: self._connect(first=first),
            step=self.context.step,
            what=f"connect to RabbitMQ at {config.address()}",
            errors=CONNECTION_ERRORS,
            give_up_after=config.reconnect_for.total_seconds(),
            max_wait=config.reconnect_max_wait.total_seconds(),
            should_stop=lambda: self.context.stopping,
        )

    def _connect(self, *, first: bool) -> None:
        assert self._io is not None
        self._disconnect()
        self._generation += 1
        self._lost = None
        timeout = self.config.connect_timeout.total_seconds() * 2
        what = f"queue {self.config.queue!r} on {self.config.address()}"
        try:
            self._io.run(self._start(self._generation), timeout)
        except ChannelNotFoundEntity as exc:
            self._disconnect()
            if self.config.declare or not first:
                raise EntityUnavailable(f"{what} is not available: {exc}") from exc
            raise ValueError(
                describe_channel_error(
                    exc,
                    what,
                    "create it, or set declare: true to have the step create it",
                )
            ) from exc
        except AMQPChannelError as exc:
            self._disconnect()
            message = describe_channel_error(exc, what, "create it")
            raise ValueError(
                message or f"RabbitMQ rejected the consumer: {exc}"
            ) from exc
        except BaseException:
            self._disconnect()
            raise
        self.context.logger.info(
            "step %r: consuming queue %r on %s",
            self.context.step,
            self.config.queue,
            self.config.address(),
        )

    async def _start(self, generation: int) -> None:
        config = self.config
        self._connection = await config.connect(f"dataflare {self.context.step}")
        self._connection.close_callbacks.add(self._on_close)
        self._channel = await self._connection.channel(publisher_confirms=False)
        self._channel.close_callbacks.add(self._on_close)
        await self._channel.set_qos(prefetch_count=config.prefetch)
        self._queue = await self._channel.declare_queue(
            config.queue, durable=config.durable, passive=not config.declare
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._delivered.messages.append((generation, message))
            self._delivered.arrived.set()

        self._consumer_tag = await self._queue.consume(on_message, no_ack=False)

    def _on_close(self, sender: Any, exc: BaseException | None) -> None:
        if self._lost is None and not self._closing:
            self._lost = exc or ConnectionError("the channel was closed")
            self._delivered.arrived.set()

    def _disconnect(self) -> None:
        connection = self._connection
        self._connection = self._channel = self._queue = None
        self._consumer_tag = None
        if connection is None or self._io is None:
            return
        self._closing = True
        try:
            self._io.run(connection.close(), timeout=5)
        except Exception as exc:  # closing a broken connection may fail
            logger.debug("closing the RabbitMQ connection failed: %s", exc)
        finally:
            self._closing = False

    def _recover(self) -> Iterator[Idle]:
        """Connect again after the connection was lost, yielding IDLE meanwhile.

        The attempts (with backoff) run on a helper thread, so the source
        goes on reporting itself idle and checkpoints are not held up.
        Messages delivered on the old connection and not yet acknowledged
        go back to the queue; the broker delivers them again.

        Raises:
            Exception: what the last attempt raised, once `reconnect_for`
                has passed (unless the run is stopping).
        """
        self.context.logger.warning(
            "step %r: lost the connection to RabbitMQ at %s (%s); reconnecting, "
            "and messages not yet acknowledged will be delivered again",
            self.context.step,
            self.config.address(),
            self._lost,
        )
        self._delivered.messages.clear()
        self._snapshots.clear()
        self._last_emitted = self._last_acked = None
        failure: list[BaseException] = []

        def attempt() -> None:
            try:
                self._reconnect(first=False)
            except BaseException as exc:
                failure.append(exc)

        helper = threading.Thread(
            target=attempt, name=f"{self.context.step}-reconnect", daemon=True
        )
        helper.start()
        poll = self.config.poll_interval.total_seconds()
        while helper.is_alive():
            helper.join(poll)
            yield IDLE
        if failure and not self._end_if_stopping():
            raise failure[0]

    def close(self) -> None:
        # Messages not acknowledged go back to the queue when the channel closes.
        self._disconnect()
        if self._io is not None:
            self._io.close()
            self._io = None

    # --- reading ---

    def read(self) -> Iterator[SourceBatch | Idle]:
        timeout = self.config.poll_interval.total_seconds()
        while not self._end_if_stopping():
            if self._lost is not None:
                yield from self._recover()
                continue
            taken = self._delivered.take(self.config.batch_messages, timeout)
            messages = [m for generation, m in taken if generation == self._generation]
            if not messages:
                yield IDLE
                continue
            batch = self._decode(messages)
            # Counted as emitted before the yield: a checkpoint taken right
            # after it covers this batch.
            self._last_emitted = messages[-1]
            if batch is not None:
                yield batch
            if not self._checkpointing:
                self._acknowledge(messages[-1])

    def _end_if_stopping(self) -> bool:
        """Return True, and remember that reading ended, once the run stops."""
        if self.context.stopping:
            self._ended = True
        return self._ended

    def _decode(self, messages: list[AbstractIncomingMessage]) -> SourceBatch | None:
        first = self._received + 1
        self._received += len(messages)
        decoded = self._decoder.decode([m.body for m in messages])
        if decoded.rejected:
            self.context.reject(
                [
                    record if not isinstance(record, bytes) else payload_text(record)
                    for _, record, _ in decoded.rejected
                ],
                [reason for _, _, reason in decoded.rejected],
                [f"{self._where} message {first + i}" for i, _, _ in decoded.rejected],
            )
        if not decoded.batch.num_rows:
            return None
        origin = MessageOrigin(
            [self._where] * len(decoded.kept), [first + i for i in decoded.kept]
        )
        return SourceBatch(decoded.batch, origin)

    # --- acknowledgements ---

    def snapshot_position(self) -> Any:
        """Remember the last message emitted before this checkpoint's barrier.

        The broker keeps unacknowledged messages, so there is no position to
        restore; the returned data only describes the source in checkpoints.
        """
        self._snapshots.append(self._last_emitted)
        return {"queue": self.config.queue, "received": self._received}

    def restore_position(self, position: Any) -> None:
        """Nothing to seek: the broker delivers unacknowledged messages again."""

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Acknowledge the messages emitted before checkpoint `checkpoint_id`.

        Checkpoints complete in the order they were taken, so the oldest
        snapshot not yet acknowledged belongs to this checkpoint. A
        checkpoint this source took no snapshot for completed after it
        stopped reading (the final one, for example) and covers every
        message it emitted.
        """
        if self._snapshots:
            upto = self._snapshots.popleft()
        elif self._ended:
            upto = self._last_emitted
        else:
            return
        if upto is not None:
            self._acknowledge(upto)

    def _acknowledge(self, message: AbstractIncomingMessage) -> None:
        """Acknowledge `message` and every message delivered before it."""
        last = self._last_acked
        if last is message:
            return
        if last is not None:
            try:
                same_channel = last.channel is message.channel
            except CONNECTION_ERRORS:
                # `last` came on a channel that has closed since (the broker
                # restarted), so its delivery tags are not comparable.
                same_channel = False
            if same_channel and (last.delivery_tag or 0) >= (message.delivery_tag or 0):
                return
        if self._io is None or self._lost is not None:
            return  # the broker delivers the messages again after reconnecting
        try:
            self._io.run(message.ack(multiple=True), timeout=10)
        except CONNECTION_ERRORS as exc:
            self.context.logger.warning(
                "step %r: could not acknowledge messages up to delivery tag %s "
                "(%s); the broker will deliver them again",
                self.context.step,
                message.delivery_tag,
                exc,
            )
            return
        self._last_acked = message

"""The RabbitMQ sink: one JSON message per record, with publisher confirms.

Example::

    destinations:
      alerts:
        type: rabbitmq
        inputs: [delayed]
        config:
          routing_key: alerts          # the default exchange routes to this queue
          queue: alerts                # declared durable before the first message
          password: {env: RABBITMQ_PASSWORD}
          username: pipeline

`write()` returns once the broker has confirmed every message of the batch
(publisher confirms), publishing many messages before waiting so that the
broker confirms them in groups. A message the broker rejects (a negative
confirm) or that was in flight when the connection ended is published again
after reconnecting, so a message may arrive twice: at least once. A message
that no queue receives (the exchange has no binding for the routing key) is
returned by the broker and stops the step with an error, instead of being
dropped without a word.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import aio_pika
import pyarrow as pa
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.exceptions import (
    AMQPChannelError,
    ChannelNotFoundEntity,
    DeliveryError,
    PublishError,
)
from pydantic import Field

from dataflare.connectors.common import reconnecting
from dataflare.connectors.http.records import encode_records
from dataflare.connectors.rabbitmq.client import (
    CONNECTION_ERRORS,
    EntityUnavailable,
    EventLoopThread,
    RabbitMQConnectionConfig,
    describe_channel_error,
)
from dataflare.plugin.interface import (
    OperatorContext,
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    SinkInfo,
)
from dataflare.streaming.spec import Duration


class RabbitMQSinkConfig(RabbitMQConnectionConfig, SinkConfig):
    exchange: str = Field(
        "", description="Exchange to publish to; '' is the default exchange"
    )
    routing_key: str = Field(
        min_length=1,
        description="Routing key; with the default exchange, the queue's name",
    )
    queue: str | None = Field(
        None,
        description="Queue to declare (durable) before publishing, and to bind "
        "to `exchange` with `routing_key` when the exchange is not the default",
    )
    persistent: bool = Field(
        True, description="Mark messages persistent (written to disk by the broker)"
    )
    max_in_flight: int = Field(
        1_000,
        ge=1,
        description="Messages published before waiting for the broker's confirms",
    )
    confirm_timeout: Duration = Field(
        timedelta(seconds=30),
        description="How long to wait for a confirm before publishing again",
    )


class _Unconfirmed(Exception):
    """Some messages of a batch were not confirmed; they are published again."""

    def __init__(self, remaining: list[int], cause: BaseException) -> None:
        super().__init__(f"{len(remaining)} messages not confirmed: {cause}")
        self.remaining = remaining
        self.cause = cause


class RabbitMQSink(Sink[RabbitMQSinkConfig]):
    """Publish each record as a JSON message and wait for the broker's confirms."""

    metadata = PluginMetadata(
        "rabbitmq",
        PluginKind.SINK,
        "JSON messages to a RabbitMQ exchange, with publisher confirms",
    )
    Config = RabbitMQSinkConfig

    def __init__(self, config: RabbitMQSinkConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._io: EventLoopThread | None = None
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._lost: BaseException | None = None
        self._closing = False  # closing on purpose: not a lost connection
        self._published = 0

    def _target(self) -> str:
        exchange = self.config.exchange or "(default)"
        return (
            f"exchange {exchange} routing key {self.config.routing_key!r} on "
            f"{self.config.address()}"
        )

    # --- connecting ---

    def open(self) -> None:
        self._io = EventLoopThread(f"{self.context.step}-rabbitmq")
        self._retrying(
            lambda: self._connect(first=True),
            f"connect to RabbitMQ at {self.config.address()}",
        )

    def _retrying(self, operation: Any, what: str) -> None:
        reconnecting(
            operation,
            step=self.context.step,
            what=what,
            errors=(*CONNECTION_ERRORS, _Unconfirmed),
            give_up_after=self.config.reconnect_for.total_seconds(),
            max_wait=self.config.reconnect_max_wait.total_seconds(),
        )

    def _connect(self, *, first: bool) -> None:
        """Connect and declare; `first` is True for the run's first connection.

        A missing exchange is a configuration error on the first connection;
        later, right after a broker restart, it may be missing for a moment.
        """
        assert self._io is not None
        self._disconnect()
        timeout = self.config.connect_timeout.total_seconds() * 2
        exchange = f"exchange {self.config.exchange!r} on {self.config.address()}"
        try:
            self._io.run(self._start(), timeout)
        except ChannelNotFoundEntity as exc:
            self._disconnect()
            if not first:
                raise EntityUnavailable(f"{exchange} is not available: {exc}") from exc
            raise ValueError(
                describe_channel_error(exc, exchange, "declare it on the broker first")
            ) from exc
        except AMQPChannelError as exc:
            self._disconnect()
            what = (
                f"queue {self.config.queue!r}"
                if self.config.queue
                else f"exchange {self.config.exchange!r}"
            )
            message = describe_channel_error(
                exc,
                f"{what} on {self.config.address()}",
                "declare it on the broker first",
            )
            raise ValueError(
                message or f"RabbitMQ rejected the publisher: {exc}"
            ) from exc
        except BaseException:
            self._disconnect()
            raise

    async def _start(self) -> None:
        config = self.config
        self._lost = None
        self._connection = await config.connect(f"dataflare {self.context.step}")
        self._connection.close_callbacks.add(self._on_close)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        if config.exchange:
            self._exchange = await self._channel.get_exchange(
                config.exchange, ensure=True
            )
        else:
            self._exchange = self._channel.default_exchange
        if config.queue:
            queue = await self._channel.declare_queue(config.queue, durable=True)
            if config.exchange:
                await queue.bind(self._exchange, routing_key=config.routing_key)

    def _on_close(self, sender: Any, exc: BaseException | None) -> None:
        if self._lost is None and not self._closing:
            self._lost = exc or ConnectionError("the connection was closed")

    def _disconnect(self) -> None:
        connection = self._connection
        self._connection = self._channel = self._exchange = None
        if connection is None or self._io is None:
            return
        self._closing = True
        try:
            self._io.run(connection.close(), timeout=5)
        except Exception as exc:  # closing a broken connection may fail
            self.context.logger.debug("closing the RabbitMQ connection failed: %s", exc)
        finally:
            self._closing = False

    def close(self) -> None:
        self._disconnect()
        if self._io is not None:
            self._io.close()
            self._io = None

    # --- writing ---

    def write(self, batch: pa.RecordBatch) -> None:
        bodies = encode_records(batch)
        remaining = list(range(len(bodies)))

        def publish_remaining() -> None:
            nonlocal remaining
            assert self._io is not None
            if self._lost is not None:
                self.context.logger.warning(
                    "step %r: lost the connection to RabbitMQ at %s (%s); "
                    "reconnecting, and messages not confirmed will be published "
                    "again",
                    self.context.step,
                    self.config.address(),
                    self._lost,
                )
                self._disconnect()
                self._lost = None
            if self._connection is None:
                self._connect(first=False)
            try:
                self._io.run(self._publish(bodies, remaining), timeout=None)
            except _Unconfirmed as exc:
                if isinstance(exc.cause, CONNECTION_ERRORS) and self._lost is None:
                    self._lost = exc.cause  # the next attempt reconnects
                remaining = exc.remaining
                raise

        self._retrying(publish_remaining, f"publish to {self._target()}")
        self._published += len(bodies)

    async def _publish(self, bodies: list[bytes], indices: list[int]) -> None:
        """Publish `bodies[i]` for each `i` in `indices` and wait for confirms.

        Raises:
            _Unconfirmed: with the indices of the messages to publish again.
            ValueError: the broker returned a message no queue would take.
        """
        exchange = self._exchange
        assert exchange is not None
        mode = (
            aio_pika.DeliveryMode.PERSISTENT
            if self.config.persistent
            else aio_pika.DeliveryMode.NOT_PERSISTENT
        )
        key = self.config.routing_key
        timeout = self.config.confirm_timeout.total_seconds()
        step = self.config.max_in_flight
        for start in range(0, len(indices), step):
            chunk = indices[start : start + step]
            results = await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            bodies[i],
                            delivery_mode=mode,
                            content_type="application/json",
                        ),
                        key,
                        timeout=timeout,
                    )
                    for i in chunk
                ),
                return_exceptions=True,
            )
            failed = [
                (i, r)
                for i, r in zip(chunk, results, strict=True)
                if isinstance(r, BaseException)
            ]
            if not failed:
                continue
            for _, error in failed:
                if isinstance(error, PublishError):
                    raise ValueError(
                        f"RabbitMQ returned a message published to {self._target()}: "
                        f"{error}; no queue is bound for this routing key. Declare "
                        "and bind a queue, or set `queue` to have the step do it"
                    )
            cause = next(
                (e for _, e in failed if not isinstance(e, DeliveryError)),
                failed[0][1],
            )
            unconfirmed = [i for i, _ in failed] + indices[start + step :]
            raise _Unconfirmed(unconfirmed, cause)

    def info(self) -> SinkInfo:
        return SinkInfo(paths=[self._target()], delivery="at-least-once")

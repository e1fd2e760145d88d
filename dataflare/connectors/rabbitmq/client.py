"""Connection settings and the I/O event loop of the RabbitMQ source and sink.

Both connectors use aio-pika on an asyncio event loop that runs on a thread
of its own (`EventLoopThread`). The plugin's thread hands coroutines to that
loop and waits for their results, so the connection keeps answering
heartbeats while the plugin's thread is blocked, for example by
backpressure from a slow destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.connection import make_url
from aiormq.exceptions import (
    AMQPConnectionError,
    ChannelAccessRefused,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)
from pydantic import Field, model_validator

from dataflare.connectors.common import SecretRef
from dataflare.plugin.interface import PluginConfig
from dataflare.streaming.spec import Duration

T = TypeVar("T")


class EntityUnavailable(ConnectionError):
    """The broker reported a queue or exchange missing that should exist.

    Right after a broker starts, it takes connections before its durable
    queues are back, so this error is retried like a lost connection.
    """


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    AMQPConnectionError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)
"""Errors after which connecting again may succeed (the broker restarts)."""

DEFAULT_USER = "guest"


class RabbitMQConnectionConfig(PluginConfig):
    """Broker address and login settings."""

    host: str = Field("127.0.0.1", description="Broker host name or address")
    port: int = Field(5672, ge=1, le=65535, description="AMQP port")
    virtual_host: str = Field("/", description="Virtual host")
    username: str = Field(DEFAULT_USER, min_length=1, description="User name")
    password: SecretRef | None = Field(
        None,
        description="Password, as {env: VAR} or {file: PATH}; may be left out "
        "only for the `guest` user of a local broker",
    )
    heartbeat: Duration = Field(
        timedelta(seconds=30), description="AMQP heartbeat interval"
    )
    connect_timeout: Duration = Field(
        timedelta(seconds=10), description="Time allowed for one connection attempt"
    )
    reconnect_for: Duration = Field(
        timedelta(minutes=5),
        description="How long to keep trying to reach the broker before the step fails",
    )
    reconnect_max_wait: Duration = Field(
        timedelta(seconds=5), description="Maximum pause between two attempts"
    )

    @model_validator(mode="after")
    def _password_unless_guest(self) -> RabbitMQConnectionConfig:
        if self.password is None and self.username != DEFAULT_USER:
            raise ValueError(
                f"user {self.username!r} needs a password: set "
                "password: {env: VARIABLE} or password: {file: PATH}"
            )
        return self

    def address(self) -> str:
        """Return `amqp://host:port/vhost`, for messages (no credentials)."""
        vhost = self.virtual_host.lstrip("/")
        return f"amqp://{self.host}:{self.port}/{vhost}"

    async def connect(self, name: str) -> AbstractConnection:
        """Open a connection; `name` shows in the broker's connection list.

        Raises:
            ValueError: the password's secret cannot be read.
            AMQPConnectionError, OSError, TimeoutError: the broker is unreachable.
        """
        password = self.password.reveal() if self.password is not None else DEFAULT_USER
        url = make_url(
            host=self.host,
            port=self.port,
            login=self.username,
            password=password,
            virtualhost=self.virtual_host,
            heartbeat=max(1, round(self.heartbeat.total_seconds())),
        )
        connection = aio_pika.Connection(
            url, client_properties={"connection_name": name}
        )
        try:
            await connection.connect(timeout=self.connect_timeout.total_seconds())
        except BaseException:
            # Closed here, on the loop, rather than by the garbage collector
            # on a thread without one.
            await connection.close()
            raise
        return connection


def describe_channel_error(
    exc: BaseException, what: str, if_missing: str
) -> str | None:
    """Explain a channel error the broker raised about `what`, or return None.

    These errors (a missing queue or exchange, a queue declared with other
    settings, a refused permission) do not go away by connecting again.
    `if_missing` is the advice given when `what` does not exist.
    """
    if isinstance(exc, ChannelNotFoundEntity):
        return f"{what} does not exist ({exc}); {if_missing}"
    if isinstance(exc, ChannelPreconditionFailed):
        return (
            f"{what} exists with other settings ({exc}); match `durable` to the "
            "existing declaration"
        )
    if isinstance(exc, ChannelAccessRefused):
        return f"access to {what} was refused ({exc}); check the user's permissions"
    return None


class EventLoopThread:
    """An asyncio event loop running on a daemon thread of its own.

    Args:
        name: The thread's name, for debugging.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run `coroutine` on the loop and wait for its result.

        Raises:
            TimeoutError: no result within `timeout` seconds; the coroutine
                is cancelled.
            Exception: whatever the coroutine raised.
        """
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        """Cancel what still runs on the loop, stop it and close it."""
        if self.loop.is_closed():
            return

        async def cancel_all() -> None:
            tasks = [
                task
                for task in asyncio.all_tasks()
                if task is not asyncio.current_task()
            ]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(TimeoutError, RuntimeError):
            self.run(cancel_all(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()

"""Connection settings and the event loop shared by the NATS source and sink.

nats-py is asynchronous, while DataFlare runs each step instance on a
thread of its own. Each instance therefore runs its NATS client on an
event loop of its own thread (`EventLoopThread`) and waits for results.

Reconnection happens at two levels. The NATS client reconnects by itself
after a lost connection, trying every `reconnect_wait`, and the connector
logs when the connection is lost and when it is back. Operations that fail
meanwhile (a fetch, a publish, an acknowledgement) are retried by
`reconnecting` with exponential backoff until `reconnect_for` has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from pydantic import Field, model_validator

from dataflare.connectors.common import SecretRef, reconnecting
from dataflare.plugin.interface import PluginConfig
from dataflare.streaming.spec import Duration

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.TimeoutError,
    nats.errors.FlushTimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    TimeoutError,
    ConnectionError,
)
"""Errors after which an operation is tried again once NATS is back.

`NoRespondersError`, `ServiceUnavailableError` and `NoStreamResponseError`
are here because while a restarted server recovers its streams, JetStream
requests and publishes find no responder for a moment.
"""


class NatsConnectionConfig(PluginConfig):
    """Server addresses and login settings of NATS."""

    servers: str | list[str] = Field(
        "nats://127.0.0.1:4222", description="URL, or list of URLs, of NATS servers"
    )
    user: str | None = Field(None, description="User name, with `password`")
    password: SecretRef | None = Field(
        None, description="Password, by reference: {env: VAR} or {file: PATH}"
    )
    token: SecretRef | None = Field(
        None, description="Authentication token, by reference"
    )
    credentials_file: str | None = Field(
        None, description="Path of a .creds file (user JWT and NKey seed)"
    )
    reconnect_wait: Duration = Field(
        timedelta(milliseconds=500),
        description="Pause between the client's reconnection attempts",
    )
    reconnect_for: Duration = Field(
        timedelta(minutes=5),
        description="How long to keep trying while NATS is unreachable before "
        "the run fails",
    )

    @model_validator(mode="after")
    def _one_login(self) -> NatsConnectionConfig:
        logins = [
            self.password is not None,
            self.token is not None,
            self.credentials_file is not None,
        ]
        if sum(logins) > 1:
            raise ValueError("set at most one of password, token and credentials_file")
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together; set both or neither")
        return self

    def server_list(self) -> list[str]:
        return [self.servers] if isinstance(self.servers, str) else list(self.servers)

    def address(self) -> str:
        """Return the servers for messages (never with credentials)."""
        return ", ".join(self.server_list())


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
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(TimeoutError, RuntimeError):
            self.run(cancel_all(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class NatsConnection:
    """A NATS client on its own event loop, for one step instance.

    Args:
        config: Servers and credentials.
        step: The step id, for log lines and the client name.
        should_stop: Returns True when retrying should end (a source passes
            the run's stop flag; a sink passes None, so that the
            records it has are still delivered while the run stops).
    """

    def __init__(
        self,
        config: NatsConnectionConfig,
        step: str,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.config = config
        self.step = step
        self.should_stop = should_stop
        self.io = EventLoopThread(f"{step}-nats")
        self.closing = False
        self.client: Client | None = None
        self.client = self.retry(
            self._connect, f"connect to NATS at {config.address()}"
        )

    async def _connect(self) -> Client:
        config = self.config
        options: dict[str, Any] = {
            "name": f"dataflare {self.step}",
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": config.reconnect_wait.total_seconds(),
            "connect_timeout": 2,
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "error_cb": self._error,
        }
        if config.user is not None and config.password is not None:
            options["user"] = config.user
            options["password"] = config.password.reveal()
        if config.token is not None:
            options["token"] = config.token.reveal()
        if config.credentials_file is not None:
            options["user_credentials"] = config.credentials_file
        return await nats.connect(config.server_list(), **options)

    async def _disconnected(self) -> None:
        if self.closing:
            return
        logger.warning(
            "step %r: lost the connection to NATS at %s; reconnecting every %g s",
            self.step,
            self.config.address(),
            self.config.reconnect_wait.total_seconds(),
        )

    async def _reconnected(self) -> None:
        client = self.client
        where = client.connected_url.netloc if client and client.connected_url else ""
        logger.warning("step %r: connected to NATS again (%s)", self.step, where)

    async def _error(self, error: Exception) -> None:
        if isinstance(error, CONNECTION_ERRORS):
            logger.debug("step %r: NATS connection: %s", self.step, error)
            return
        logger.warning("step %r: NATS reports: %s", self.step, error)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run one coroutine on the connection's loop and return its result."""
        return self.io.run(coroutine, timeout)

    def retry(
        self,
        operation: Callable[[], Coroutine[Any, Any, T]],
        what: str,
        timeout: float = 30.0,
    ) -> T:
        """Run `operation()` on the loop, retrying connection errors with backoff."""
        return reconnecting(
            lambda: self.io.run(operation(), timeout),
            step=self.step,
            what=what,
            errors=CONNECTION_ERRORS,
            give_up_after=self.config.reconnect_for.total_seconds(),
            should_stop=self.should_stop,
        )

    def close(self) -> None:
        """Flush and close the client, then stop the loop."""
        client = self.client
        self.client = None
        self.closing = True
        if client is not None:
            with contextlib.suppress(Exception):
                self.io.run(client.close(), timeout=10)
        self.io.close()

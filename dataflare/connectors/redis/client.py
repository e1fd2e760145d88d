"""The Redis client the connectors use, and the errors they retry.

The client's own retries are turned off: the connectors retry failed
commands themselves, with exponential backoff and a WARNING line per
attempt (`reconnecting` for the sink and the lookup, `Backoff` in the
source's read loop), and give up after `reconnect_for`.
"""

from __future__ import annotations

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from dataflare.connectors.redis.config import RedisConnectionConfig

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.TryAgainError,
)
"""Errors after which a command is tried again once Redis is back."""


def connect(config: RedisConnectionConfig) -> redis.Redis:
    """Return a client for `config` (it connects at its first command).

    Raises:
        ValueError: the password reference cannot be read.
    """
    seconds = config.timeout.total_seconds()
    return redis.Redis.from_url(
        config.url,
        username=config.username,
        password=config.password.reveal() if config.password is not None else None,
        socket_timeout=seconds,
        socket_connect_timeout=seconds,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )

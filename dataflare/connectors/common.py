"""What connectors to external systems share: secrets and reconnection.

Secrets are given by reference, never inline, so that pipeline files can be
committed and logs shown::

    password: {env: PGPASSWORD}            # an environment variable
    password: {file: /run/secrets/pg}      # a file (trailing newline dropped)

A `SecretRef` prints as `SecretRef(env=PGPASSWORD)`; only `reveal()` gives
the value, and the value is never part of a message.

`reconnecting(...)` retries an operation on connection errors with
exponential backoff and jitter, logging each retry at WARNING with the step
and the error, so a restarted broker or database costs a pause, not the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import model_validator
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from dataflare.plugin.interface import PluginConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SecretRef(PluginConfig):
    """A reference to a secret: an environment variable or a file."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_reference(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret needs exactly one of 'env' or 'file'")
        return self

    def reveal(self) -> str:
        """Return the secret's value.

        Raises:
            ValueError: the variable is unset or the file cannot be read; the
                message names the reference, never a value.
        """
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ValueError(f"secret environment variable {self.env} is not set")
            return value
        assert self.file is not None
        try:
            return Path(self.file).read_text(encoding="utf-8").rstrip("\n")
        except OSError as exc:
            raise ValueError(
                f"cannot read secret file {self.file}: {exc.strerror}"
            ) from None

    def __repr__(self) -> str:
        where = f"env={self.env}" if self.env is not None else f"file={self.file}"
        return f"SecretRef({where})"

    __str__ = __repr__


def reconnecting(
    operation: Callable[[], T],
    *,
    step: str,
    what: str,
    errors: tuple[type[BaseException], ...],
    give_up_after: float = 300.0,
    max_wait: float = 5.0,
    should_stop: Callable[[], bool] | None = None,
) -> T:
    """Run `operation`, retrying on `errors` with exponential backoff.

    Args:
        operation: the call to make, for example connecting or publishing.
        step: the step id, for log lines.
        what: what the operation does, for log lines ("connect to NATS").
        errors: exception types that mean "try again".
        give_up_after: seconds after which the last error is raised.
        max_wait: longest pause between two attempts, in seconds.
        should_stop: returns True when the run is stopping; stops retrying.
    """

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.warning(
            "step %r: %s failed (attempt %d): %s; retrying",
            step,
            what,
            state.attempt_number,
            error,
        )

    class _Stopping(stop_base):
        def __call__(self, state: RetryCallState) -> bool:
            return should_stop is not None and should_stop()

    retrying = Retrying(
        retry=retry_if_exception_type(errors),
        wait=wait_random_exponential(multiplier=0.1, max=max_wait),
        stop=stop_after_delay(give_up_after) | _Stopping(),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(operation)

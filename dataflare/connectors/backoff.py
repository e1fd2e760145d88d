"""Backoff for sources that poll a broker inside their `read()` loop.

`dataflare.connectors.common.reconnecting` blocks until an operation works,
which suits opening a connection or publishing. A source's `read()` must
instead keep yielding `IDLE` while its broker is away, so that checkpoints
and stop requests are still noticed. `Backoff` keeps the pauses and the
log lines of such a loop: a WARNING per failed attempt with the step and
the error, one when the broker responds again, and an error once
`give_up_after` seconds have passed without success.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator

from dataflare.plugin.interface import IDLE, Idle

logger = logging.getLogger(__name__)


class Backoff:
    """Exponential pauses with jitter between failed attempts of a poll.

    Args:
        step: The step id, for log lines.
        what: What the attempts do, for log lines ("read from Redis at ...").
        give_up_after: Seconds of failures after which `failed` raises.
        first_wait: The first pause, in seconds; each next one doubles.
        max_wait: The maximum pause, in seconds.
    """

    def __init__(
        self,
        step: str,
        what: str,
        give_up_after: float,
        *,
        first_wait: float = 0.1,
        max_wait: float = 5.0,
    ) -> None:
        self.step = step
        self.what = what
        self.give_up_after = give_up_after
        self.first_wait = first_wait
        self.max_wait = max_wait
        self.attempts = 0
        self._since: float | None = None

    def failed(self, error: BaseException) -> float:
        """Record a failed attempt; return the seconds to wait before the next.

        Raises:
            RuntimeError: the attempts have failed for `give_up_after`
                seconds; the message names the step, the operation and the
                last error.
        """
        now = time.monotonic()
        if self._since is None:
            self._since = now
        self.attempts += 1
        if now - self._since > self.give_up_after:
            raise RuntimeError(
                f"step {self.step!r}: {self.what} failed for "
                f"{self.give_up_after:.0f} s ({self.attempts} attempts); last "
                f"error: {describe(error)}. Check that the service is up and "
                "reachable, or raise reconnect_for"
            ) from error
        ceiling = min(self.max_wait, self.first_wait * 2 ** (self.attempts - 1))
        wait = random.uniform(ceiling / 2, ceiling)
        logger.warning(
            "step %r: %s failed (attempt %d): %s; retrying in %.1f s",
            self.step,
            self.what,
            self.attempts,
            describe(error),
            wait,
        )
        return wait

    def succeeded(self) -> None:
        """Record a successful attempt; log the recovery after failures."""
        if self.attempts:
            logger.warning(
                "step %r: %s works again after %d failed attempts",
                self.step,
                self.what,
                self.attempts,
            )
        self.attempts = 0
        self._since = None


def idle_for(seconds: float, stopping: Callable[[], bool]) -> Iterator[Idle]:
    """Yield `IDLE` every 50 ms for `seconds`, or until `stopping()` is true."""
    end = time.monotonic() + seconds
    while not stopping():
        yield IDLE
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.05, left))


def describe(error: BaseException) -> str:
    """Return an error's message, or its type's name when it has none."""
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text}" if text and text != name else name

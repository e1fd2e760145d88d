"""The HTTP sink: records POSTed as JSON arrays, retried until accepted.

Example::

    destinations:
      webhook:
        type: http
        inputs: [orders]
        config:
          url: https://collector.example/ingest
          token: {env: COLLECTOR_TOKEN}
          batch_records: 500

Each request carries up to `batch_records` records as one JSON array, with
`Content-Type: application/json` and, when a token is set,
`Authorization: Bearer <token>`. Its `Idempotency-Key` header names the
batch and stays the same on every retry of it, so a server that remembers
keys can drop a batch it already has.

Retries: connection errors, timeouts, 408, 429 and 5xx responses are
retried with exponential backoff and jitter (at least `Retry-After` seconds
when the server sends it), each retry logged at WARNING, until `retry_for`
has passed. Then the step fails. Any other 4xx response fails the step at
once, since sending the same request again cannot succeed. `write()`
returns only when every batch got a 2xx response: at least once, because a
batch whose response was lost is sent again.
"""

from __future__ import annotations

import email.utils
import logging
import time
import uuid
from datetime import timedelta

import httpx
import pyarrow as pa
from pydantic import Field
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from dataflare.connectors.common import SecretRef
from dataflare.connectors.http.records import encode_array
from dataflare.plugin.interface import (
    OperatorContext,
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    SinkInfo,
)
from dataflare.streaming.spec import Duration

logger = logging.getLogger(__name__)

_RETRIED_STATUS = frozenset({408, 429})
_BODY_EXCERPT = 300


class HttpSinkConfig(SinkConfig):
    url: str = Field(
        pattern=r"^https?://", description="Endpoint that receives the POST requests"
    )
    token: SecretRef | None = Field(
        None, description="Bearer token, as {env: VAR} or {file: PATH}"
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Further request headers (not secrets: use `token`)",
    )
    batch_records: int = Field(500, ge=1, description="Maximum records per request")
    timeout: Duration = Field(
        timedelta(seconds=30), description="Time allowed for one request"
    )
    retry_for: Duration = Field(
        timedelta(minutes=5),
        description="How long to retry a batch before the step fails",
    )
    retry_max_wait: Duration = Field(
        timedelta(seconds=10), description="Maximum pause between two attempts"
    )


class _Retryable(Exception):
    """A failed request worth retrying, with the server's Retry-After in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    """Read Retry-After as seconds (a number or an HTTP date), if present."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def display_url(url: str) -> str:
    """Return `url` without user information or query, which may hold secrets."""
    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


def _excerpt(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    if len(text) > _BODY_EXCERPT:
        text = text[:_BODY_EXCERPT] + "..."
    return text or "(empty body)"


class HttpSink(Sink[HttpSinkConfig]):
    """POST records as JSON arrays, with retries and idempotency keys."""

    metadata = PluginMetadata(
        "http",
        PluginKind.SINK,
        "JSON arrays POSTed to an HTTP endpoint, retried, with idempotency keys",
    )
    Config = HttpSinkConfig

    def __init__(self, config: HttpSinkConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._client: httpx.Client | None = None
        self._run = uuid.uuid4().hex
        self._batches = 0

    def open(self) -> None:
        headers = {
            **self.config.headers,
            "Content-Type": "application/json",
            "User-Agent": "dataflare",
        }
        if self.config.token is not None:
            headers["Authorization"] = f"Bearer {self.config.token.reveal()}"
        self._client = httpx.Client(
            headers=headers, timeout=self.config.timeout.total_seconds()
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def write(self, batch: pa.RecordBatch) -> None:
        size = self.config.batch_records
        for start in range(0, batch.num_rows, size):
            part = batch.slice(start, size)
            self._batches += 1
            key = f"{self._run}-{self._batches}"
            self._send(encode_array(part), key, part.num_rows)

    def _send(self, body: bytes, key: str, records: int) -> None:
        """POST one batch until the server accepts it.

        Raises:
            ValueError: the server rejected the batch with a 4xx response that
                retrying cannot change.
            _Retryable, httpx.TransportError: `retry_for` passed.
        """
        client = self._client
        assert client is not None
        url = display_url(self.config.url)

        def post() -> None:
            try:
                response = client.post(
                    self.config.url, content=body, headers={"Idempotency-Key": key}
                )
            except httpx.TransportError as exc:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
            status = response.status_code
            if 200 <= status < 300:
                return
            outcome = f"{status} {response.reason_phrase}: {_excerpt(response)}"
            if status in _RETRIED_STATUS or status >= 500:
                raise _Retryable(f"status {outcome}", _retry_after(response))
            raise ValueError(
                f"POST {url} failed with status {outcome}, for a batch of "
                f"{records} records (Idempotency-Key {key}). Retrying cannot "
                "succeed: fix the records or the endpoint's settings (url, "
                "token, headers)"
            )

        max_wait = self.config.retry_max_wait.total_seconds()
        backoff = wait_random_exponential(multiplier=0.1, max=max_wait)

        def wait(state: RetryCallState) -> float:
            pause = backoff(state)
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, _Retryable) and error.retry_after is not None:
                pause = max(pause, error.retry_after)
            return pause

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self.context.logger.warning(
                "step %r: POST %s failed (attempt %d): %s; retrying in %.1f s",
                self.context.step,
                url,
                state.attempt_number,
                error,
                state.upcoming_sleep,
            )

        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            wait=wait,
            stop=stop_after_delay(self.config.retry_for.total_seconds()),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            retrying(post)
        except _Retryable as exc:
            raise OSError(
                f"POST {url} failed for {self.config.retry_for.total_seconds():g} s "
                f"with a batch of {records} records (Idempotency-Key {key}); last "
                f"error: {exc}. Check that the endpoint is up, or raise `retry_for`"
            ) from exc

    def info(self) -> SinkInfo:
        return SinkInfo(paths=[display_url(self.config.url)], delivery="at-least-once")

"""The HTTP source: an ingest endpoint that accepts JSON records.

Example::

    sources:
      events:
        type: http
        config:
          port: 8080
          path: /ingest
          token: {env: INGEST_TOKEN}
          schema: {id: int, kind: string, at: timestamp}

Clients send `POST /ingest` with `Authorization: Bearer <token>` and a body
holding one JSON object or an array of objects. Responses:

- 202: accepted; the body is `{"accepted": N, "request": ID}`;
- 400: the body is not JSON, or not an object or an array of objects
  (`error` says why);
- 401: the token is missing or wrong;
- 413: the body is larger than `max_body_bytes`, or holds more records
  than `queue_records`;
- 429: the pipeline is backed up (the internal queue holds
  `queue_records` records); retry after `Retry-After` seconds;
- 503: the pipeline is stopping.

A request is accepted whole or not at all. Accepted records wait in a
bounded queue in memory until the pipeline takes them; a record whose values
do not fit the schema goes to the dead-letter output with the position
`http request ID record N`. `GET /health` answers 200 without a token.

Delivery: a 202 means the records are in the queue. A graceful stop
(SIGINT, SIGTERM) first answers 503 to new requests, then passes on every
queued record, so nothing accepted is lost; a crash loses the records still
queued or on their way through the pipeline.

The server is uvicorn running a Starlette application on a thread of its
own; its event loop only parses, checks and queues, so a slow pipeline slows
no request down: it makes the queue fill and the endpoint answer 429.
"""

from __future__ import annotations

import collections
import hmac
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import orjson
import pyarrow as pa
import uvicorn
from pydantic import Field, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dataflare.connectors.common import SecretRef
from dataflare.connectors.http.records import (
    JsonRecordDecoder,
    JsonRecordsConfig,
    MessageOrigin,
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

_START_SECONDS = 10.0
_LOG_EVERY_SECONDS = 60.0


class HttpSourceConfig(JsonRecordsConfig):
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8080, ge=1, le=65535, description="Port to listen on")
    path: str = Field("/ingest", description="Path of the ingest endpoint")
    token: SecretRef = Field(
        description="Bearer token clients must send, as {env: VAR} or {file: PATH}"
    )
    queue_records: int = Field(
        10_000,
        ge=1,
        description="Maximum records accepted and not yet taken by the pipeline; "
        "beyond it requests get 429",
    )
    retry_after: int = Field(
        1, ge=1, description="Seconds sent in Retry-After with a 429 response"
    )
    max_body_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="Maximum request body size, in bytes"
    )
    batch_records: int = Field(
        10_000, ge=1, description="Maximum records per emitted batch"
    )
    poll_interval: Duration = Field(
        timedelta(milliseconds=100),
        description="How long to wait for records before reporting the source idle",
    )

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value == "/health":
            raise ValueError(
                f"path {value!r} must start with '/' and differ from /health"
            )
        return value


class _Inbox:
    """Accepted requests waiting for the pipeline, bounded in records."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.requests: collections.deque[tuple[int, list[Any]]] = collections.deque()
        self.records = 0
        self.next_id = 1
        self.closed = False
        self.arrived = threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def offer(self, records: list[Any]) -> int | None:
        """Queue `records` and return their request id, or None if full."""
        with self.lock:
            if self.records + len(records) > self.capacity:
                return None
            request_id = self.next_id
            self.next_id += 1
            self.requests.append((request_id, records))
            self.records += len(records)
        self.arrived.set()
        return request_id

    def take(self, limit: int, timeout: float) -> list[tuple[int, list[Any]]]:
        """Take whole requests, up to about `limit` records (at least one)."""
        if not self.requests:
            self.arrived.wait(timeout)
        self.arrived.clear()
        taken: list[tuple[int, list[Any]]] = []
        count = 0
        with self.lock:
            while self.requests and (not taken or count < limit):
                request = self.requests[0]
                if taken and count + len(request[1]) > limit:
                    break
                self.requests.popleft()
                taken.append(request)
                count += len(request[1])
            self.records -= count
            if self.requests:
                self.arrived.set()
        return taken

    def count(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1

    def drain_counts(self) -> dict[str, int]:
        with self.lock:
            counts = dict(self.counts)
            self.counts.clear()
        return counts


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _parse_records(body: bytes) -> list[dict[str, Any]] | str:
    """Parse a request body into records, or return why it is invalid."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
    records = value if isinstance(value, list) else [value]
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            where = f"element {number}" if isinstance(value, list) else "the body"
            return (
                f"{where} is {_kind(record)}; send a JSON object or an array of objects"
            )
    return records


class HttpSource(Source[HttpSourceConfig]):
    """Accept JSON records over HTTP, guarded by a bearer token."""

    metadata = PluginMetadata(
        "http",
        PluginKind.SOURCE,
        "JSON records posted to an HTTP endpoint with a bearer token",
    )
    Config = HttpSourceConfig

    def __init__(self, config: HttpSourceConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._schema = config.declared_schema()
        self._inbox = _Inbox(config.queue_records)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._last_logged: dict[int, float] = {}  # status -> monotonic time

    @property
    def bounded(self) -> bool:
        return False

    def schema(self) -> pa.Schema:
        return self._schema

    # --- the server ---

    def open(self) -> None:
        if self.context.parallelism > 1:
            raise ValueError(
                f"the http source {self.context.step!r} runs as one instance, "
                "since instances cannot share a port; remove `parallelism`"
            )
        self._decoder = JsonRecordDecoder(self._schema)
        self._expected = f"Bearer {self.config.token.reveal()}".encode()
        listener = self._listen()
        self._serve(listener)
        self.context.logger.info(
            "step %r: accepting JSON records at %s",
            self.context.step,
            self.address(),
        )

    def address(self) -> str:
        """Return the endpoint's URL."""
        return f"http://{self.config.host}:{self.config.port}{self.config.path}"

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.config.host, self.config.port))
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise OSError(
                f"cannot listen on {self.config.host}:{self.config.port} for step "
                f"{self.context.step!r}: {exc.strerror}; choose a free `port` or "
                "stop the program using it"
            ) from exc
        return listener

    def _serve(self, listener: socket.socket) -> None:
        """Start uvicorn on `listener` on a thread and wait until it serves."""
        app = Starlette(
            routes=[
                Route(self.config.path, self._ingest, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
            ]
        )
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                loop="asyncio",
                http="h11",
                ws="none",
                server_header=False,
                timeout_graceful_shutdown=5,
            )
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [listener]},
            name=f"{self.context.step}-http",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + _START_SECONDS
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                listener.close()
                raise OSError(
                    f"the HTTP server for step {self.context.step!r} did not start "
                    f"on {self.address()} within {_START_SECONDS:g} s"
                )
            time.sleep(0.01)

    def close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=10)

    async def _health(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def _ingest(self, request: Request) -> Response:
        inbox = self._inbox
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            return self._reject(
                request,
                401,
                "http_unauthorized",
                "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        if inbox.closed:
            return _error(503, "the pipeline is stopping; send the records later")
        body = await self._body(request)
        if body is None:
            return self._reject(
                request,
                413,
                "http_too_large",
                f"the body is larger than {self.config.max_body_bytes} bytes; "
                "send the records in smaller requests",
            )
        records = _parse_records(body)
        if isinstance(records, str):
            return self._reject(request, 400, "http_bad_requests", records)
        if len(records) > inbox.capacity:
            return self._reject(
                request,
                413,
                "http_too_large",
                f"the request has {len(records)} records, more than the "
                f"{inbox.capacity} the queue can contain; send smaller requests",
            )
        request_id = inbox.offer(records)
        if request_id is None:
            return self._reject(
                request,
                429,
                "http_throttled",
                "the pipeline is backed up; retry later",
                {"Retry-After": str(self.config.retry_after)},
            )
        return JSONResponse(
            {"accepted": len(records), "request": request_id}, status_code=202
        )

    def _reject(
        self,
        request: Request,
        status: int,
        counter: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        """Count a rejected request, log it (once a minute per status at
        most), and return the error response."""
        self._inbox.count(counter)
        now = time.monotonic()
        if (
            now - self._last_logged.get(status, -_LOG_EVERY_SECONDS)
            >= _LOG_EVERY_SECONDS
        ):
            self._last_logged[status] = now
            client = request.client.host if request.client else "unknown client"
            self.context.logger.warning(
                "step %r: rejected a request from %s with %d: %s "
                "(logged once a minute; the run summary counts %s)",
                self.context.step,
                client,
                status,
                message,
                counter,
            )
        return _error(status, message, **(headers or {}))

    async def _body(self, request: Request) -> bytes | None:
        """Read the body, or return None once it exceeds `max_body_bytes`."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    # --- reading ---

    def read(self) -> Iterator[SourceBatch | Idle]:
        timeout = self.config.poll_interval.total_seconds()
        inbox = self._inbox
        while True:
            stopping = self.context.stopping
            if stopping:
                inbox.closed = True  # new requests get 503; drain the queue
            requests = inbox.take(self.config.batch_records, 0 if stopping else timeout)
            for name, value in inbox.drain_counts().items():
                self.context.count(name, value)
            if not requests:
                if stopping:
                    return
                yield IDLE
                continue
            batch = self._decode(requests)
            if batch is not None:
                yield batch

    def _decode(self, requests: list[tuple[int, list[Any]]]) -> SourceBatch | None:
        payloads = []
        where: list[str] = []
        numbers: list[int] = []
        for request_id, records in requests:
            label = f"http request {request_id}"
            for number, record in enumerate(records, start=1):
                payloads.append(orjson.dumps(record))
                where.append(label)
                numbers.append(number)
        decoded = self._decoder.decode(payloads)
        if decoded.rejected:
            self.context.reject(
                [record for _, record, _ in decoded.rejected],
                [reason for _, _, reason in decoded.rejected],
                [f"{where[i]} record {numbers[i]}" for i, _, _ in decoded.rejected],
            )
        if not decoded.batch.num_rows:
            return None
        origin = MessageOrigin(
            [where[i] for i in decoded.kept],
            [numbers[i] for i in decoded.kept],
            unit="record",
        )
        return SourceBatch(decoded.batch, origin)

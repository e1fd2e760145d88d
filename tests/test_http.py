"""The HTTP source (an ingest endpoint) and sink (batched POSTs), on loopback.

The source's server listens on a free port of 127.0.0.1. The sink posts to
`Receiver`, a small `http.server` of these tests that records what it gets,
can respond with given statuses first, and can be stopped and started again
on the same port.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import orjson
import pyarrow as pa
import pytest
from conftest import RecordingContext

from dataflare import api
from dataflare.connectors.http.sink import HttpSink, HttpSinkConfig
from dataflare.connectors.http.source import HttpSource, HttpSourceConfig
from dataflare.plugin.interface import (
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    SourceBatch,
)
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.metrics import RunSummary
from dataflare.streaming.runner import PipelineRun

TOKEN = "test-token-5d1f"
SCHEMA = {"id": "int", "price": "float", "name": "string", "at": "timestamp"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("DATAFLARE_TEST_TOKEN", TOKEN)
    return {"env": "DATAFLARE_TEST_TOKEN"}


def records(first: int, count: int) -> pa.Table:
    ids = list(range(first, first + count))
    start = dt.datetime(2024, 7, 1, 12, tzinfo=dt.UTC)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "price": pa.array([i * 1.5 for i in ids], pa.float64()),
            "name": pa.array([f"n{i} ✓" for i in ids], pa.string()),
            "at": pa.array(
                [start + dt.timedelta(seconds=i, microseconds=3) for i in ids],
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )


def as_json(table: pa.Table) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = table.to_pylist()
    for row in rows:
        row["at"] = row["at"].isoformat()
    return rows


class BlockedSink(Sink[SinkConfig]):
    """A destination that blocks every write until `released` is set."""

    metadata = PluginMetadata("blocked", PluginKind.SINK, "Waits, then keeps rows")
    Config = SinkConfig
    released: ClassVar[threading.Event] = threading.Event()
    rows: ClassVar[list[dict[str, Any]]] = []

    def write(self, batch: pa.RecordBatch) -> None:
        while not self.released.wait(0.05):
            pass
        self.rows.extend(batch.to_pylist())


def registry() -> PluginRegistry:
    plugins = PluginRegistry.from_entry_points()
    plugins.register("http", HttpSource)
    plugins.register("http", HttpSink)
    plugins.register("blocked", BlockedSink)
    return plugins


def start(pipeline: api.Pipeline) -> tuple[PipelineRun, Callable[[], RunSummary]]:
    """Start a pipeline on a thread; return it and a function that stops it."""
    run = PipelineRun(pipeline.build())
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = run.run()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def stop() -> RunSummary:
        run.stop()
        thread.join(60)
        if "error" in outcome:
            raise outcome["error"]
        summary: RunSummary = outcome["summary"]
        return summary

    return run, stop


def wait_for(condition: Callable[[], bool], what: str, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def wait_until_serving(port: int) -> None:
    def serving() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(serving, f"the HTTP source on port {port}")


# --- the source --------------------------------------------------------------------


@pytest.fixture
def endpoint(token: dict[str, str]) -> Iterator[tuple[HttpSource, RecordingContext]]:
    """An opened HTTP source on a free port, with its recording context."""
    context = RecordingContext("ingest")
    config = HttpSourceConfig.model_validate(
        {"port": free_port(), "token": token, "schema": SCHEMA, "poll_interval": 0.02}
    )
    plugin = HttpSource(config, context)
    plugin.open()
    try:
        yield plugin, context
    finally:
        plugin.close()


def post(plugin: HttpSource, body: Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    auth = {"Authorization": f"Bearer {TOKEN}"} | headers
    return httpx.post(plugin.address(), content=content, headers=auth)


def take(plugin: HttpSource, count: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    idle = 0
    for item in plugin.read():
        if isinstance(item, SourceBatch):
            rows += item.batch.to_pylist()
        else:
            idle += 1
        if len(rows) >= count or idle > 50:
            return rows
    return rows


def test_source_requires_the_token(
    endpoint: tuple[HttpSource, RecordingContext],
) -> None:
    plugin, _ = endpoint
    missing = httpx.post(plugin.address(), content=b'{"id": 1}')
    wrong = post(plugin, {"id": 1}, Authorization="Bearer nope")
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert "bearer token" in missing.json()["error"]
    assert TOKEN not in missing.text + wrong.text
    assert take(plugin, 1) == []  # nothing was accepted


def test_source_rejects_bad_json_with_400(
    endpoint: tuple[HttpSource, RecordingContext],
) -> None:
    plugin, _ = endpoint
    broken = post(plugin, b'{"id": 1,')
    assert broken.status_code == 400
    assert "invalid JSON at line 1" in broken.json()["error"]
    scalar = post(plugin, [{"id": 1}, 7])
    assert scalar.status_code == 400
    assert scalar.json()["error"].startswith("element 2 is a number")
    assert take(plugin, 1) == []  # a request is accepted whole or not at all


def test_source_accepts_an_object_or_an_array(
    endpoint: tuple[HttpSource, RecordingContext],
) -> None:
    plugin, context = endpoint
    one = post(plugin, {"id": 1, "name": "one", "at": "2024-07-01T12:00:00Z"})
    assert one.status_code == 202
    assert one.json() == {"accepted": 1, "request": 1}
    many = post(plugin, [{"id": 2, "price": 2.5}, {"id": "three"}, {"id": 4}])
    assert many.status_code == 202
    assert many.json() == {"accepted": 3, "request": 2}

    rows = take(plugin, 3)
    assert [r["id"] for r in rows] == [1, 2, 4]
    assert rows[0]["at"] == dt.datetime(2024, 7, 1, 12, tzinfo=dt.UTC)
    assert [(record, position) for record, _, position in context.rejected] == [
        ({"id": "three"}, "http request 2 record 2")
    ]


def test_source_refuses_bodies_over_the_limit(token: dict[str, str]) -> None:
    config = HttpSourceConfig.model_validate(
        {
            "port": free_port(),
            "token": token,
            "schema": SCHEMA,
            "max_body_bytes": 100,
            "queue_records": 3,
        }
    )
    plugin = HttpSource(config, RecordingContext())
    plugin.open()
    try:
        assert (
            post(plugin, [{"id": i, "name": "x" * 20} for i in range(5)]).status_code
            == 413
        )
        assert post(plugin, [{"id": i} for i in range(4)]).status_code == 413
        assert post(plugin, [{"id": i} for i in range(3)]).status_code == 202
    finally:
        plugin.close()


def test_source_port_in_use_is_a_clear_error(token: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = HttpSourceConfig.model_validate(
            {"port": port, "token": token, "schema": SCHEMA}
        )
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            HttpSource(config, RecordingContext()).open()


def test_pipeline_records_in_equal_records_out(
    token: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    table = records(1, 3_000)
    p = api.Pipeline("http-in").use_registry(registry())
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    events = p.source("events", "http", port=port, token=token, schema=SCHEMA)
    p.destination("out", "memory", [events])
    run, stop = start(p)
    wait_until_serving(port)
    url = f"http://127.0.0.1:{port}/ingest"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(headers=headers) as client:
        for chunk in table.to_batches(max_chunksize=250):
            answer = client.post(url, content=orjson.dumps(as_json(chunk)))
            assert answer.status_code == 202
        bad = [{"id": "x1"}, {"id": 5, "at": "yesterday"}]
        assert client.post(url, content=orjson.dumps(bad)).status_code == 202
    wait_for(lambda: run.snapshot().records_written >= 3_000, "3,000 records")
    summary = stop()

    out = summary.output("out").sort_by("id")
    assert out.schema == table.schema
    assert out.equals(table)
    assert summary.rejected == 2
    dead = [
        json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()
    ]
    assert [d["position"] for d in dead] == [
        "http request 13 record 1",
        "http request 13 record 2",
    ]


def test_backed_up_pipeline_answers_429_with_retry_after(
    token: dict[str, str],
) -> None:
    BlockedSink.released.clear()
    BlockedSink.rows.clear()
    port = free_port()
    p = api.Pipeline("http-slow").use_registry(registry())
    p.execution(queue_batches=1, max_batch_rows=10)
    events = p.source(
        "events", "http", port=port, token=token, schema=SCHEMA, queue_records=40
    )
    p.destination("out", "blocked", [events])
    run, stop = start(p)
    wait_until_serving(port)
    url = f"http://127.0.0.1:{port}/ingest"
    sent = 0
    throttled: httpx.Response | None = None
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        for request in range(500):
            body = [{"id": request * 10 + i} for i in range(10)]
            answer = client.post(url, content=orjson.dumps(body))
            if answer.status_code == 429:
                throttled = answer
                break
            assert answer.status_code == 202
            sent += 10
        assert throttled is not None, "the endpoint never answered 429"
        assert throttled.headers["Retry-After"] == "1"
        assert "backed up" in throttled.json()["error"]

        BlockedSink.released.set()  # the destination catches up
        retry = [{"id": 100_000}]
        while client.post(url, content=orjson.dumps(retry)).status_code == 429:
            time.sleep(float(throttled.headers["Retry-After"]))
        sent += 1
    wait_for(lambda: run.snapshot().records_written >= sent, f"{sent} records")
    summary = stop()
    assert summary.records_written == sent
    assert summary.steps[0].counters["http_throttled"] >= 1


# --- the sink ----------------------------------------------------------------------


class Receiver:
    """A local HTTP server that records POSTed JSON arrays.

    `plan` lists (status, headers) responses given, in order, before the
    default 200; the server can be stopped and started on the same port.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[str | None, list[dict[str, Any]]]] = []
        self.headers: list[dict[str, str]] = []
        self.plan: list[tuple[int, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.server: http.server.ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/collect"

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.headers.append(dict(self.headers))
                    status, extra = receiver.plan.pop(0) if receiver.plan else (200, {})
                    if status == 200:
                        key = self.headers.get("Idempotency-Key")
                        receiver.requests.append((key, json.loads(body)))
                answer = b'{"error": "try later"}' if status != 200 else b"{}"
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(10)
            self.server = None

    def rows(self) -> list[dict[str, Any]]:
        """Rows received, each batch once (by Idempotency-Key)."""
        with self.lock:
            batches = dict(self.requests)
        return [row for batch in batches.values() for row in batch]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def sink(receiver: Receiver, **config: Any) -> HttpSink:
    settings = {"url": receiver.url, "retry_max_wait": 0.2, **config}
    plugin = HttpSink(HttpSinkConfig.model_validate(settings), RecordingContext("out"))
    plugin.open()
    return plugin


def test_sink_posts_json_arrays_with_idempotency_keys(
    receiver: Receiver, token: dict[str, str]
) -> None:
    table = records(1, 1_234)
    p = api.Pipeline("http-out").use_registry(registry())
    rows = p.source("rows", "memory", records=table)
    p.destination(
        "out", "http", [rows], url=receiver.url, token=token, batch_records=500
    )
    summary = p.run()

    assert summary.records_written == 1_234
    assert summary.delivery["out"] == "at-least-once"
    keys = [key for key, _ in receiver.requests]
    assert len(keys) == len(set(keys)) == 3
    assert [len(batch) for _, batch in receiver.requests] == [500, 500, 234]
    assert receiver.rows() == [
        row | {"at": row["at"].replace("+00:00", "Z")} for row in as_json(table)
    ]
    sent = receiver.headers[0]
    assert sent["Authorization"] == f"Bearer {TOKEN}"
    assert sent["Content-Type"] == "application/json"


def test_sink_retries_with_the_same_idempotency_key(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.plan = [(503, {}), (429, {"Retry-After": "1"}), (500, {})]
    plugin = sink(receiver)
    try:
        with caplog.at_level(logging.WARNING):
            plugin.write(records(1, 5).to_batches()[0])
    finally:
        plugin.close()

    keys = {h["Idempotency-Key"] for h in receiver.headers}
    assert len(receiver.headers) == 4
    assert len(keys) == 1
    assert [r["id"] for r in receiver.rows()] == [1, 2, 3, 4, 5]
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 3
    assert "503" in retries[0]
    assert "429" in retries[1]


def test_sink_fails_at_once_on_a_client_error(receiver: Receiver) -> None:
    receiver.plan = [(422, {})]
    plugin = sink(receiver)
    try:
        expected = r"failed with status 422 .*Retrying cannot succeed"
        with pytest.raises(ValueError, match=expected):
            plugin.write(records(1, 2).to_batches()[0])
    finally:
        plugin.close()
    assert len(receiver.headers) == 1


def test_sink_gives_up_after_retry_for(receiver: Receiver) -> None:
    receiver.stop()
    plugin = sink(receiver, retry_for=0.5)
    try:
        with pytest.raises(OSError, match=r"failed for 0\.5 s .*raise `retry_for`"):
            plugin.write(records(1, 2).to_batches()[0])
    finally:
        plugin.close()


def test_sink_url_credentials_stay_out_of_messages(receiver: Receiver) -> None:
    receiver.plan = [(401, {})]
    secret_url = receiver.url.replace("http://", "http://user:hunter2@") + "?key=s3"
    plugin = sink(receiver, url=secret_url)
    try:
        with pytest.raises(ValueError) as failure:
            plugin.write(records(1, 1).to_batches()[0])
    finally:
        plugin.close()
    assert "hunter2" not in str(failure.value)
    assert "s3" not in str(failure.value)
    assert plugin.info().paths == [receiver.url]


def test_sink_through_a_server_restart(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """The sink retries while the server is down and loses nothing."""
    count = 600
    p = api.Pipeline("http-restart").use_registry(registry())
    rows = p.source(
        "rows", "generate", rate=200, count=count, fields={"id": "sequence"}
    )
    p.destination(
        "out", "http", [rows], url=receiver.url, batch_records=20, retry_max_wait=0.5
    )
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=p.run()))
    with caplog.at_level(logging.WARNING):
        thread.start()
        wait_for(lambda: len(receiver.rows()) >= 100, "the first records")
        receiver.stop()
        received_before = len(receiver.rows())
        wait_for(
            lambda: any("retrying" in r.getMessage() for r in caplog.records),
            "a retry",
        )
        receiver.start()
        thread.join(120)

    assert outcome["summary"].records_written == count
    assert received_before < count  # records were flowing during the outage
    ids = sorted(row["id"] for row in receiver.rows())
    assert ids == list(range(1, count + 1))
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries and all(f"POST {receiver.url} failed" in m for m in retries)

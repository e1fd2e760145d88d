"""The NATS JetStream source and sink against a real nats-server.

Most tests use the server at 127.0.0.1:4222 (started by .ci/run), each with
streams of its own names. The restart test starts a private nats-server
with JetStream on a free port, so that stopping it disturbs no other test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pyarrow as pa
import pytest
from conftest import RecordingContext
from nats.js.api import StreamConfig
from test_kafka_support import (
    ARROW_SCHEMA,
    EMITTED,
    HOST,
    RECORD_SCHEMA,
    Running,
    Server,
    free_port,
    need,
    port_open,
    record,
    registry,
    stop_runs,  # noqa: F401 (an autouse fixture)
    wait_until,
)

from dataflare import Pipeline
from dataflare.connectors.nats import (
    NatsSink,
    NatsSinkConfig,
    NatsSource,
    NatsSourceConfig,
)
from dataflare.connectors.nats.source import RangeSet, to_ranges
from dataflare.plugin.interface import SourceBatch

PLUGINS = (("nats", NatsSource), ("nats", NatsSink))
SHARED = f"nats://{HOST}:4222"


@pytest.fixture
def server() -> str:
    need(
        f"NATS with JetStream at {SHARED}",
        port_open(4222),
        "start nats-server -js (see .ci/run)",
    )
    return SHARED


class Stream:
    """A JetStream stream of a unique name, deleted after the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"T{uuid.uuid4().hex[:10].upper()}"
        self.subject = f"{self.name.lower()}.data"
        self.call(self._create())

    def call(self, coroutine: Any) -> Any:
        return asyncio.run(coroutine)

    async def _js(self) -> tuple[Any, Any]:
        client = await nats.connect(self.url)
        return client, client.jetstream()

    async def _create(self) -> None:
        client, js = await self._js()
        await js.add_stream(
            StreamConfig(name=self.name, subjects=[f"{self.name.lower()}.>"])
        )
        await client.close()

    def publish(
        self, payloads: list[bytes], headers: dict[str, str] | None = None
    ) -> None:
        async def run() -> None:
            client, js = await self._js()
            for payload in payloads:
                await js.publish(self.subject, payload, headers=headers)
            await client.close()

        self.call(run())

    def messages(self) -> list[bytes]:
        """Return the payloads of every message in the stream, in order."""

        async def run() -> list[bytes]:
            client, js = await self._js()
            info = await js.stream_info(self.name)
            found = []
            for sequence in range(info.state.first_seq, info.state.last_seq + 1):
                message = await js.get_msg(self.name, sequence)
                found.append(message.data or b"")
            await client.close()
            return found

        result: list[bytes] = self.call(run())
        return result

    def consumer(self, durable: str) -> Any:
        async def run() -> Any:
            client, js = await self._js()
            info = await js.consumer_info(self.name, durable)
            await client.close()
            return info

        return self.call(run())

    def delete(self) -> None:
        async def run() -> None:
            client, js = await self._js()
            await js.delete_stream(self.name)
            await client.close()

        self.call(run())


@pytest.fixture
def stream(server: str) -> Iterator[Stream]:
    created = Stream(server)
    yield created
    created.delete()


def encoded(i: int) -> bytes:
    return json.dumps(record(i), default=lambda v: v.isoformat()).encode()


def read_rows(source: NatsSource, count: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    for item in source.read():
        if isinstance(item, SourceBatch):
            rows += item.batch.to_pylist()
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"only {len(rows)} of {count} rows came"
    return rows


def source_config(stream: Stream, **extra: Any) -> dict[str, Any]:
    return {
        "servers": stream.url,
        "stream": stream.name,
        "durable": f"d{uuid.uuid4().hex[:8]}",
        "schema": RECORD_SCHEMA,
        **extra,
    }


def test_nats_round_trip_keeps_types(stream: Stream) -> None:
    plugins = registry(*PLUGINS)
    records = [record(i) for i in range(300)]
    writer = Pipeline("nats-write").use_registry(plugins)
    rows = writer.source("rows", "memory", records=records)
    writer.destination(
        "out", "nats", [rows], servers=stream.url, subject=stream.subject
    )
    assert writer.run().records_written == 300

    reader = Pipeline("nats-read").use_registry(plugins)
    events = reader.source("events", "nats", **source_config(stream))
    reader.destination("got", "memory", [events], include_metadata=True)
    running = Running(reader.build())
    wait_until(lambda: running.read() >= 300, what="300 records read")
    table = running.stop().output("got")

    assert table.select(ARROW_SCHEMA.names).schema == ARROW_SCHEMA
    assert table.select(ARROW_SCHEMA.names).to_pylist() == records
    assert set(table.column("_key").to_pylist()) == {stream.subject}
    assert table.column("_offset").to_pylist() == list(range(1, 301))
    headers = table.column("_headers").to_pylist()
    assert all(dict(h).get("Nats-Msg-Id") for h in headers)


def test_source_rejects_bad_messages_with_sequence(
    stream: Stream, tmp_path: Path
) -> None:
    stream.publish([encoded(1), b"{oops", b"", b'{"id": 1.5}', encoded(2)])
    p = Pipeline("nats-bad").use_registry(registry(*PLUGINS))
    dead = tmp_path / "dead.jsonl"
    p.errors(dead_letter={"path": str(dead)})
    events = p.source("events", "nats", **source_config(stream))
    p.destination("got", "memory", [events])
    running = Running(p.build())
    wait_until(lambda: running.read() >= 2, what="the good records")
    wait_until(lambda: running.run.snapshot().rejected >= 3, what="3 rejects")
    table = running.stop().output("got")

    assert table.column("id").to_pylist() == [1, 2]
    rejected = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [r["position"] for r in rejected] == [
        f"nats stream {stream.name} sequence {n}" for n in (2, 3, 4)
    ]
    assert "empty payload" in rejected[1]["reason"]
    assert "field 'id'" in rejected[2]["reason"]


def test_source_acks_on_checkpoint(
    stream: Stream,
) -> None:
    stream.publish([encoded(i) for i in range(100)])
    settings = source_config(stream, ack_wait="1s", batch=25)
    config = NatsSourceConfig.model_validate(settings)
    context = RecordingContext("ack")
    context.checkpointing = True  # type: ignore[attr-defined]
    first = NatsSource(config, context)
    first.open()
    before = read_rows(first, 50)
    position = first.snapshot_position()
    after = read_rows(first, 50)  # emitted after the checkpoint's barrier
    first.notify_checkpoint_complete(1)
    # The server applies the acknowledgements a moment after they are sent.
    deadline = time.monotonic() + 5
    info = stream.consumer(settings["durable"])
    while info.ack_floor.stream_seq < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
        info = stream.consumer(settings["durable"])
    first.close()  # a crash: the messages after the checkpoint stay unacknowledged

    assert len(before) == 50
    assert info.ack_floor.stream_seq == 50
    assert info.num_ack_pending == 50
    assert position["pending"] == [[1, 50]]
    # JetStream delivers the unacknowledged messages again after ack_wait.
    second = NatsSource(config, RecordingContext("ack"))
    second.open()
    again = read_rows(second, 50)
    second.close()  # without checkpointing: acknowledged per batch
    assert [r["id"] for r in again] == [r["id"] for r in after]
    assert stream.consumer(settings["durable"]).num_ack_pending == 0


def test_restored_source_skips_covered_messages(
    stream: Stream,
) -> None:
    stream.publish([encoded(i) for i in range(20)])
    settings = source_config(stream, ack_wait="1s")
    config = NatsSourceConfig.model_validate(settings)
    context = RecordingContext("skip")
    context.checkpointing = True  # type: ignore[attr-defined]
    first = NatsSource(config, context)
    first.open()
    read_rows(first, 20)
    position = first.snapshot_position()
    first.close()  # crash after the checkpoint, before its acknowledgements

    restored = NatsSource(config, context)
    restored.open()
    restored.restore_position(position)
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    for item in restored.read():
        if isinstance(item, SourceBatch):
            rows += item.batch.to_pylist()
        if time.monotonic() > deadline:
            break
    restored.close()
    assert rows == []  # covered by the checkpoint: acknowledged, not emitted
    assert stream.consumer(settings["durable"]).num_ack_pending == 0


def test_sink_ids_deduplicate_replays(stream: Stream) -> None:
    config = NatsSinkConfig.model_validate(
        {"servers": stream.url, "subject": stream.subject}
    )
    batch = pa.RecordBatch.from_pylist([record(i) for i in range(10)], ARROW_SCHEMA)
    later = pa.RecordBatch.from_pylist(
        [record(i) for i in range(10, 20)] + [record(10)], ARROW_SCHEMA
    )
    first = NatsSink(config, RecordingContext("out"))
    first.transactional = True
    first.open()
    first.write(batch)
    state = first.prepare_commit(7)
    first.write(later)  # after checkpoint 7, then a crash
    first.close()

    second = NatsSink(config, RecordingContext("out"))
    second.transactional = True
    second.open()
    second.restore(state, 7)
    reordered = later.take(pa.array(list(reversed(range(later.num_rows)))))
    second.write(reordered)  # the records after the checkpoint, again
    second.close()

    stored = [json.loads(m)["id"] for m in stream.messages()]
    assert stored == [*range(20), 10]  # the repeated record 10 is kept once more
    assert second.duplicates == 11


def test_sink_id_field_sets_message_ids(stream: Stream) -> None:
    config = NatsSinkConfig.model_validate(
        {"servers": stream.url, "subject": stream.subject, "id_field": "id"}
    )
    sink = NatsSink(config, RecordingContext("out"))
    sink.open()
    batch = pa.RecordBatch.from_pylist([record(i) for i in range(5)], ARROW_SCHEMA)
    sink.write(batch)
    sink.write(batch)
    sink.close()
    assert len(stream.messages()) == 5


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[Server]:
    binary = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )
    need("nats-server", binary is not None, "apt-get install nats-server")
    assert binary is not None
    port = free_port()
    server = Server(
        "nats-server",
        [binary, "-a", HOST, "-p", str(port), "-js", "-sd", str(tmp_path / "js")],
        port,
        tmp_path / "nats.log",
    )
    server.start()
    yield server
    server.stop()


def test_pipeline_survives_server_restart(
    private_nats: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    stream = Stream(f"nats://{HOST}:{private_nats.port}")
    total = 600
    p = Pipeline("nats-restart").use_registry(registry(*PLUGINS))
    rows = p.source("rows", "paced", total=total, per_batch=10, pause=0.02)
    p.destination("to_nats", "nats", [rows], servers=stream.url, subject=stream.subject)
    events = p.source("events", "nats", **source_config(stream))
    p.destination("got", "memory", [events])
    running = Running(p.build())

    wait_until(lambda: EMITTED.get("rows", 0) >= total // 3, what="a third written")
    private_nats.restart(down_for=2.0)
    wait_until(
        lambda: running.read() >= 2 * total, timeout=120, what="every record read"
    )
    table = running.stop().output("got")

    assert table.select(ARROW_SCHEMA.names).to_pylist() == [
        record(i) for i in range(total)
    ]  # nothing lost, nothing repeated, in order
    assert len(stream.messages()) == total  # the sink's retries were deduplicated
    assert "lost the connection to NATS" in caplog.text
    assert "connected to NATS again" in caplog.text


def test_range_set_joins_neighbours() -> None:
    numbers = RangeSet([])
    for n in [5, 3, 4, 10, 1, 2, 9, 7]:
        numbers.add(n)
    assert [n for n in range(12) if n in numbers] == [1, 2, 3, 4, 5, 7, 9, 10]
    assert numbers._firsts == [1, 7, 9]
    assert numbers._lasts == [5, 7, 10]
    assert to_ranges([1, 2, 3, 7, 9, 10]) == [[1, 3], [7, 7], [9, 10]]

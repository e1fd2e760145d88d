"""The RabbitMQ source and sink against the local broker (127.0.0.1:5672).

Each test uses queues of its own, named with a random suffix, and deletes
them at the end. Without a reachable broker the tests skip, or fail when
the CI variable is set. `test_pipeline_through_broker_restart` stops and
starts the broker (`rabbitmqctl stop`, `rabbitmq-server -detached`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pyarrow as pa
import pytest
from aiormq.exceptions import ChannelInvalidStateError
from conftest import RecordingContext

from dataflare import api
from dataflare.connectors.rabbitmq import (
    RabbitMQSink,
    RabbitMQSinkConfig,
    RabbitMQSource,
    RabbitMQSourceConfig,
)
from dataflare.plugin.interface import Idle, SourceBatch
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.metrics import RunSummary
from dataflare.streaming.runner import PipelineRun

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/"
SCHEMA = {
    "id": "int",
    "price": "float",
    "name": "string",
    "paid": "bool",
    "at": "timestamp",
    "day": "date",
}


def _reachable() -> str | None:
    try:
        socket.create_connection((HOST, PORT), timeout=2).close()
    except OSError as exc:
        return f"RabbitMQ is not reachable on {HOST}:{PORT} ({exc.strerror})"
    return None


@pytest.fixture(autouse=True)
def rabbitmq() -> None:
    problem = _reachable()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{problem}; .ci/run starts it with `rabbitmq-server -detached`")
    pytest.skip(f"{problem}; start it with `rabbitmq-server -detached`")


# --- broker helpers --------------------------------------------------------


def broker(operation: Callable[[aio_pika.abc.AbstractChannel], Any]) -> Any:
    """Run `operation(channel)` on a fresh connection and return its result."""

    async def main() -> Any:
        connection = await aio_pika.connect(URL)
        try:
            channel = await connection.channel()
            return await operation(channel)
        finally:
            await connection.close()

    return asyncio.run(main())


def publish_raw(queue: str, bodies: list[bytes]) -> None:
    async def go(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(queue, durable=True)
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                queue,
            )

    broker(go)


def drain(queue: str) -> list[dict[str, Any]]:
    """Take every message of `queue` (acknowledging it) as parsed JSON."""

    async def go(channel: aio_pika.abc.AbstractChannel) -> list[dict[str, Any]]:
        q = await channel.declare_queue(queue, durable=True)
        bodies = []
        while (message := await q.get(fail=False)) is not None:
            bodies.append(orjson.loads(message.body))
            await message.ack()
        return bodies

    result: list[dict[str, Any]] = broker(go)
    return result


def ready_count(queue: str) -> int:
    async def go(channel: aio_pika.abc.AbstractChannel) -> int:
        q = await channel.declare_queue(queue, durable=True, passive=True)
        return int(q.declaration_result.message_count or 0)

    count: int = broker(go)
    return count


@pytest.fixture
def queues() -> Iterator[Callable[[], str]]:
    """Make unique queue names; delete the queues afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"dataflare-test-{uuid.uuid4().hex[:10]}"
        made.append(name)
        return name

    yield make

    async def delete(channel: aio_pika.abc.AbstractChannel) -> None:
        for name in made:
            await channel.queue_delete(name)

    if _reachable() is None:
        broker(delete)


# --- plugin helpers ----------------------------------------------------------


class CheckpointingContext(RecordingContext):
    """A recording context of a run that takes checkpoints."""

    def __init__(self, step: str = "step") -> None:
        super().__init__(step)
        self.checkpointing = True


def source(
    queue: str, context: RecordingContext | None = None, **config: Any
) -> RabbitMQSource:
    settings = {"queue": queue, "schema": SCHEMA, "poll_interval": 0.05, **config}
    return RabbitMQSource(
        RabbitMQSourceConfig.model_validate(settings), context or RecordingContext()
    )


def read_rows(items: Iterator[SourceBatch | Idle], count: int) -> list[dict[str, Any]]:
    """Read from a running `read()` until `count` rows arrived.

    Stops right after the batch that completes `count`, as the engine does
    before a checkpoint; gives up when the source stays idle for long.
    """
    rows: list[dict[str, Any]] = []
    idle = 0
    for item in items:
        if isinstance(item, SourceBatch):
            rows += item.batch.to_pylist()
            idle = 0
        else:
            idle += 1
        if len(rows) >= count or idle > 100:
            break
    return rows


def records(first: int, count: int) -> pa.Table:
    ids = list(range(first, first + count))
    start = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "price": pa.array([i * 0.25 for i in ids], pa.float64()),
            "name": pa.array([f"item {i} é" for i in ids], pa.string()),
            "paid": pa.array([i % 3 == 0 for i in ids], pa.bool_()),
            "at": pa.array(
                [start + dt.timedelta(seconds=i, microseconds=7) for i in ids],
                pa.timestamp("us", tz="UTC"),
            ),
            "day": pa.array(
                [dt.date(2024, 3, 1) + dt.timedelta(days=i % 30) for i in ids],
                pa.date32(),
            ),
        }
    )


def registry() -> PluginRegistry:
    plugins = PluginRegistry.from_entry_points()
    plugins.register("rabbitmq", RabbitMQSource)
    plugins.register("rabbitmq", RabbitMQSink)
    return plugins


def run_until(
    pipeline: api.Pipeline, done: Callable[[PipelineRun], bool], limit: float = 180
) -> RunSummary:
    """Run an unbounded pipeline on a thread until `done(run)`, then stop it."""
    run = PipelineRun(pipeline.build())
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = run.run()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + limit
    while thread.is_alive() and not done(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.stop()
    thread.join(60)
    if "error" in outcome:
        raise outcome["error"]
    summary: RunSummary = outcome["summary"]
    return summary


# --- tests -------------------------------------------------------------------


def test_records_round_trip_with_types(
    queues: Callable[[], str], tmp_path: Path
) -> None:
    queue = queues()
    table = records(1, 2_500)
    p = api.Pipeline("rabbitmq-write").use_registry(registry())
    rows = p.source("rows", "memory", records=table, batch_rows=700)
    p.destination("out", "rabbitmq", [rows], routing_key=queue, queue=queue)
    written = p.run()
    assert written.records_written == table.num_rows
    assert written.delivery["out"] == "at-least-once"

    q = api.Pipeline("rabbitmq-read").use_registry(registry())
    q.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    messages = q.source("messages", "rabbitmq", queue=queue, schema=SCHEMA)
    q.destination("out", "memory", [messages])
    summary = run_until(q, lambda run: run.snapshot().records_written >= 2_500)

    out = summary.output("out").sort_by("id")
    assert out.schema == table.schema
    assert out.equals(table)
    assert summary.rejected == 0
    assert ready_count(queue) == 0  # acknowledged after being emitted


def test_bad_payloads_go_to_the_dead_letter_output(queues: Callable[[], str]) -> None:
    queue = queues()
    publish_raw(
        queue,
        [
            b'{"id": 1, "name": "fine"}',
            b"not json",
            b'{"id": "seven"}',
            b"",
            b"[1, 2]",
            b'{"id": 6,\n "name": "two lines"}',
        ],
    )
    context = RecordingContext("orders")
    plugin = source(queue, context)
    plugin.open()
    try:
        items = plugin.read()
        rows = read_rows(items, 2)
        next(items)  # the engine requests the next item: the batch was emitted
    finally:
        plugin.close()

    assert [(r["id"], r["name"]) for r in rows] == [(1, "fine"), (6, "two lines")]
    where = f"rabbitmq queue {queue} message"
    rejected = [(record, position) for record, _, position in context.rejected]
    assert rejected == [
        ("not json", f"{where} 2"),
        ({"id": "seven"}, f"{where} 3"),
        ("", f"{where} 4"),
        ([1, 2], f"{where} 5"),
    ]
    reasons = [reason for _, reason, _ in context.rejected]
    assert "invalid JSON" in reasons[0]
    assert "'id'" in reasons[1]
    assert "integer" in reasons[1]
    assert "empty" in reasons[2]
    assert "array" in reasons[3]
    assert ready_count(queue) == 0  # rejected messages are acknowledged too


def test_acknowledges_when_a_checkpoint_completes(queues: Callable[[], str]) -> None:
    queue = queues()
    publish_raw(queue, [orjson.dumps({"id": i}) for i in range(1, 11)])
    first = source(queue, CheckpointingContext(), batch_messages=4)
    first.open()
    try:
        items = first.read()
        covered = [r["id"] for r in read_rows(items, 3)]
        first.snapshot_position()  # checkpoint 1 covers these
        later = [r["id"] for r in read_rows(items, 3)]
        first.snapshot_position()  # checkpoint 2 covers these too
        first.notify_checkpoint_complete(1)
    finally:
        first.close()  # checkpoint 2 never completed: `later` goes back
    assert covered + later == list(range(1, len(covered) + len(later) + 1))

    context = CheckpointingContext()
    second = source(queue, context)
    second.open()
    try:
        items = second.read()
        rows = read_rows(items, 10 - len(covered))
        assert sorted(r["id"] for r in rows) == list(range(len(covered) + 1, 11))
        context.stopping = True
        assert list(items) == []  # reading ends when the run stops
        second.notify_checkpoint_complete(3)  # the final checkpoint covers all
    finally:
        second.close()
    assert ready_count(queue) == 0


def unacknowledged(queue: str) -> int:
    """Return the messages of `queue` delivered and not yet acknowledged."""
    command = "rabbitmqctl list_queues -q --no-table-headers"
    listing = subprocess.run(
        [*command.split(), "name", "messages_unacknowledged"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in listing.splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    raise AssertionError(f"queue {queue} is not listed")


def test_checkpointed_run_acknowledges_when_checkpoints_complete(
    queues: Callable[[], str], tmp_path: Path
) -> None:
    queue = queues()
    publish_raw(queue, [orjson.dumps({"id": i}) for i in range(300)])
    (tmp_path / "pipeline.yaml").write_text(
        f"""
id: rabbitmq-checkpoints
sources:
  messages:
    type: rabbitmq
    config: {{queue: {queue}, schema: {{id: int}}}}
destinations:
  out: {{type: memory, inputs: [messages]}}
checkpointing: {{interval: 200ms, storage: {tmp_path / "checkpoints"}}}
errors: {{dead_letter: {{path: {tmp_path / "dead.jsonl"}}}}}
"""
    )
    plan = api.load_pipeline(tmp_path / "pipeline.yaml", registry=registry())
    run = PipelineRun(plan)
    thread = threading.Thread(target=run.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while run.snapshot().records_written < 300 or unacknowledged(queue):
            assert time.monotonic() < deadline, "messages were not acknowledged"
            time.sleep(0.2)
        coordinator = run.executor.state.coordinator
        assert coordinator is not None and coordinator.completed
    finally:
        run.stop()
        thread.join(60)
    assert ready_count(queue) == 0  # nothing went back to the queue


class MessageOfClosedChannel:
    """A message acknowledged before its channel closed with the connection."""

    delivery_tag = 10**6

    @property
    def channel(self) -> object:
        raise ChannelInvalidStateError


@pytest.mark.parametrize("closed_channel", [False, True])
def test_acknowledges_after_emitting_without_checkpoints(
    queues: Callable[[], str], closed_channel: bool
) -> None:
    queue = queues()
    publish_raw(queue, [orjson.dumps({"id": i}) for i in range(5)])
    plugin = source(queue)
    plugin.open()
    try:
        if closed_channel:
            # As after a broker restart: the last acknowledged message belongs
            # to the old, closed channel, and new messages arrive on a new one.
            plugin._last_acked = MessageOfClosedChannel()  # type: ignore[assignment]
        items = plugin.read()
        assert len(read_rows(items, 5)) == 5
        next(items)  # the engine requests the next item: the batch was emitted
    finally:
        plugin.close()
    assert ready_count(queue) == 0


def test_missing_queue_without_declare_names_the_queue(
    queues: Callable[[], str],
) -> None:
    queue = queues()
    plugin = source(queue, declare=False, reconnect_for=1)
    with pytest.raises(ValueError, match=f"queue '{queue}'.*does not exist"):
        plugin.open()
    plugin.close()


def test_unroutable_messages_stop_the_sink() -> None:
    sink = RabbitMQSink(
        RabbitMQSinkConfig.model_validate({"routing_key": f"nobody-{uuid.uuid4()}"}),
        RecordingContext("out"),
    )
    sink.open()
    try:
        with pytest.raises(ValueError, match="no queue is bound"):
            sink.write(records(1, 3).to_batches()[0])
    finally:
        sink.close()


def test_user_other_than_guest_needs_a_password() -> None:
    with pytest.raises(ValueError, match="needs a password"):
        RabbitMQSinkConfig.model_validate({"routing_key": "q", "username": "app"})


def _start_broker() -> None:
    """Start the broker if it is down and wait until it takes connections."""
    if _reachable() is not None:
        subprocess.run(["rabbitmq-server", "-detached"], check=True)
    deadline = time.monotonic() + 180
    while _reachable() is not None:
        assert time.monotonic() < deadline, "RabbitMQ did not start within 180 s"
        time.sleep(0.5)
    subprocess.run(
        ["rabbitmqctl", "await_startup", "--timeout", "120"],
        check=True,
        capture_output=True,
    )


def _restart_broker() -> None:
    subprocess.run(["rabbitmqctl", "stop"], check=True, capture_output=True)
    _start_broker()


class Feeder(threading.Thread):
    """Publish records to a queue in small batches, through the sink plugin.

    The sink waits for confirms and reconnects by itself, so the feeder goes
    on through a broker restart and loses nothing.
    """

    def __init__(self, queue: str, table: pa.Table) -> None:
        super().__init__(daemon=True)
        self.table = table
        self.sent = 0
        self.error: BaseException | None = None
        config = RabbitMQSinkConfig.model_validate(
            {"routing_key": queue, "queue": queue, "reconnect_max_wait": 0.5}
        )
        self.sink = RabbitMQSink(config, RecordingContext("feeder"))

    def run(self) -> None:
        self.sink.open()
        try:
            for batch in self.table.to_batches(max_chunksize=10):
                self.sink.write(batch)
                self.sent += batch.num_rows
                time.sleep(0.1)
        except BaseException as exc:
            self.error = exc
        finally:
            self.sink.close()


def test_pipeline_through_broker_restart(
    queues: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    """Source and sink reconnect after a broker restart and lose nothing.

    Records flow all along: a feeder publishes them into the source's queue
    while the broker stops and starts again.
    """
    inbox, outbox = queues(), queues()
    count = 800
    feeder = Feeder(inbox, records(1, count))
    p = api.Pipeline("rabbitmq-restart").use_registry(registry())
    messages = p.source(
        "messages",
        "rabbitmq",
        queue=inbox,
        schema=SCHEMA,
        batch_messages=50,
        reconnect_max_wait=0.5,
    )
    p.destination(
        "out",
        "rabbitmq",
        [messages],
        routing_key=outbox,
        queue=outbox,
        reconnect_max_wait=0.5,
    )
    restarted = threading.Event()
    sent_before_restart: list[int] = []

    def done(run: PipelineRun) -> bool:
        written = run.snapshot().records_written
        if feeder.ident is None:
            feeder.start()
        if not restarted.is_set() and written >= 100:
            sent_before_restart.append(feeder.sent)
            _restart_broker()
            restarted.set()
        if not restarted.is_set() or feeder.is_alive() or written < count:
            return False
        return ready_count(outbox) >= count

    try:
        with caplog.at_level(logging.WARNING):
            run_until(p, done, limit=300)
    finally:
        _start_broker()  # for the tests that follow, whatever happened
        feeder.join(60)

    assert feeder.error is None
    assert restarted.is_set()
    assert sent_before_restart[0] < count  # records flowed through the restart
    delivered = [row["id"] for row in drain(outbox)]
    assert set(delivered) == set(range(1, count + 1))  # at least once
    warnings = [r.getMessage() for r in caplog.records]
    for step in ("messages", "out"):  # the source, then the sink
        assert any(f"step {step!r}: lost the connection" in m for m in warnings)
    # While the broker is down, connecting or publishing fails and is retried;
    # which step retries first depends on when each notices the restart.
    assert any("failed (attempt" in m and "; retrying" in m for m in warnings)

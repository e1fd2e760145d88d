"""The Redis Streams source and sink, and Redis lookups, against real Redis.

Most tests use the server at 127.0.0.1:6379 (started by .ci/run), each with
keys of its own names, deleted afterwards. The restart test starts a
private redis-server with an append-only file on a free port, so that
stopping it disturbs no other test and its data outlives the restart.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import redis
from conftest import RecordingContext
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
from dataflare.connectors.redis.config import RedisLookupConfig
from dataflare.connectors.redis.lookup import RedisLookup
from dataflare.connectors.redis.sink import RedisSink
from dataflare.connectors.redis.source import RedisSource, RedisSourceConfig
from dataflare.plugin.interface import FieldNotFoundError, SourceBatch
from dataflare.state.checkpoint import FINAL_CHECKPOINT

PLUGINS = (("redis", RedisSource), ("redis", RedisSink))
SHARED = f"redis://{HOST}:6379/0"


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    need(f"Redis at {HOST}:6379", port_open(6379), "start redis-server (see .ci/run)")
    connection = redis.Redis.from_url(SHARED)
    keys: list[str] = []
    connection.test_keys = keys  # type: ignore[attr-defined]
    yield connection
    if keys:
        connection.delete(*keys)
    connection.close()


def new_key(client: redis.Redis, prefix: str = "df-test") -> str:
    key = f"{prefix}-{uuid.uuid4().hex[:10]}"
    client.test_keys.append(key)  # type: ignore[attr-defined]
    return key


def encoded(i: int) -> bytes:
    return json.dumps(record(i), default=lambda v: v.isoformat()).encode()


def read_rows(source: RedisSource, count: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    for item in source.read():
        if isinstance(item, SourceBatch):
            rows += item.batch.to_pylist()
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"only {len(rows)} of {count} rows came"
    return rows


def source_config(url: str, stream: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": url,
        "stream": stream,
        "group": f"g-{uuid.uuid4().hex[:8]}",
        "schema": RECORD_SCHEMA,
        **extra,
    }


def test_redis_round_trip_keeps_types(
    client: redis.Redis,
) -> None:
    stream = new_key(client)
    plugins = registry(*PLUGINS)
    records = [record(i) for i in range(300)]
    writer = Pipeline("redis-write").use_registry(plugins)
    rows = writer.source("rows", "memory", records=records)
    writer.destination("out", "redis", [rows], url=SHARED, stream=stream)
    assert writer.run().records_written == 300
    assert client.xlen(stream) == 300

    reader = Pipeline("redis-read").use_registry(plugins)
    config = source_config(SHARED, stream, id_field="entry_id")
    events = reader.source("events", "redis", **config)
    reader.destination("got", "memory", [events])
    running = Running(reader.build())
    wait_until(lambda: running.read() >= 300, what="300 records read")
    table = running.stop().output("got")

    assert table.select(ARROW_SCHEMA.names).schema == ARROW_SCHEMA
    assert table.select(ARROW_SCHEMA.names).to_pylist() == records
    ids = [e[0].decode() for e in client.xrange(stream)]
    assert table.column("entry_id").to_pylist() == ids
    assert client.xpending(stream, config["group"])["pending"] == 0


def test_source_rejects_bad_entries_with_id(
    client: redis.Redis, tmp_path: Path
) -> None:
    stream = new_key(client)
    ids = [
        client.xadd(stream, fields).decode()  # type: ignore[arg-type]
        for fields in (
            {"data": encoded(1), "origin": "test"},
            {"data": b"nope"},
            {"other": b"{}"},
            {"data": b'{"ok": "perhaps"}'},
            {"data": encoded(2)},
        )
    ]
    p = Pipeline("redis-bad").use_registry(registry(*PLUGINS))
    dead = tmp_path / "dead.jsonl"
    p.errors(dead_letter={"path": str(dead)})
    events = p.source("events", "redis", **source_config(SHARED, stream))
    p.destination("got", "memory", [events], include_metadata=True)
    running = Running(p.build())
    wait_until(lambda: running.read() >= 2, what="the good records")
    wait_until(lambda: running.run.snapshot().rejected >= 3, what="3 rejects")
    table = running.stop().output("got")

    assert table.column("id").to_pylist() == [1, 2]
    assert table.column("_headers").to_pylist()[0] == [("origin", b"test")]
    rejected = [json.loads(line) for line in dead.read_text().splitlines()]
    positions = sorted(r["position"] for r in rejected)
    assert positions == sorted(f"redis stream {stream} id {i}" for i in ids[1:4])
    reasons = " | ".join(r["reason"] for r in rejected)
    assert "invalid JSON" in reasons
    assert "has no field 'data'" in reasons
    assert "field 'ok'" in reasons


def test_source_acks_on_checkpoint(
    client: redis.Redis,
) -> None:
    stream = new_key(client)
    for i in range(100):
        client.xadd(stream, {"data": encoded(i)})
    settings = source_config(SHARED, stream, batch=25, consumer="c1")
    config = RedisSourceConfig.model_validate(settings)
    context = RecordingContext("ack")
    context.checkpointing = True  # type: ignore[attr-defined]
    first = RedisSource(config, context)
    first.open()
    before = read_rows(first, 50)
    position = first.snapshot_position()
    after = read_rows(first, 50)
    first.notify_checkpoint_complete(1)
    first.close()  # a crash: the entries after the checkpoint stay pending

    assert len(before) == 50
    assert client.xpending(stream, settings["group"])["pending"] == 50
    # A restarted consumer reads its pending entries first.
    second = RedisSource(config, RecordingContext("ack"))
    second.open()
    again = read_rows(second, 50)
    second.close()  # without checkpointing: acknowledged per batch
    assert [r["id"] for r in again] == [r["id"] for r in after]
    assert client.xpending(stream, settings["group"])["pending"] == 0
    assert position["last_id"] is not None


def test_restored_source_skips_covered_entries(
    client: redis.Redis,
) -> None:
    stream = new_key(client)
    for i in range(30):
        client.xadd(stream, {"data": encoded(i)})
    config = RedisSourceConfig.model_validate(
        source_config(SHARED, stream, batch=10, consumer="c1")
    )
    context = RecordingContext("skip")
    context.checkpointing = True  # type: ignore[attr-defined]
    first = RedisSource(config, context)
    first.open()
    read_rows(first, 20)
    position = first.snapshot_position()
    first.close()  # crash after the checkpoint, before its acknowledgements

    restored = RedisSource(config, context)
    restored.open()
    restored.restore_position(position)
    rows = read_rows(restored, 10)
    restored.notify_checkpoint_complete(2**62)
    restored.close()
    assert [r["id"] for r in rows] == list(range(20, 30))
    assert client.xpending(stream, config.group)["pending"] == 0


def test_source_creates_lost_group_again(client: redis.Redis) -> None:
    stream = new_key(client)
    settings = source_config(SHARED, stream, consumer="c1", start_from="new")
    source = RedisSource(
        RedisSourceConfig.model_validate(settings), RecordingContext("regroup")
    )
    source.open()
    for i in range(3):
        client.xadd(stream, {"data": encoded(i)})
    before = read_rows(source, 3)

    # Entries added after the group disappeared, before the source noticed.
    client.xgroup_destroy(stream, settings["group"])
    for i in range(3, 6):
        client.xadd(stream, {"data": encoded(i)})
    after = read_rows(source, 3)
    source.close()

    assert [r["id"] for r in before] == [0, 1, 2]
    assert [r["id"] for r in after] == [3, 4, 5]
    assert client.xpending(stream, settings["group"])["pending"] == 0


def test_lookup_reads_all_layouts(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = new_key(client, "airline") + ":"
    table = new_key(client, "airlines")
    client.test_keys += [f"{prefix}AA", f"{prefix}UA", f"{prefix}B6"]  # type: ignore[attr-defined]
    client.set(f"{prefix}AA", json.dumps({"name": "American", "since": 1926}))
    client.set(f"{prefix}B6", "not json")
    client.hset(f"{prefix}UA", mapping={"name": "United", "since": "1926"})
    client.hset(table, mapping={"AA": json.dumps({"name": "American", "since": 1926})})
    keys = pl.DataFrame({"carrier": ["AA", "ZZ", "AA", None, "B6"]})
    schema = {"name": "string", "since": "int"}
    fields = {"airline": "name", "founded": "since"}

    json_keys = RedisLookup(
        RedisLookupConfig.model_validate(
            {"url": SHARED, "key_prefix": prefix, "schema": schema}
        ),
        on=["carrier"],
        fields=fields,
        step="named",
    )
    with caplog.at_level(logging.WARNING):
        frame = json_keys.frame(keys)
    assert frame.to_dicts() == [
        {"carrier": "AA", "airline": "American", "founded": 1926}
    ]  # ZZ is missing, null has no key, and B6 contains no JSON
    assert "is not JSON" in caplog.text
    json_keys.frame(keys)
    assert json_keys.lookups == 3  # the second batch came from the cache
    json_keys.close()

    hashes = RedisLookup(
        RedisLookupConfig.model_validate(
            {"url": SHARED, "key_prefix": prefix, "value": "hash", "schema": schema}
        ),
        on=["carrier"],
        fields=fields,
        step="named",
    )
    assert hashes.frame(pl.DataFrame({"carrier": ["UA"]})).row(0) == (
        "UA",
        "United",
        1926,
    )
    hashes.close()

    one_hash = RedisLookup(
        RedisLookupConfig.model_validate(
            {"url": SHARED, "hash": table, "schema": schema}
        ),
        on=["carrier"],
        fields={"airline": "name"},
        step="named",
    )
    assert one_hash.frame(pl.DataFrame({"carrier": ["AA", "UA"]})).to_dicts() == [
        {"carrier": "AA", "airline": "American"}
    ]
    one_hash.close()


def test_lookup_rejects_bad_config() -> None:
    with pytest.raises(FieldNotFoundError, match=r"fields\.airline"):
        RedisLookup(
            RedisLookupConfig.model_validate(
                {"key_prefix": "a:", "schema": {"name": "string"}}
            ),
            on=["carrier"],
            fields={"airline": "nmae"},
            step="named",
        )
    with pytest.raises(ValueError, match="exactly one of key_prefix"):
        RedisLookupConfig.model_validate({"schema": {"name": "string"}})
    with pytest.raises(ValueError, match="password"):
        RedisLookupConfig.model_validate(
            {"url": "redis://:secret@127.0.0.1", "hash": "h", "schema": {"n": "int"}}
        )


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Server]:
    binary = shutil.which("redis-server")
    need("redis-server", binary is not None, "apt-get install redis-server")
    assert binary is not None
    port = free_port()
    server = Server(
        "redis-server",
        [
            binary,
            "--bind",
            HOST,
            "--port",
            str(port),
            "--dir",
            str(tmp_path),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ],
        port,
        tmp_path / "redis.log",
    )
    server.start()
    yield server
    server.stop()


def step_counts(running: Running, step: str) -> tuple[int, int]:
    """Return the records a step has read and written so far."""
    metrics = [m for m in running.run.executor.state.metrics if m.step == step]
    return sum(m.records_in for m in metrics), sum(m.records_out for m in metrics)


def test_pipeline_survives_server_restart(
    private_redis: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    url = f"redis://{HOST}:{private_redis.port}/0"
    total = 600
    p = Pipeline("redis-restart").use_registry(registry(*PLUGINS))
    rows = p.source("rows", "paced", total=total, per_batch=10, pause=0.02)
    p.destination("to_redis", "redis", [rows], url=url, stream="events")
    events = p.source("events", "redis", **source_config(url, "events"))
    p.destination("got", "memory", [events])
    running = Running(p.build())

    wait_until(lambda: EMITTED.get("rows", 0) >= total // 3, what="a third written")
    private_redis.restart(down_for=2.0)
    check = redis.Redis.from_url(url)

    def every_entry_read() -> bool:
        # The stream contains the records and any chunk the sink added again.
        if step_counts(running, "to_redis")[1] < total:
            return False
        return step_counts(running, "events")[0] >= check.xlen("events")

    deadline = time.monotonic() + 60
    while not every_entry_read() and time.monotonic() < deadline:
        time.sleep(0.05)
    table = running.stop().output("got")
    entries = check.xlen("events")
    check.close()

    got = table.select(ARROW_SCHEMA.names).to_pylist()
    ids = [r["id"] for r in got]
    missing = sorted(set(range(total)) - set(ids))
    assert missing == [], f"records lost across the restart: {missing}"
    assert sorted(set(ids)) == list(range(total))
    assert all(r == record(r["id"]) for r in got)
    # At least once: the sink may add a chunk again after a broken
    # connection, and the source reads each entry of the stream once.
    assert len(ids) == entries
    print(f"records repeated after the restart: {len(ids) - total}")
    assert "failed (attempt 1)" in caplog.text
    assert "works again" in caplog.text or "retrying" in caplog.text


class LoseReply:
    """Stand-in for `xreadgroup` whose call number `lost` fails after Redis
    served it, as when a connection breaks before the reply arrives."""

    def __init__(self, xreadgroup: Any, lost: int) -> None:
        self.xreadgroup = xreadgroup
        self.lost = lost
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reply = self.xreadgroup(*args, **kwargs)
        self.calls += 1
        if self.calls == self.lost:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return reply


@pytest.mark.parametrize("checkpointing", [False, True])
def test_source_reads_entries_of_lost_reply(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch, checkpointing: bool
) -> None:
    stream = new_key(client)
    for i in range(10):
        client.xadd(stream, {"data": encoded(i)})
    settings = source_config(SHARED, stream, batch=4, consumer="c1")
    context = RecordingContext("lost")
    context.checkpointing = checkpointing
    source = RedisSource(RedisSourceConfig.model_validate(settings), context)
    source.open()
    assert source._client is not None
    # Calls: pending entries (none), entries 0-3, entries 4-7 (reply lost).
    lose = LoseReply(source._client.xreadgroup, lost=3)
    monkeypatch.setattr(source._client, "xreadgroup", lose)

    rows = read_rows(source, 10)
    if checkpointing:
        # Nothing is acknowledged before the checkpoint that covers it.
        assert client.xpending(stream, settings["group"])["pending"] == 10
        source.notify_checkpoint_complete(FINAL_CHECKPOINT)
    source.close()

    assert lose.calls > 3
    assert [r["id"] for r in rows] == list(range(10))
    assert client.xpending(stream, settings["group"])["pending"] == 0


def test_source_acks_again_after_failed_ack(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = new_key(client)
    for i in range(6):
        client.xadd(stream, {"data": encoded(i)})
    settings = source_config(SHARED, stream, batch=3, consumer="c1")
    source = RedisSource(
        RedisSourceConfig.model_validate(settings), RecordingContext("ack")
    )
    source.open()
    assert source._client is not None
    real_pipeline = source._client.pipeline
    pipelines: list[Any] = []

    def fail() -> None:
        raise redis.exceptions.ConnectionError("Connection reset by peer")

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        pipelines.append(pipe)
        if len(pipelines) == 1:
            monkeypatch.setattr(pipe, "execute", fail)
        return pipe

    monkeypatch.setattr(source._client, "pipeline", pipeline)

    rows = read_rows(source, 6)  # the acknowledgement of entries 0-2 fails
    source.close()  # acknowledges entries 3-5, and 0-2 again

    assert len(pipelines) == 2
    assert [r["id"] for r in rows] == list(range(6))
    assert client.xpending(stream, settings["group"])["pending"] == 0


def test_enrichment_reads_redis_lookup_table(client: redis.Redis) -> None:
    prefix = new_key(client, "airline") + ":"
    for code, name in (("AA", "American"), ("UA", "United")):
        client.set(prefix + code, json.dumps({"name": name}))
        client.test_keys.append(prefix + code)  # type: ignore[attr-defined]
    p = Pipeline("redis-enrichment")
    flights = p.source(
        "flights",
        "memory",
        records=[{"carrier": "AA"}, {"carrier": "UA"}, {"carrier": "ZZ"}],
    )
    table = {
        "redis": {"url": SHARED, "key_prefix": prefix, "schema": {"name": "string"}}
    }
    named = p.transform(
        "named",
        "enrichment",
        [flights],
        table=table,
        on="carrier",
        fields={"airline": "name"},
        defaults={"airline": "unknown"},
    )
    p.destination("out", "memory", [named])

    summary = p.run()

    rows = summary.output("out").to_pylist()
    assert [r["airline"] for r in rows] == ["American", "United", "unknown"]
    assert summary.step("named").counters["unmatched"] == 1

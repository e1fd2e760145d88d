"""Measure fixed costs inside DataFlare that explain W1 and W3.

Prints one `RESULT` line with:

- `parse`: how fast Arrow's JSON reader alone parses the benchmark input
  (W1's five fields), on one thread in 1 MB blocks, and on every core of
  the process over the whole buffer (`use_threads`); and how fast the
  `jsonl` source's parser (`JsonLinesParser.parse_block`, with its native
  simdjson reader when built) parses it on one thread in 4 MiB blocks, the
  source's default.
- `steps`: the time of one call of each W1 and W3 step on batches of 1,
  10, 100 and 10,000 rows (the filter, the SQL projection and the JSON
  lines encoding of the sink), built from the W3 pipeline's own plan. The
  time is the CPU time of the process (all its threads, Polars' pool
  included), so load from other processes does not count, and each figure
  is the median over interleaved rounds that time every step and size in
  turn.
- `hop_us`: the round trip of one message between two threads through
  `queue.Queue`, the way executor instances exchange batches.

Run: `python bench/step_costs.py INPUT` (the runner pins it to two cores).
"""

from __future__ import annotations

import argparse
import functools
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pajson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataflare import Pipeline
from dataflare.connectors.files.jsonl import (
    JsonLinesParser,
    encode_json_lines,
    native_fields,
)
from dataflare.streaming.executor import Executor

import common
import dataflare_jobs

SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("carrier", pa.string()),
        ("origin", pa.string()),
        ("dep_delay", pa.int64()),
        ("arr_delay", pa.int64()),
    ]
)
BLOCK = 1 << 20
SOURCE_BLOCK = 4 << 20


def parse_rates(path: str, limit: int = 200 << 20) -> dict[str, float]:
    """Parse up to `limit` bytes of `path` with Arrow's JSON reader.

    Args:
        path: Benchmark input.
        limit: Bytes read from the start of the file, whole lines only.

    Returns:
        Records per second on one thread in 1 MB blocks, and with
        `use_threads` over the whole buffer.
    """
    with open(path, "rb") as file:
        data = file.read(limit)
    data = data[: data.rfind(b"\n") + 1]
    options = pajson.ParseOptions(
        explicit_schema=SCHEMA, unexpected_field_behavior="ignore"
    )
    view = memoryview(data)
    started = time.perf_counter()
    rows = start = 0
    single = pajson.ReadOptions(use_threads=False, block_size=BLOCK + 2)
    while start < len(data):
        stop = data.rfind(b"\n", start, start + BLOCK) + 1
        if stop <= start:
            stop = len(data)
        table = pajson.read_json(
            pa.py_buffer(view[start:stop]), read_options=single, parse_options=options
        )
        rows += table.num_rows
        start = stop
    one_thread_rate = rows / (time.perf_counter() - started)
    started = time.perf_counter()
    table = pajson.read_json(
        pa.py_buffer(data),
        read_options=pajson.ReadOptions(use_threads=True, block_size=BLOCK),
        parse_options=options,
    )
    threaded = table.num_rows / (time.perf_counter() - started)
    parser = JsonLinesParser(SCHEMA, "input")
    started = time.perf_counter()
    rows = start = 0
    while start < len(data):
        stop = data.rfind(b"\n", start, start + SOURCE_BLOCK) + 1
        if stop <= start:
            stop = len(data)
        rows += parser.parse_block(bytearray(view[start:stop])).batch.num_rows
        start = stop
    return {
        "one_thread_1mb_blocks": one_thread_rate,
        "use_threads": threaded,
        "source_parser": rows / (time.perf_counter() - started),
        "native": native_fields(SCHEMA) is not None,
    }


ROWS = (1, 10, 100, 10_000)


def per_call_us(
    calls: dict[tuple[str, int], Callable[[], Any]],
    rounds: int = 15,
    round_seconds: float = 0.02,
) -> dict[tuple[str, int], float]:
    """Return the median CPU time of one call of each function, in microseconds.

    Args:
        calls: Functions to time, by step and rows.
        rounds: Interleaved rounds; each times every function once.
        round_seconds: About how long each function runs per round.

    Returns:
        Median microseconds per call over the rounds, after ten warm-up
        calls, by the same keys as `calls`.
    """
    repeats = {}
    for key, call in calls.items():
        started = time.process_time()
        for _ in range(10):
            call()
        once = (time.process_time() - started) / 10
        repeats[key] = max(1, int(round_seconds / once))
    times: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            started = time.process_time()
            for _ in range(repeats[key]):
                call()
            times[key].append((time.process_time() - started) / repeats[key] * 1e6)
    return {key: statistics.median(values) for key, values in times.items()}


def step_costs() -> dict[str, dict[str, float]]:
    """Time one call of the W3 pipeline's steps per batch size.

    Returns:
        Microseconds per call of each step, keyed by step then rows.
    """
    p = Pipeline("bench-costs").use_registry(dataflare_jobs.registry())
    records = p.source("records", "rate", rate=1, seconds=1)
    delayed = p.transform("delayed", "filter", [records], condition="dep_delay > 15")
    p.transform(
        "projected",
        "sql",
        [delayed],
        query=dataflare_jobs.W3_QUERY.format(offered="offered_ns"),
    )
    p.destination("out", "count", ["projected"])
    executor = Executor(p.build())
    plugins: dict[str, Any] = {i.plan.id: i.plugin for i in executor.all_instances()}
    source_batch = plugins["records"]._records(10_100, 0)
    for step in ("delayed", "projected"):
        plugins[step].open()
    filter_step, sql_step = plugins["delayed"].process, plugins["projected"].process
    calls: dict[tuple[str, int], Callable[[], Any]] = {}
    for rows in ROWS:
        batch = source_batch.slice(26, rows)  # starts with dep_delay 16
        delayed_batch = pa.concat_batches(filter_step(batch))
        projected = pa.concat_batches(sql_step(delayed_batch))
        calls["filter", rows] = functools.partial(filter_step, batch)
        calls["sql projection", rows] = functools.partial(sql_step, delayed_batch)
        calls["JSON lines encoding (sink)", rows] = functools.partial(
            encode_json_lines, projected
        )
    costs: dict[str, dict[str, float]] = {}
    for (step, rows), us in per_call_us(calls).items():
        costs.setdefault(step, {})[str(rows)] = us
    return costs


def hop_us(rounds: int = 20_000) -> float:
    """Return the round trip of a message between two threads, in µs.

    Args:
        rounds: Messages sent there and back.

    Returns:
        Mean microseconds per round trip.
    """
    requests: queue.Queue[int] = queue.Queue(maxsize=8)
    replies: queue.Queue[int] = queue.Queue(maxsize=8)

    def echo() -> None:
        for _ in range(rounds):
            replies.put(requests.get())

    worker = threading.Thread(target=echo)
    worker.start()
    started = time.perf_counter()
    for i in range(rounds):
        requests.put(i)
        replies.get()
    elapsed = time.perf_counter() - started
    worker.join()
    return elapsed / rounds * 1e6


def main() -> None:
    """Measure and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="benchmark input (JSON lines)")
    args = parser.parse_args()
    common.report(
        {"parse": parse_rates(args.input), "steps": step_costs(), "hop_us": hop_us()}
    )


if __name__ == "__main__":
    main()

"""Measure fixed costs inside DataFlare that explain W1 and W3.

Prints one `RESULT` line with:

- `parse`: how fast Arrow's JSON reader alone parses the benchmark input
  (W1's five fields), on one thread in 1 MB blocks as the `jsonl` source
  calls it, and on every core of the process over the whole buffer
  (`use_threads`). This is the ceiling of any W1 built on that reader.
- `steps`: the time of one call of each W1 and W3 step on batches of 10
  and 10,000 rows (the filter, the SQL projection and the JSON lines
  encoding of the sink), built from the W3 pipeline's own plan.
- `hop_us`: the round trip of one message between two threads through
  `queue.Queue`, the way executor instances exchange batches.

Run: `python bench/step_costs.py INPUT` (the runner pins it to two cores).
"""

from __future__ import annotations

import argparse
import queue
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
from dataflare.connectors.files.jsonl import encode_json_lines
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
    return {"one_thread_1mb_blocks": one_thread_rate, "use_threads": threaded}


def per_call_us(call: Callable[[], Any], seconds: float = 0.5) -> float:
    """Return the mean time of one call of `call`, in microseconds.

    Args:
        call: Function to time; called repeatedly for about `seconds`.
        seconds: Time budget.

    Returns:
        Mean microseconds per call after ten warm-up calls.
    """
    for _ in range(10):
        call()
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        count += 1
    return (time.perf_counter() - started) / count * 1e6


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
    plugins = {i.plan.id: i.plugin for i in executor.all_instances()}
    source = plugins["records"]
    source_batch = source._records(10_100, 0)
    costs: dict[str, dict[str, float]] = {}
    for step in ("delayed", "projected"):
        plugins[step].open()
    for rows in (10, 10_000):
        batch = source_batch.slice(26, rows)  # starts with dep_delay 16
        delayed_batch = pa.concat_batches(plugins["delayed"].process(batch))
        projected = pa.concat_batches(plugins["projected"].process(delayed_batch))
        costs.setdefault("filter", {})[str(rows)] = per_call_us(
            lambda b=batch: plugins["delayed"].process(b)
        )
        costs.setdefault("sql projection", {})[str(rows)] = per_call_us(
            lambda b=delayed_batch: plugins["projected"].process(b)
        )
        costs.setdefault("JSON lines encoding (sink)", {})[str(rows)] = per_call_us(
            lambda b=projected: encode_json_lines(b)
        )
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

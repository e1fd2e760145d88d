"""Measure the `window` transform alone on W2's windows, without JSON parsing.

Reads the benchmark input once with Polars (the fields W2 uses) and cuts it
into batches of `--batch-rows` records. One `WindowTransform` gets them the
way the executor gives them: `process` for each batch, then `on_watermark`
with the newest event time so far minus one hour (W2's bound on
out-of-orderness), and `finish` at the end. Prints one `RESULT` line with
records per second of CPU time and of wall time, the number of output
rows, and a checksum of the counts, so that two versions can be compared.

Run: `python bench/window_transform.py INPUT [--batch-rows N] [--repeat N]`.
INPUT is JSON lines made by `bench/data.py`, or a Parquet or Arrow IPC file
with the same fields.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from dataflare.plugin.interface import EVENT_TIME
from dataflare.state.backends import StateBackendSettings
from dataflare.transforms.window import WindowConfig, WindowTransform

HOUR_US = 3600 * 10**6
CONFIG = {
    "kind": "tumbling",
    "size": "1h",
    "key_by": ["carrier"],
    "aggregations": {
        "count": {"fn": "count"},
        "mean_arr_delay": {"fn": "mean", "field": "arr_delay"},
    },
}


class Context:
    """The parts of the operator context that a window uses."""

    def __init__(self, backend: str, folder: str) -> None:
        self.step = "hourly"
        self.instance = 0
        self.parallelism = 1
        self.logger = logging.getLogger("bench")
        self.state_backend = StateBackendSettings(backend, folder)  # type: ignore[arg-type]
        self.late = 0

    def count(self, name: str, value: int = 1) -> None:
        if name == "late":
            self.late += value

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        pass


def load(path: str) -> pa.Table:
    """Return W2's fields of `path`, with `ts` as the event time column."""
    if path.endswith(".parquet"):
        frame = pl.read_parquet(path, columns=["carrier", "arr_delay", "ts"])
    elif path.endswith((".arrow", ".ipc", ".feather")):
        frame = pl.read_ipc(path, columns=["carrier", "arr_delay", "ts"])
    else:
        frame = pl.read_ndjson(path).select("carrier", "arr_delay", "ts")
    ts = pl.col("ts")
    if frame.schema["ts"] == pl.String:
        ts = ts.str.to_datetime(time_unit="us", time_zone="UTC")
    frame = frame.select(
        "carrier", "arr_delay", ts.dt.cast_time_unit("us").alias(EVENT_TIME)
    )
    return frame.to_arrow()


def run_once(
    table: pa.Table, batch_rows: int, backend: str, folder: str
) -> dict[str, Any]:
    config = WindowConfig.model_validate(CONFIG)
    window = WindowTransform(config, Context(backend, folder))  # type: ignore[arg-type]
    window.open()
    batches = table.to_batches(max_chunksize=batch_rows)
    times = [
        pc.max(batch.column(EVENT_TIME).cast(pa.int64())).as_py() for batch in batches
    ]
    rows = 0
    checksum = 0
    newest = -(2**63)

    cpu, wall = time.process_time(), time.perf_counter()
    for batch, batch_newest in zip(batches, times, strict=True):
        window.process(batch)
        newest = max(newest, batch_newest)
        for out in window.on_watermark(newest - HOUR_US):
            rows += out.num_rows
            checksum += pc.sum(out.column("count")).as_py() or 0
    for out in window.finish():
        rows += out.num_rows
        checksum += pc.sum(out.column("count")).as_py() or 0
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall

    window.close()
    return {"cpu_s": cpu, "wall_s": wall, "rows": rows, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("--batch-rows", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=["memory", "disk"], default="memory")
    parser.add_argument("--state-dir", default="/tmp/dataflare-window-bench")
    args = parser.parse_args()

    table = load(args.input)
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    runs = [
        run_once(table, args.batch_rows, args.backend, args.state_dir)
        for _ in range(args.repeat)
    ]
    cpu = sorted(run["cpu_s"] for run in runs)[len(runs) // 2]
    wall = sorted(run["wall_s"] for run in runs)[len(runs) // 2]
    result = {
        "records": table.num_rows,
        "batch_rows": args.batch_rows,
        "backend": args.backend,
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "records_per_cpu_s": round(table.num_rows / cpu),
        "rows": runs[0]["rows"],
        "checksum": runs[0]["checksum"],
    }
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

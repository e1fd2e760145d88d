"""Measure what the executor costs per batch, with and without chaining.

W3's pipeline shape (a source, a filter, a projection and a sink) runs over
batches of a few rows from an in-memory source. The steps are the Arrow
compute plugins of `dataflare_jobs.py` (`--steps arrow`), which cost little,
so the engine's own work shows. The figure is CPU time of the
whole process (every thread) per batch, which a busy machine disturbs far
less than wall time.

Prints one `RESULT` line: for each mode, the batches, the wall seconds and
the CPU microseconds per batch (median of the runs).

Run: `python bench/executor_costs.py [--batches N] [--rows N] [--runs N]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataflare import Pipeline
from dataflare.streaming.runner import PipelineRun

import common
import dataflare_jobs


def records(count: int) -> pa.Table:
    """Return `count` W3 records."""
    source = dataflare_jobs.RateSource.__new__(dataflare_jobs.RateSource)
    source.config = dataflare_jobs.RateSourceConfig(rate=1e6, seconds=1)
    return pa.Table.from_batches([source._records(count, 0)])


def run_once(table: pa.Table, rows: int, *, chaining: bool) -> tuple[float, float]:
    """Run the pipeline once; return wall seconds and CPU seconds."""
    p = Pipeline("executor-costs").use_registry(dataflare_jobs.registry())
    source = p.source("records", "memory", records=table, batch_rows=rows)
    delayed = p.transform("delayed", "arrow-delayed", [source])
    projected = p.transform("projected", "arrow-projected", [delayed])
    p.destination("out", "count", [projected])
    # Batches as small as the source's: a queue may not merge them.
    p.execution(max_batch_rows=rows)
    run = PipelineRun(p.build(), chaining=chaining)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = run.run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert summary.records_read == table.num_rows
    return wall, cpu


def main() -> None:
    """Measure both modes in turn and report the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    table = records(args.batches * args.rows)
    samples: dict[str, list[tuple[float, float]]] = {"chained": [], "unchained": []}
    for _ in range(args.runs):
        for mode in samples:
            samples[mode].append(run_once(table, args.rows, chaining=mode == "chained"))
    result: dict[str, Any] = {"batches": args.batches, "rows": args.rows}
    for mode, runs in samples.items():
        walls, cpus = np.array(runs).T
        result[mode] = {
            "wall_s": round(statistics.median(walls), 3),
            "cpu_us_per_batch": round(statistics.median(cpus) / args.batches * 1e6, 1),
        }
    common.report(result)


if __name__ == "__main__":
    main()

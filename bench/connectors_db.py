"""Throughput of the database connectors against the local servers.

Measures records per second for each source mode and sink mode of the
`postgres` and `mysql` connectors, through whole pipelines (memory source
or sink on the other side), on tables of five columns (bigint key, text,
numeric, zoned timestamp, boolean). Every figure is the median of `--runs`
runs. Tables are created with unique names and dropped afterwards.

    .venv/bin/python bench/connectors_db.py --rows 200000 --runs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import logging
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pyarrow as pa
import pymysql
from dataflare import Pipeline
from dataflare.connectors.mysql import MySqlSink, MySqlSource
from dataflare.connectors.postgres import PostgresSink, PostgresSource
from dataflare.plugin.registry import PluginRegistry

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": "test"}
MY = {"host": "127.0.0.1", "port": 3306, "user": "root", "database": "test"}


def registry() -> PluginRegistry:
    plugins = PluginRegistry.from_entry_points()
    for cls in (PostgresSource, PostgresSink, MySqlSource, MySqlSink):
        plugins.register(cls.metadata.name, cls)
    return plugins


def records(count: int) -> pa.Table:
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return pa.table(
        {
            "id": pa.array(range(count), pa.int64()),
            "label": [f"record number {i}" for i in range(count)],
            "amount": pa.array(
                [decimal.Decimal(i % 100000) / 100 for i in range(count)],
                pa.decimal128(12, 2),
            ),
            "at": pa.array(
                [start + dt.timedelta(seconds=i) for i in range(count)],
                pa.timestamp("us", tz="UTC"),
            ),
            "flag": [i % 2 == 0 for i in range(count)],
        }
    )


def timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def write(
    system: str, server: dict[str, Any], data: pa.Table, table: str, **config: Any
) -> Callable[[], Any]:
    def run() -> Any:
        p = Pipeline(f"bench-{table}").use_registry(registry())
        source = p.source("data", "memory", records=data, batch_rows=10_000)
        p.destination(
            "out", system, [source], table=table, key=["id"], **server, **config
        )
        return p.run()

    return run


def write_checkpointed(
    system: str, server: dict[str, Any], data: list[dict[str, Any]], table: str
) -> Callable[[], Any]:
    """Write with checkpoints (exactly once); checkpoints need plain records."""

    def run() -> Any:
        with tempfile.TemporaryDirectory() as folder:
            p = Pipeline(f"bench-{table}").use_registry(registry())
            source = p.source("data", "memory", records=data, batch_rows=10_000)
            p.destination(
                "out",
                system,
                [source],
                table=table,
                key=["id"],
                progress_key=f"bench-{table}",
                **server,
            )
            p._data["checkpointing"] = {"interval": "1s", "storage": folder}
            return p.run()

    return run


def read(
    system: str, server: dict[str, Any], table: str, **config: Any
) -> Callable[[], Any]:
    def run() -> Any:
        p = Pipeline(f"bench-read-{table}").use_registry(registry())
        source = p.source(
            "read",
            system,
            table=table,
            batch_rows=10_000,
            follow=False,
            **server,
            **config,
        )
        p.destination("out", "memory", [source])
        summary = p.run()
        assert summary.output("out").num_rows > 0
        return summary

    return run


class Database:
    """Run statements on one of the two servers."""

    def __init__(self, system: str) -> None:
        self.system = system
        if system == "postgres":
            self.pg = psycopg.connect(
                "host=127.0.0.1 user=postgres dbname=test", autocommit=True
            )
        else:
            self.my = pymysql.connect(
                host="127.0.0.1",
                user="root",
                password="",
                database="test",
                autocommit=True,
            )

    def execute(self, statement: str) -> None:
        if self.system == "postgres":
            self.pg.execute(statement)  # type: ignore[arg-type]
        else:
            with self.my.cursor() as cursor:
                cursor.execute(statement)

    def drop(self, table: str) -> None:
        self.execute(f"DROP TABLE IF EXISTS {table}")


def measure(
    system: str, server: dict[str, Any], data: pa.Table, runs: int
) -> dict[str, float]:
    db = Database(system)
    rows = data.num_rows
    base = f"bench_{uuid.uuid4().hex[:8]}"
    results: dict[str, list[float]] = {}
    plain = data.to_pylist()
    cases: dict[str, Callable[[str], Callable[[], Any]]] = {
        "sink insert": lambda t: write(system, server, data, t),
        "sink upsert": lambda t: write(system, server, data, t, mode="upsert"),
        "sink exactly-once (checkpoints)": lambda t: write_checkpointed(
            system, server, plain, t
        ),
    }
    try:
        for label, make in cases.items():
            for run in range(runs):
                table = f"{base}_{run}"
                db.drop(table)
                results.setdefault(label, []).append(rows / timed(make(table)))
                db.drop(table)
        source_table = f"{base}_src"
        write(system, server, data, source_table)()
        reads: dict[str, Callable[[], Any]] = {
            "source full": read(system, server, source_table),
            "source incremental": read(
                system, server, source_table, mode="incremental", cursor="id"
            ),
        }
        for label, run_read in reads.items():
            results[label] = [rows / timed(run_read) for _ in range(runs)]
        db.drop(source_table)
    finally:
        for run in range(runs):
            db.drop(f"{base}_{run}")
        db.drop(f"{base}_src")
    return {label: statistics.median(values) for label, values in results.items()}


class _Context:
    """The operator context of a source run outside a pipeline."""

    step = "cdc"
    instance = 0
    parallelism = 1
    stopping = False
    checkpointing = False
    logger = logging.getLogger("bench.cdc")

    def reject(self, *args: Any) -> None:
        raise AssertionError(f"the source rejected records: {args}")

    def count(self, *args: Any) -> None:
        """Counters are not kept."""

    def emit_side(self, *args: Any) -> None:
        """Side outputs are not kept."""


def measure_cdc(data: pa.Table) -> float:
    """Records per second of the cdc source streaming inserts already in the WAL."""
    db = Database("postgres")
    name = f"bench_{uuid.uuid4().hex[:8]}"
    slot = f"{name}_slot"
    db.execute(
        f"CREATE TABLE {name} (id bigint PRIMARY KEY, label text, "
        "amount numeric(12, 2), at timestamptz, flag boolean)"
    )
    ctx = _Context()
    config = PostgresSource.Config.model_validate(
        {
            **PG,
            "table": name,
            "mode": "cdc",
            "slot": slot,
            "snapshot": False,
            "drop_slot": True,
            "batch_rows": 10_000,
        }
    )
    source = PostgresSource(config, ctx)
    source.open()
    try:
        reader = source.read()
        next(reader)  # creates the slot, reads nothing yet
        write("postgres", PG, data, name)()
        seen = 0
        started = time.perf_counter()
        for item in reader:
            if hasattr(item, "batch"):
                seen += item.batch.num_rows
            if seen >= data.num_rows:
                break
        elapsed = time.perf_counter() - started
    finally:
        ctx.stopping = True
        source.close()
        db.execute(f"DROP PUBLICATION IF EXISTS dataflare_{slot}")
        db.drop(name)
    return data.num_rows / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    data = records(args.rows)
    print(f"{args.rows:,} records of 5 fields, median of {args.runs} runs\n")
    print("| connector | case | records/s |")
    print("|---|---|---:|")
    for system, server in (("postgres", PG), ("mysql", MY)):
        for label, rate in measure(system, server, data, args.runs).items():
            print(f"| {system} | {label} | {rate:,.0f} |", flush=True)
    print(f"| postgres | source cdc (streaming inserts) | {measure_cdc(data):,.0f} |")


if __name__ == "__main__":
    main()

"""The benchmark workloads written for Pathway.

Written from Pathway's documented API: `pw.io.jsonlines.read` (static mode,
which reads a bounded file and ends) and `pw.io.jsonlines.write`,
`Table.filter` and `Table.select`, `windowby` with `pw.temporal.tumbling`
and `pw.temporal.common_behavior`, a `pw.io.python.ConnectorSubject` for
the fixed-rate input and `pw.io.subscribe` as the timing sink.

Pathway reserves the column name `id` for its row keys, so the record id is
read as `record_id` (`json_field_paths`) and written under that name. The
jsonlines writer also adds `diff` and `time` to every line. The runner's
comparison accounts for both. Pathway's worker threads come from
`PATHWAY_THREADS` (the runner sets it to the cores given).

Run: `python bench/peers/pathway_jobs.py W1|W2|W3|W6 [options]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import pathway as pw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common

ORIGIN = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class FlightSchema(pw.Schema):
    """The input fields the workloads read."""

    record_id: int
    carrier: str
    origin: str
    dep_delay: int | None
    arr_delay: int | None
    ts: str


def read_flights(source: str) -> pw.Table:
    """Read the benchmark input as a bounded table.

    Args:
        source: Input JSON lines.

    Returns:
        The table of flights.
    """
    return pw.io.jsonlines.read(
        source,
        schema=FlightSchema,
        mode="static",
        json_field_paths={"record_id": "/id"},
    )


def w1_table(flights: pw.Table, *extra: Any) -> pw.Table:
    """Apply W1: keep `dep_delay > 15`, project four fields and `gained`.

    Args:
        flights: Table with `record_id`, `carrier`, `origin`, `dep_delay`
            and `arr_delay`.
        *extra: Further columns to keep, such as `pw.this.offered_ns`.

    Returns:
        The W1 output table.
    """
    present = flights.filter(pw.this.dep_delay.is_not_none())
    delayed = present.filter(pw.unwrap(pw.this.dep_delay) > common.THRESHOLD)
    return delayed.select(
        pw.this.record_id,
        pw.this.carrier,
        pw.this.origin,
        *extra,
        dep_delay=pw.unwrap(pw.this.dep_delay),
        gained=pw.if_else(
            pw.this.arr_delay.is_none(),
            None,
            pw.unwrap(pw.this.dep_delay) - pw.unwrap(pw.this.arr_delay),
        ),
    )


def window_table(
    events: pw.Table, size: int, out_of_order: int, *, keep_results: bool = True
) -> pw.Table:
    """Count and average `arr_delay` per carrier in tumbling windows of `at`.

    Args:
        events: Table with `carrier`, `arr_delay` and `at` (UTC time).
        size: Window length in seconds.
        out_of_order: Allowed out-of-orderness in seconds (the cutoff).
        keep_results: Keep the results of closed windows in the table; False
            lets Pathway forget them (and retract them downstream), which
            bounds memory on an unbounded stream.

    Returns:
        One row per carrier and window.
    """
    windows = events.windowby(
        pw.this.at,
        window=pw.temporal.tumbling(duration=dt.timedelta(seconds=size), origin=ORIGIN),
        instance=pw.this.carrier,
        behavior=pw.temporal.common_behavior(
            cutoff=dt.timedelta(seconds=out_of_order), keep_results=keep_results
        ),
    ).reduce(
        carrier=pw.this._pw_instance,
        window_start=pw.this._pw_window_start,
        count=pw.reducers.count(),
        total=pw.reducers.sum(pw.coalesce(pw.this.arr_delay, 0)),
        valid=pw.reducers.sum(pw.if_else(pw.this.arr_delay.is_none(), 0, 1)),
    )
    return windows.select(
        pw.this.carrier,
        pw.this.window_start,
        pw.this.count,
        mean_arr_delay=pw.if_else(
            pw.this.valid > 0, pw.this.total / pw.this.valid, None
        ),
    )


def run() -> None:
    """Run the computation without the terminal dashboard."""
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)


def w1(source: str, target: str) -> dict[str, Any]:
    """W1: filter and project JSON lines.

    Args:
        source: Input JSON lines.
        target: Output JSON lines.

    Returns:
        Nothing measured inside; the runner counts the output.
    """
    pw.io.jsonlines.write(w1_table(read_flights(source)), target)
    run()
    return {}


def w2(source: str, target: str) -> dict[str, Any]:
    """W2: one-hour event-time windows per carrier.

    Args:
        source: Input JSON lines.
        target: Output JSON lines, one per window.

    Returns:
        Nothing measured inside; the runner counts the output.
    """
    flights = read_flights(source)
    events = flights.select(
        pw.this.carrier,
        pw.this.arr_delay,
        at=pw.this.ts.dt.strptime("%Y-%m-%dT%H:%M:%SZ").dt.to_utc("UTC"),
    )
    table = window_table(events, common.WINDOW_SECONDS, common.OUT_OF_ORDER_SECONDS)
    pw.io.jsonlines.write(table, target)
    run()
    return {}


class RateSubject(pw.io.python.ConnectorSubject):
    """Offers W3 records at a fixed rate, each with its offer time.

    Args:
        rate: Records per second.
        seconds: How long to offer records.
    """

    def __init__(self, rate: float, seconds: float) -> None:
        super().__init__()
        self.rate = rate
        self.total = int(rate * seconds)

    def run(self) -> None:
        """Offer the records on schedule, as many as are due at each step."""
        start = time.monotonic_ns() + 200_000_000
        index = 0
        while index < self.total:
            due = min(
                self.total, common.due_count(self.rate, start, time.monotonic_ns())
            )
            if due <= index:
                common.sleep_until(common.offer_schedule(self.rate, start, index))
                continue
            for i in range(index, due):
                record = common.w3_record(i, common.offer_schedule(self.rate, start, i))
                record["record_id"] = record.pop("id")
                self.next(**record)
            index = due


class W3Schema(pw.Schema):
    """The fields of a W3 record."""

    record_id: int
    carrier: str
    origin: str
    dep_delay: int | None
    arr_delay: int | None
    offered_ns: int


def w3(rate: float, seconds: float, commit_ms: int) -> dict[str, Any]:
    """W3: W1's filter and projection over a fixed-rate input.

    Args:
        rate: Records per second.
        seconds: How long to offer records.
        commit_ms: Pathway's `autocommit_duration_ms` for the input.

    Returns:
        Records offered and latency percentiles.
    """
    records = pw.io.python.read(
        RateSubject(rate, seconds), schema=W3Schema, autocommit_duration_ms=commit_ms
    )
    rows = w1_table(records, pw.this.offered_ns)
    latencies: list[int] = []

    def on_change(key: Any, row: dict[str, Any], time: int, is_addition: bool) -> None:
        if is_addition:
            latencies.append(_now_ns() - row["offered_ns"])

    pw.io.subscribe(rows, on_change=on_change)
    run()
    return {
        "records_in": int(rate * seconds),
        "commit_ms": commit_ms,
        **common.percentiles(latencies, 0.1),
    }


_now_ns = time.monotonic_ns


class StreamSubject(pw.io.python.ConnectorSubject):
    """W6's generated stream: W3 records at a fixed rate, event time now.

    Args:
        rate: Records per second.
        seconds: Run time.
    """

    def __init__(self, rate: float, seconds: float) -> None:
        super().__init__()
        self.rate = rate
        self.total = int(rate * seconds)

    def run(self) -> None:
        """Offer the records on schedule with their event times."""
        start = time.monotonic_ns()
        wall = time.time()
        index = 0
        while index < self.total:
            due = min(
                self.total, common.due_count(self.rate, start, time.monotonic_ns())
            )
            if due <= index:
                common.sleep_until(common.offer_schedule(self.rate, start, index))
                continue
            for i in range(index, due):
                record = common.w3_record(i, 0)
                at = ORIGIN + dt.timedelta(seconds=wall + i / self.rate)
                self.next(
                    carrier=record["carrier"], arr_delay=record["arr_delay"], at=at
                )
            index = due


class W6Schema(pw.Schema):
    """The fields of a W6 record."""

    carrier: str
    arr_delay: int | None
    at: pw.DateTimeUtc


def w6(rate: float, seconds: float) -> dict[str, Any]:
    """W6: W2's windows (10-second windows) over a generated stream.

    Args:
        rate: Records per second.
        seconds: Run time.

    Returns:
        Windows emitted; the runner samples memory from outside.
    """
    events = pw.io.python.read(
        StreamSubject(rate, seconds), schema=W6Schema, autocommit_duration_ms=100
    )
    table = window_table(
        events,
        common.W6_WINDOW_SECONDS,
        common.W6_OUT_OF_ORDER_SECONDS,
        keep_results=False,
    )
    count = [0]

    def on_change(key: Any, row: dict[str, Any], time: int, is_addition: bool) -> None:
        count[0] += is_addition

    pw.io.subscribe(table, on_change=on_change)
    run()
    return {"records_in": int(rate * seconds), "windows_out": count[0]}


def main() -> None:
    """Run the workload named on the command line and report its result."""
    parser = argparse.ArgumentParser(description="Pathway workloads")
    parser.add_argument("workload", choices=["W1", "W2", "W3", "W6"])
    parser.add_argument("--input")
    parser.add_argument("--output")
    parser.add_argument("--rate", type=float, default=50_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--commit-ms", type=int, default=1)
    args = parser.parse_args()
    if args.workload == "W1":
        result = w1(args.input, args.output)
    elif args.workload == "W2":
        result = w2(args.input, args.output)
    elif args.workload == "W3":
        result = w3(args.rate, args.seconds, args.commit_ms)
    else:
        result = w6(args.rate, args.seconds)
    common.report(result)


if __name__ == "__main__":
    main()

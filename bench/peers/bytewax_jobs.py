"""The benchmark workloads written for Bytewax 0.21.

Written from Bytewax's documented API: `Dataflow`, the operators in
`bytewax.operators` and `bytewax.operators.windowing`, `FileSource`, and
custom `DynamicSource` / `DynamicSink` classes for the fixed-rate input,
the line-writing sink and the timing sink. The dataflow runs with `cli_main`,
the entry point `python -m bytewax.run` uses, on one worker: Bytewax
workers in one process share the GIL, and a single input file is one
partition, which only one worker reads.

Run: `python bench/peers/bytewax_jobs.py W1|W2|W3|W5|W6 [options]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import bytewax.operators.windowing as win
import orjson
from bytewax._bytewax import cli_main
from bytewax.connectors.files import FileSource
from bytewax.dataflow import Dataflow
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def run(flow: Dataflow) -> None:
    """Run a dataflow on one worker in this process, until its inputs end.

    Args:
        flow: The dataflow.
    """
    cli_main(flow, workers_per_process=1)


class _LinesPartition(StatelessSinkPartition[str]):
    def __init__(self, path: str) -> None:
        self.file = open(path, "w")  # noqa: SIM115 (closed in close())

    def write_batch(self, items: list[str]) -> None:
        self.file.write("\n".join(items))
        self.file.write("\n")

    def close(self) -> None:
        self.file.close()


class LinesSink(DynamicSink[str]):
    """Writes text lines to one file (one worker).

    Bytewax's `FileSink` is a partitioned sink that takes `(key, line)`
    pairs; this sink takes plain lines, which keeps the dataflow the same
    as the other systems'.

    Args:
        path: Output file, replaced.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _LinesPartition:
        """Build the one partition (one worker)."""
        return _LinesPartition(self.path)


def w1_batch(lines: list[str]) -> list[str]:
    """Parse, filter and project one batch of input lines.

    Args:
        lines: JSON lines, without newlines.

    Returns:
        The output lines.
    """
    out = []
    for line in lines:
        row = common.w1_row(orjson.loads(line))
        if row is not None:
            out.append(orjson.dumps(row).decode())
    return out


def w1(source: str, target: str) -> dict[str, Any]:
    """W1: filter and project JSON lines.

    Args:
        source: Input JSON lines.
        target: Output JSON lines.

    Returns:
        Nothing measured inside; the runner counts the output.
    """
    flow = Dataflow("w1")
    lines = op.input("in", flow, FileSource(source, batch_size=4096))
    rows = op.flat_map_batch("w1", lines, w1_batch)
    op.output("out", rows, LinesSink(target))
    run(flow)
    return {}


def _parse_w2(line: str) -> tuple[str, tuple[datetime, int | None]]:
    record = orjson.loads(line)
    return record["carrier"], (common.parse_ts(record["ts"]), record["arr_delay"])


def _fold(state: list[int], value: tuple[datetime, int | None]) -> list[int]:
    state[0] += 1
    if value[1] is not None:
        state[1] += value[1]
        state[2] += 1
    return state


def _merge(a: list[int], b: list[int]) -> list[int]:
    return [a[0] + b[0], a[1] + b[1], a[2] + b[2]]


def w2(source: str, target: str) -> dict[str, Any]:
    """W2: one-hour event-time windows per carrier.

    Args:
        source: Input JSON lines.
        target: Output JSON lines, one per window.

    Returns:
        Nothing measured inside; the runner counts the output.
    """
    flow = Dataflow("w2")
    lines = op.input("in", flow, FileSource(source, batch_size=4096))
    keyed = op.map("parse", lines, _parse_w2)
    clock = win.EventClock(
        lambda value: value[0],
        wait_for_system_duration=timedelta(seconds=common.OUT_OF_ORDER_SECONDS),
    )
    windower = win.TumblingWindower(
        length=timedelta(seconds=common.WINDOW_SECONDS), align_to=EPOCH
    )
    out = win.fold_window(
        "hourly",
        keyed,
        clock,
        windower,
        lambda: [0, 0, 0],
        _fold,
        _merge,
        ordered=False,
    )

    def render(item: tuple[str, tuple[int, list[int]]]) -> str:
        carrier, (window_id, (count, total, valid)) = item
        start = window_id * common.WINDOW_SECONDS
        row = {
            "carrier": carrier,
            "window_start": common.iso(start),
            "count": count,
            "mean_arr_delay": total / valid if valid else None,
        }
        return orjson.dumps(row).decode()

    op.output("out", op.map("render", out.down, render), LinesSink(target))
    run(flow)
    return {}


class _RatePartition(StatelessSourcePartition[dict[str, Any]]):
    """Offers the W3 records due by now, each stamped with its offer time."""

    def __init__(self, rate: float, seconds: float) -> None:
        self.rate = rate
        self.total = int(rate * seconds)
        self.start = time.monotonic_ns() + 50_000_000
        self.index = 0

    def next_batch(self) -> list[dict[str, Any]]:
        if self.index >= self.total:
            raise StopIteration
        due = min(
            self.total, common.due_count(self.rate, self.start, time.monotonic_ns())
        )
        batch = [
            common.w3_record(i, common.offer_schedule(self.rate, self.start, i))
            for i in range(self.index, due)
        ]
        self.index = max(self.index, due)
        return batch

    def next_awake(self) -> datetime | None:
        wait_ns = common.offer_schedule(self.rate, self.start, self.index) - (
            time.monotonic_ns()
        )
        if wait_ns <= 0:
            return None
        return datetime.now(UTC) + timedelta(microseconds=wait_ns / 1000)


class RateSource(DynamicSource[dict[str, Any]]):
    """W3's fixed-rate input.

    Args:
        rate: Records per second.
        seconds: How long to offer records.
    """

    def __init__(self, rate: float, seconds: float) -> None:
        self.rate = rate
        self.seconds = seconds

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _RatePartition:
        """Build the one partition (one worker)."""
        return _RatePartition(self.rate, self.seconds)


class _TimingPartition(StatelessSinkPartition[dict[str, Any]]):
    def __init__(self, latencies: list[int]) -> None:
        self.latencies = latencies

    def write_batch(self, items: list[dict[str, Any]]) -> None:
        now = time.monotonic_ns()
        self.latencies.extend(now - item["offered_ns"] for item in items)


class TimingSink(DynamicSink[dict[str, Any]]):
    """Records each item's offer-to-sink latency.

    Args:
        latencies: List the latencies are appended to, in nanoseconds.
    """

    def __init__(self, latencies: list[int]) -> None:
        self.latencies = latencies

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _TimingPartition:
        """Build the one partition (one worker)."""
        return _TimingPartition(self.latencies)


def w3(rate: float, seconds: float) -> dict[str, Any]:
    """W3: W1's filter and projection over a fixed-rate input.

    Args:
        rate: Records per second.
        seconds: How long to offer records.

    Returns:
        Records offered and latency percentiles.
    """
    latencies: list[int] = []
    flow = Dataflow("w3")
    records = op.input("in", flow, RateSource(rate, seconds))
    rows = op.filter_map("w3", records, common.w3_row)
    op.output("out", rows, TimingSink(latencies))
    run(flow)
    return {"records_in": int(rate * seconds), **common.percentiles(latencies, 0.1)}


class _TickPartition(StatelessSourcePartition[int]):
    """One record every `period` seconds until `until` (monotonic seconds)."""

    def __init__(self, period: float, until: float) -> None:
        self.period = period
        self.until = until
        self.next = time.monotonic()
        self.count = 0

    def next_batch(self) -> list[int]:
        now = time.monotonic()
        if now >= self.until:
            raise StopIteration
        if now < self.next:
            return []
        self.next += self.period
        self.count += 1
        return [self.count]

    def next_awake(self) -> datetime | None:
        return datetime.now(UTC) + timedelta(
            seconds=max(0.0, self.next - time.monotonic())
        )


class TickSource(DynamicSource[int]):
    """W5's small input: one record per period for a while.

    Args:
        period: Seconds between records.
        seconds: How long the inputs run, from the first one built.
        deadline: Shared by every input: `[time.monotonic()]` at which all
            inputs end, set when the first one is built.
    """

    def __init__(self, period: float, seconds: float, deadline: list[float]) -> None:
        self.period = period
        self.seconds = seconds
        self.deadline = deadline

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _TickPartition:
        """Build the one partition (one worker)."""
        if not self.deadline:
            self.deadline.append(time.monotonic() + self.seconds)
        return _TickPartition(self.period, self.deadline[0])


class _CountPartition(StatelessSinkPartition[int]):
    def __init__(self, counts: list[int], index: int) -> None:
        self.counts = counts
        self.index = index

    def write_batch(self, items: list[int]) -> None:
        self.counts[self.index] += len(items)


class CountSink(DynamicSink[int]):
    """W5's small output: counts the records of one pipeline.

    Args:
        counts: One counter per pipeline.
        index: This pipeline's counter.
    """

    def __init__(self, counts: list[int], index: int) -> None:
        self.counts = counts
        self.index = index

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _CountPartition:
        """Build the one partition (one worker)."""
        return _CountPartition(self.counts, self.index)


def w5(pipelines: int, seconds: float) -> dict[str, Any]:
    """W5: many small independent source-to-sink pipelines in one dataflow.

    Args:
        pipelines: Number of pipelines.
        seconds: How long they run.

    Returns:
        Pipelines that made progress and the memory they took.
    """
    before = common.rss_bytes()
    began = time.monotonic()
    counts = [0] * pipelines
    flow = Dataflow("w5")
    deadline: list[float] = []
    for i in range(pipelines):
        ticks = op.input(f"in{i}", flow, TickSource(0.5, seconds, deadline))
        op.output(
            f"out{i}", op.map(f"add{i}", ticks, lambda x: x + 1), CountSink(counts, i)
        )
    built = common.rss_bytes()
    started = time.monotonic()
    run(flow)
    return {
        "build_seconds": started - began,
        "pipelines": pipelines,
        "progressed": sum(1 for c in counts if c > 0),
        "records_out": sum(counts),
        "rss_before": before,
        "rss_built": built,
        "rss_end": common.rss_bytes(),
        "run_seconds": time.monotonic() - started,
    }


class _StreamPartition(
    StatelessSourcePartition[tuple[str, tuple[datetime, int | None]]]
):
    """W6's generated stream: W3 records at a fixed rate, event time now."""

    def __init__(self, rate: float, seconds: float) -> None:
        self.rate = rate
        self.total = int(rate * seconds)
        self.start = time.monotonic_ns()
        self.wall = datetime.now(UTC)
        self.index = 0

    def next_batch(self) -> list[tuple[str, tuple[datetime, int | None]]]:
        if self.index >= self.total:
            raise StopIteration
        due = min(
            self.total, common.due_count(self.rate, self.start, time.monotonic_ns())
        )
        batch = []
        for i in range(self.index, due):
            record = common.w3_record(i, 0)
            at = self.wall + timedelta(microseconds=i * 1e6 / self.rate)
            batch.append((record["carrier"], (at, record["arr_delay"])))
        self.index = max(self.index, due)
        return batch

    def next_awake(self) -> datetime | None:
        if common.due_count(self.rate, self.start, time.monotonic_ns()) > self.index:
            return None
        return datetime.now(UTC) + timedelta(microseconds=1e6 / self.rate)


class StreamSource(DynamicSource[Any]):
    """W6's unbounded-style input, bounded by a run time.

    Args:
        rate: Records per second.
        seconds: Run time.
    """

    def __init__(self, rate: float, seconds: float) -> None:
        self.rate = rate
        self.seconds = seconds

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _StreamPartition:
        """Build the one partition (one worker)."""
        return _StreamPartition(self.rate, self.seconds)


def w6(rate: float, seconds: float) -> dict[str, Any]:
    """W6: W2's windows (10-second windows) over a generated stream.

    Args:
        rate: Records per second.
        seconds: Run time.

    Returns:
        Windows emitted; the runner samples memory from outside.
    """
    counts = [0]
    flow = Dataflow("w6")
    keyed = op.input("in", flow, StreamSource(rate, seconds))
    clock = win.EventClock(
        lambda value: value[0],
        wait_for_system_duration=timedelta(seconds=common.W6_OUT_OF_ORDER_SECONDS),
    )
    windower = win.TumblingWindower(
        length=timedelta(seconds=common.W6_WINDOW_SECONDS), align_to=EPOCH
    )
    out = win.fold_window(
        "windows",
        keyed,
        clock,
        windower,
        lambda: [0, 0, 0],
        _fold,
        _merge,
        ordered=False,
    )
    ones = op.map("one", out.down, lambda _item: 1)
    op.output("out", ones, CountSink(counts, 0))
    run(flow)
    return {"records_in": int(rate * seconds), "windows_out": counts[0]}


def main() -> None:
    """Run the workload named on the command line and report its result."""
    parser = argparse.ArgumentParser(description="Bytewax workloads")
    parser.add_argument("workload", choices=["W1", "W2", "W3", "W5", "W6"])
    parser.add_argument("--input")
    parser.add_argument("--output")
    parser.add_argument("--rate", type=float, default=50_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--pipelines", type=int, default=100)
    args = parser.parse_args()
    if args.workload == "W1":
        result = w1(args.input, args.output)
    elif args.workload == "W2":
        result = w2(args.input, args.output)
    elif args.workload == "W3":
        result = w3(args.rate, args.seconds)
    elif args.workload == "W5":
        result = w5(args.pipelines, args.seconds)
    else:
        result = w6(args.rate, args.seconds)
    common.report(result)


if __name__ == "__main__":
    main()

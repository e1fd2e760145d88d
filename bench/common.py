"""What every system in the benchmark computes, in one place.

This module uses only the standard library, so the programs of every
system import it: the DataFlare ones from the project's `.venv`, the
Bytewax, Pathway and plain-Python ones from `bench/.peers-venv`.

Workloads (the same data and the same semantics for every system):

- W1: keep flights with `dep_delay > 15` (null is not greater), write
  `id`, `carrier`, `origin`, `dep_delay` and `gained = dep_delay -
  arr_delay` (null when `arr_delay` is null) as JSON lines.
- W2: one-hour event-time tumbling windows of `ts` per `carrier`, aligned
  to the epoch, with one hour of allowed out-of-orderness. Each window
  writes `carrier`, `window_start` (ISO 8601 UTC), `count` (every record)
  and `mean_arr_delay` (mean of the non-null `arr_delay`, null if none).
- W3: W1's filter and projection over records offered at a fixed rate;
  latency is the time from a record's offer to its arrival at the sink.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / ".data"
WORK_DIR = BENCH_DIR / ".work"

THRESHOLD = 15
W1_FIELDS = ("id", "carrier", "origin", "dep_delay", "gained")
WINDOW_SECONDS = 3600
OUT_OF_ORDER_SECONDS = 3600
MAX_DISORDER_SECONDS = 1800
W2_FIELDS = ("carrier", "window_start", "count", "mean_arr_delay")

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_ts(text: str) -> dt.datetime:
    """Parse the benchmark's ISO 8601 UTC time text.

    Args:
        text: Time such as `2013-01-01T10:15:00Z`.

    Returns:
        An aware datetime in UTC.
    """
    return dt.datetime.fromisoformat(text)


def epoch_seconds(text: str) -> int:
    """Return the whole seconds since the epoch of an ISO 8601 UTC time.

    Args:
        text: Time such as `2013-01-01T10:15:00Z`.

    Returns:
        Seconds since 1970-01-01T00:00:00Z.
    """
    return int((parse_ts(text) - EPOCH).total_seconds())


def iso(seconds: int) -> str:
    """Format seconds since the epoch as ISO 8601 UTC text ending in Z.

    Args:
        seconds: Seconds since the epoch.

    Returns:
        Text such as `2013-01-01T10:00:00Z`.
    """
    return (EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def w1_row(record: dict[str, Any]) -> dict[str, Any] | None:
    """Apply W1 to one record.

    Args:
        record: One parsed input record.

    Returns:
        The output record, or None when the record is filtered out.
    """
    delay = record["dep_delay"]
    if delay is None or delay <= THRESHOLD:
        return None
    arr = record["arr_delay"]
    return {
        "id": record["id"],
        "carrier": record["carrier"],
        "origin": record["origin"],
        "dep_delay": delay,
        "gained": None if arr is None else delay - arr,
    }


def window_start(ts_seconds: int) -> int:
    """Return the start of the W2 window holding a time.

    Args:
        ts_seconds: Event time in seconds since the epoch.

    Returns:
        The window's start in seconds since the epoch.
    """
    return ts_seconds - ts_seconds % WINDOW_SECONDS


def report(result: dict[str, Any]) -> None:
    """Print a program's result as the last line of standard output.

    The runner reads this line. It measures the process's peak memory
    itself, from outside.

    Args:
        result: Numbers the program measured, such as records in and out.
    """
    print("RESULT " + json.dumps(result), flush=True)


def offer_schedule(rate: float, start_ns: int, index: int) -> int:
    """Return when record `index` of a fixed-rate stream is offered.

    Args:
        rate: Records per second.
        start_ns: `time.monotonic_ns()` of the first offer.
        index: Record number, from 0.

    Returns:
        The offer time as a `time.monotonic_ns()` value.
    """
    return start_ns + int(index * 1e9 / rate)


def due_count(rate: float, start_ns: int, now_ns: int) -> int:
    """Return how many records of a fixed-rate stream are due at `now_ns`.

    Args:
        rate: Records per second.
        start_ns: `time.monotonic_ns()` of the first offer.
        now_ns: The current `time.monotonic_ns()`.

    Returns:
        Records offered up to and including `now_ns`.
    """
    if now_ns < start_ns:
        return 0
    return int((now_ns - start_ns) * rate / 1e9) + 1


def w3_record(index: int, offered_ns: int) -> dict[str, Any]:
    """Make the W3 record number `index`, offered at `offered_ns`.

    About 57 % of the records pass W1's filter (`dep_delay` 16 to 49 of
    -10 to 49), and one in ten has a null `arr_delay`.

    Args:
        index: Record number, from 0.
        offered_ns: Its offer time, `time.monotonic_ns()`.

    Returns:
        A flight-like record with its offer time in `offered_ns`.
    """
    return {
        "id": index,
        "carrier": CARRIERS[index % len(CARRIERS)],
        "origin": ORIGINS[index % len(ORIGINS)],
        "dep_delay": index % 60 - 10,
        "arr_delay": None if index % 10 == 0 else index % 45 - 5,
        "offered_ns": offered_ns,
    }


CARRIERS = ("UA", "AA", "B6", "DL", "EV", "MQ", "US", "WN", "VX", "FL", "AS", "9E")
ORIGINS = ("EWR", "JFK", "LGA")


def percentiles(latencies_ns: list[int], warmup_fraction: float) -> dict[str, Any]:
    """Summarise W3 latencies, leaving out the first part as warm-up.

    Args:
        latencies_ns: Offer-to-sink latency of every record that reached
            the sink, in arrival order.
        warmup_fraction: Share of the records at the start to leave out.

    Returns:
        p50, p99, p99.9 and max in milliseconds, and the sample count.
    """
    measured = sorted(latencies_ns[int(len(latencies_ns) * warmup_fraction) :])
    if not measured:
        return {"samples": 0}

    def quantile_ms(share: float) -> float:
        return measured[min(len(measured) - 1, int(share * len(measured)))] / 1e6

    return {
        "samples": len(measured),
        "p50_ms": quantile_ms(0.5),
        "p99_ms": quantile_ms(0.99),
        "p999_ms": quantile_ms(0.999),
        "max_ms": measured[-1] / 1e6,
    }


def rss_bytes() -> int:
    """Return this process's resident memory now, from /proc.

    Returns:
        Resident set size in bytes, or 0 where /proc is missing.
    """
    try:
        with open(f"/proc/{os.getpid()}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def sleep_until(deadline_ns: int) -> None:
    """Sleep until `time.monotonic_ns()` reaches `deadline_ns`.

    Sleeps in one call when far from the deadline and yields the processor
    in short steps near it, so that offers keep to the schedule.

    Args:
        deadline_ns: Target `time.monotonic_ns()`.
    """
    while True:
        remaining_ns = deadline_ns - time.monotonic_ns()
        if remaining_ns <= 0:
            return
        time.sleep(remaining_ns / 1e9 if remaining_ns > 200_000 else 0)


def w3_row(record: dict[str, Any]) -> dict[str, Any] | None:
    """Apply W3 (W1's filter and projection, keeping the offer time).

    Args:
        record: One W3 record, as made by `w3_record`.

    Returns:
        The output record with `offered_ns`, or None when filtered out.
    """
    row = w1_row(record)
    if row is not None:
        row["offered_ns"] = record["offered_ns"]
    return row


W6_WINDOW_SECONDS = 10
W6_OUT_OF_ORDER_SECONDS = 1


class Windows:
    """W2's window state in plain Python: count, sum and non-null count.

    Windows close when the watermark (newest event time minus the allowed
    out-of-orderness) reaches their end.

    Args:
        size: Window length in seconds.
        out_of_order: Allowed out-of-orderness in seconds.
    """

    def __init__(
        self, size: int = WINDOW_SECONDS, out_of_order: int = OUT_OF_ORDER_SECONDS
    ) -> None:
        self.size = size
        self.out_of_order = out_of_order
        self.open: dict[tuple[int, str], list[int]] = {}
        self.newest = -(2**62)
        self.next_close = 2**62

    def add(self, carrier: str, ts: int, arr_delay: int | None) -> list[dict[str, Any]]:
        """Count one record; return the windows this record's time closed.

        Args:
            carrier: The record's key.
            ts: Event time in seconds since the epoch.
            arr_delay: The value averaged, or None.

        Returns:
            Output rows of the windows now closed, in start then key order.
        """
        start = ts - ts % self.size
        state = self.open.get((start, carrier))
        if state is None:
            state = self.open[(start, carrier)] = [0, 0, 0]
            self.next_close = min(self.next_close, start + self.size)
        state[0] += 1
        if arr_delay is not None:
            state[1] += arr_delay
            state[2] += 1
        if ts > self.newest:
            self.newest = ts
            if ts - self.out_of_order >= self.next_close:
                return self.close(ts - self.out_of_order)
        return []

    def close(self, watermark: int) -> list[dict[str, Any]]:
        """Emit and forget every window ending at or before `watermark`.

        Args:
            watermark: Seconds since the epoch.

        Returns:
            Output rows, in start then key order.
        """
        done = sorted(k for k in self.open if k[0] + self.size <= watermark)
        rows = []
        for key in done:
            count, total, valid = self.open.pop(key)
            rows.append(
                {
                    "carrier": key[1],
                    "window_start": iso(key[0]),
                    "count": count,
                    "mean_arr_delay": total / valid if valid else None,
                }
            )
        self.next_close = min((k[0] + self.size for k in self.open), default=2**62)
        return rows

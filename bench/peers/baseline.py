"""The plain-Python baseline: one loop, orjson, no framework.

It computes exactly what the stream processors compute (see
`bench/common.py`), as a floor for what one Python thread can do with the
fastest JSON library. It has no parallelism, no backpressure and no
recovery; it shows the cost of the frameworks, not a replacement for them.

Run: `python bench/peers/baseline.py W1|W2|W3|W6 [options]` (the runner
passes the options; see `--help`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common


def w1(source: str, target: str) -> dict[str, int]:
    """Filter and project JSON lines.

    Args:
        source: Input JSON lines.
        target: Output JSON lines.

    Returns:
        Records read and written.
    """
    read = written = 0
    with open(source, "rb") as lines, open(target, "wb") as out:
        for line in lines:
            read += 1
            row = common.w1_row(orjson.loads(line))
            if row is not None:
                out.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
                written += 1
    return {"records_in": read, "records_out": written}


def w2(source: str, target: str) -> dict[str, int]:
    """Count and average per carrier per event-time hour.

    Args:
        source: Input JSON lines.
        target: Output JSON lines, one per window.

    Returns:
        Records read and windows written.
    """
    windows = common.Windows()
    seconds: dict[str, int] = {}  # parse each distinct time text once
    read = written = 0
    with open(source, "rb") as lines, open(target, "wb") as out:

        def emit(rows: list[dict[str, object]]) -> None:
            nonlocal written
            for row in rows:
                out.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
            written += len(rows)

        for line in lines:
            read += 1
            record = orjson.loads(line)
            text = record["ts"]
            ts = seconds.get(text)
            if ts is None:
                if len(seconds) > 100_000:
                    seconds.clear()
                ts = seconds[text] = common.epoch_seconds(text)
            emit(windows.add(record["carrier"], ts, record["arr_delay"]))
        emit(windows.close(2**62))
    return {"records_in": read, "records_out": written}


def w3(rate: float, seconds: float) -> dict[str, object]:
    """Offer records at a fixed rate, process them, time them at the sink.

    Args:
        rate: Records per second.
        seconds: How long to offer records.

    Returns:
        Records offered and latency percentiles.
    """
    latencies: list[int] = []
    start = time.monotonic_ns() + 10_000_000
    total = int(rate * seconds)
    index = 0
    while index < total:
        due = min(total, common.due_count(rate, start, time.monotonic_ns()))
        if due <= index:
            common.sleep_until(common.offer_schedule(rate, start, index))
            continue
        rows = []
        for i in range(index, due):
            row = common.w3_row(
                common.w3_record(i, common.offer_schedule(rate, start, i))
            )
            if row is not None:
                rows.append(row)
        index = due
        now = time.monotonic_ns()
        latencies.extend(now - row["offered_ns"] for row in rows)
    return {"records_in": total, **common.percentiles(latencies, 0.1)}


def w6(rate: float, seconds: float) -> dict[str, object]:
    """Run W2's windows over a generated stream for a fixed time.

    Args:
        rate: Records per second.
        seconds: Run time.

    Returns:
        Records processed and windows emitted.
    """
    windows = common.Windows(common.W6_WINDOW_SECONDS, common.W6_OUT_OF_ORDER_SECONDS)
    start = time.monotonic_ns()
    wall = time.time()
    total = int(rate * seconds)
    index = emitted = 0
    while index < total:
        due = min(total, common.due_count(rate, start, time.monotonic_ns()))
        if due <= index:
            common.sleep_until(common.offer_schedule(rate, start, index))
            continue
        for i in range(index, due):
            record = common.w3_record(i, 0)
            ts = int(wall + (common.offer_schedule(rate, start, i) - start) / 1e9)
            emitted += len(windows.add(record["carrier"], ts, record["arr_delay"]))
        index = due
    return {"records_in": total, "windows_out": emitted}


def main() -> None:
    """Run the workload named on the command line and report its result."""
    parser = argparse.ArgumentParser(description="plain-Python baseline")
    parser.add_argument("workload", choices=["W1", "W2", "W3", "W6"])
    parser.add_argument("--input")
    parser.add_argument("--output")
    parser.add_argument("--rate", type=float, default=50_000)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    if args.workload == "W1":
        result = w1(args.input, args.output)
    elif args.workload == "W2":
        result = w2(args.input, args.output)
    elif args.workload == "W3":
        result = w3(args.rate, args.seconds)
    else:
        result = w6(args.rate, args.seconds)
    common.report(result)


if __name__ == "__main__":
    main()

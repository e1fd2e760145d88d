"""Exactly-once recovery of `dedupe`, `aggregate` and `join` after SIGKILL.

Each pipeline checkpoints every 80 ms and is killed several times: at
random moments and at the crash points `checkpoint-write` and
`sink-commit`. The output committed once a last run completes must equal
that of a run that was never interrupted, and the expected result computed
with DuckDB or plain Python.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as ds
import pytest

from dataflare import run_pipeline

EVENTS = 30_000
USERS = 300
KILLS = 5

SOURCE = """
id: {name}
sources:
  events:
    type: jsonl
    config:
      path: {data}/events.jsonl
      block_size: 32768
      schema: {{id: int, user: int, item: int, amount: int, at: timestamp}}
    event_time: {{field: at}}
    watermark: {{max_out_of_orderness: 1m}}
"""

PIPELINES = {
    "dedupe": """
transformations:
  unique:
    type: dedupe
    inputs: [events]
    parallelism: 2
    config: {{key: [user, item], within: 10m}}
destinations:
  out:
    type: parquet
    inputs: [unique]
    config: {{path: {out}}}
""",
    "aggregate": """
transformations:
  per_user:
    type: aggregate
    inputs: [events]
    parallelism: 2
    config:
      group_by: [user]
      aggregations:
        records: {{fn: count}}
        total: {{fn: sum, field: amount}}
        mean: {{fn: mean, field: amount}}
        low: {{fn: min, field: amount}}
        high: {{fn: max, field: amount}}
        items: {{fn: count_distinct, field: item}}
        p90: {{fn: percentile, field: amount, q: 0.9}}
destinations:
  out:
    type: parquet
    inputs: [per_user]
    config: {{path: {out}}}
""",
    "join": """
  users:
    type: jsonl
    config: {{path: {data}/users.jsonl, schema: {{user: int, country: string}}}}
transformations:
  with_country:
    type: join
    inputs: [events, users]
    config: {{on: user, how: inner, fields: [country]}}
destinations:
  out:
    type: parquet
    inputs: [with_country]
    config: {{path: {out}}}
""",
}

FOOTER = """
execution: {{max_batch_rows: 2000}}
checkpointing: {{interval: 80ms, storage: {checkpoints}, keep: 2}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write events (out of order by up to 20 s) and a users table."""
    folder = tmp_path_factory.mktemp("events")
    rng = random.Random(20261204)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    with (folder / "events.jsonl").open("w") as out:
        for i in range(EVENTS):
            at = start + dt.timedelta(seconds=i * 0.5 - rng.uniform(0, 20))
            record = {
                "id": i,
                "user": rng.randrange(USERS),
                "item": rng.randrange(12),
                "amount": rng.randrange(-50, 500),
                "at": at.isoformat(),
            }
            out.write(json.dumps(record) + "\n")
    with (folder / "users.jsonl").open("w") as out:
        for user in range(0, USERS, 3):
            out.write(json.dumps({"user": user, "country": f"c{user % 7}"}) + "\n")
    return folder


def write_pipeline(kind: str, folder: Path, data: Path) -> Path:
    text = (SOURCE + PIPELINES[kind] + FOOTER).format(
        name=f"recover-{kind}",
        data=data,
        out=folder / "out",
        checkpoints=folder / "checkpoints",
    )
    path = folder / "pipeline.yaml"
    path.write_text(text)
    return path


def rows(folder: Path) -> list[tuple[Any, ...]]:
    table = ds.dataset(folder, format="parquet").to_table()
    return sorted(tuple(r.values()) for r in table.to_pylist())


def start(path: Path, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("DATAFLARE_CRASH_AT", None)
    if crash_at is not None:
        env["DATAFLARE_CRASH_AT"] = crash_at
    command = [sys.executable, "-m", "dataflare.cli.main", "run", str(path)]
    return subprocess.Popen(
        [*command, "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def crash_repeatedly(path: Path, seed: int) -> int:
    """Kill runs of `path` until `KILLS` kills happened; return the number.

    Two runs die at crash points; the others get SIGKILL after a random
    share of the time a whole run takes, measured first. A run that
    completes before its delay ends counts no kill, and the next run starts
    over.
    """
    rng = random.Random(seed)
    began = time.monotonic()
    whole = start(path)
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err.decode()[-3000:]
    run_seconds = time.monotonic() - began
    plan: list[str | None] = [
        f"checkpoint-write:{rng.randint(2, 6)}",
        f"sink-commit:{rng.randint(1, 3)}",
    ] + [None] * 60
    kills = 0
    for crash_at in plan:
        if kills >= KILLS:
            break
        process = start(path, crash_at)
        try:
            timeout = (
                120 if crash_at is not None else rng.uniform(0.3, 0.9) * run_seconds
            )
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert process.stderr is not None
        err = process.stderr.read().decode()
        process.stderr.close()
        if process.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert process.returncode == 0, err[-3000:]
    return kills


def recover(
    kind: str, data: Path, tmp_path: Path, seed: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Return the rows of an uninterrupted run and of a run killed repeatedly."""
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    run_pipeline(write_pipeline(kind, baseline, data))
    crashing = tmp_path / "crashing"
    crashing.mkdir()
    path = write_pipeline(kind, crashing, data)

    kills = crash_repeatedly(path, seed)
    final = start(path)
    _, err = final.communicate(timeout=300)

    assert kills == KILLS
    assert final.returncode == 0, err.decode()[-3000:]
    hidden = [p.name for p in (crashing / "out").iterdir() if p.name.startswith(".")]
    assert hidden == []
    return rows(baseline / "out"), rows(crashing / "out")


def events(data: Path) -> list[dict[str, Any]]:
    with (data / "events.jsonl").open() as lines:
        return [json.loads(line) for line in lines]


def test_dedupe_recovers_exactly_once(data: Path, tmp_path: Path) -> None:
    expected, recovered = recover("dedupe", data, tmp_path, seed=1)

    # Reference: keep a record unless a kept record of its key is less than
    # 10 minutes of event time away (every record here is on time).
    kept_times: dict[tuple[int, int], list[dt.datetime]] = {}
    kept_ids = []
    for record in events(data):
        at = dt.datetime.fromisoformat(record["at"])
        times = kept_times.setdefault((record["user"], record["item"]), [])
        if all(abs((at - t).total_seconds()) >= 600 for t in times):
            times.append(at)
            kept_ids.append(record["id"])
    assert recovered == expected
    assert sorted(r[0] for r in recovered) == sorted(kept_ids)


def test_aggregate_recovers_exactly_once(data: Path, tmp_path: Path) -> None:
    expected, recovered = recover("aggregate", data, tmp_path, seed=2)

    reference = duckdb.execute(
        f"""
        select "user", count(*), sum(amount), avg(amount), min(amount),
               max(amount), count(distinct item), quantile_cont(amount, 0.9)
        from read_json('{data}/events.jsonl') group by "user" order by "user"
        """
    ).fetchall()
    assert recovered == expected
    assert len(recovered) == len(reference)
    for got, want in zip(recovered, reference, strict=True):
        assert got[:3] == want[:3]
        assert got[3] == pytest.approx(want[3])
        assert got[4:7] == want[4:7]
        assert got[7] == pytest.approx(want[7])


def test_join_recovers_exactly_once(data: Path, tmp_path: Path) -> None:
    expected, recovered = recover("join", data, tmp_path, seed=3)

    reference = duckdb.execute(
        f"""
        select e.id, u.country
        from read_json('{data}/events.jsonl') e
        join read_json('{data}/users.jsonl') u using ("user")
        order by e.id
        """
    ).fetchall()
    assert recovered == expected
    assert sorted((r[0], r[-1]) for r in recovered) == reference

"""Window state in the keyed state backend: memory and disk give equal results.

A windowed pipeline that checkpoints into the disk backend must write what
the memory backend and DuckDB compute. A `WindowTransform` saved with
buffered records and restored (into either backend) must fire what an
uninterrupted one fires. Each check runs with aggregations that keep the
records (`exact`) and with decomposable ones that keep partial results
(`partial`), and with a small `FLUSH_ROWS`, so that records move from the
pending buffer into the frame store and partial results get merged.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from dataflare import run_pipeline
from dataflare.plugin.interface import EVENT_TIME
from dataflare.state.backends import StateBackendSettings
from dataflare.transforms import window as window_module
from dataflare.transforms.window import WindowConfig, WindowTransform

T0 = datetime(2024, 3, 1, tzinfo=UTC)
EVENTS = 3000
COMMON: dict[str, dict[str, Any]] = {
    "n": {"fn": "count"},
    "total": {"fn": "sum", "field": "v"},
    "low": {"fn": "min", "field": "v"},
    "high": {"fn": "max", "field": "v"},
}
AGGREGATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "exact": COMMON
    | {
        "kinds": {"fn": "count_distinct", "field": "v"},
        "p90": {"fn": "percentile", "field": "v", "q": 0.9},
    },
    "partial": COMMON
    | {
        "avg": {"fn": "mean", "field": "v"},
        "head": {"fn": "first", "field": "v"},
        "tail": {"fn": "last", "field": "v"},
    },
}
# The same results in DuckDB, in the order of AGGREGATIONS. Records arrive in
# the order of `i`, except in sessions, which order them by event time.
DUCKDB = {
    "exact": "count(*), sum(v), min(v), max(v), count(distinct v),"
    " round(quantile_cont(v, 0.9), 9)",
    "partial": "count(*), sum(v), min(v), max(v), round(avg(v), 9),"
    " first(v order by {order}), last(v order by {order})",
}
# Pending records that trigger a flush into the frame store: the default,
# and few enough that most batches flush.
FLUSH_ROWS = {"default": window_module.FLUSH_ROWS, "small": 64}
WINDOWS = {
    "tumbling": {"kind": "tumbling", "size": "1h"},
    "sliding": {"kind": "sliding", "size": "1h", "slide": "15m"},
    "session": {"kind": "session", "gap": "20m"},
}


def events() -> list[dict[str, Any]]:
    """Records a few minutes apart, slightly out of order, with gaps for sessions."""
    records = []
    for i in range(EVENTS):
        minute = i * 1.7 + (i * 7919 % 5) - (300 if i % 400 > 380 else 0)
        minute += (i // 400) * 90  # a quiet stretch every 400 records
        records.append(
            {
                "t": (T0 + timedelta(minutes=minute)).isoformat(),
                "k": "abcde"[i * 31 % 5],
                "v": i * 37 % 101,
                "i": i,
            }
        )
    return records


PIPELINE = """
id: window-state-{name}
sources:
  events:
    type: jsonl
    config:
      path: {data}
      block_size: 8192
      schema: {{t: timestamp, k: string, v: int, i: int}}
    event_time: {{field: t}}
    watermark: {{max_out_of_orderness: 6h}}
transformations:
  windows:
    type: window
    inputs: [events]
    config: {config}
destinations:
  out:
    type: memory
    inputs: [windows]
{checkpointing}
"""


def result_rows(rows: list[dict[str, Any]], aggregations: str) -> list[tuple[Any, ...]]:
    """Return window rows as sorted tuples, with floats rounded to 9 digits."""
    names = list(AGGREGATIONS[aggregations])
    return sorted(
        (
            r["window_start"],
            r["window_end"],
            r["k"],
            *(round(r[n], 9) if isinstance(r[n], float) else r[n] for n in names),
        )
        for r in rows
    )


def run_windows(
    tmp_path: Path, name: str, window: str, aggregations: str, backend: str
) -> list[tuple[Any, ...]]:
    data = tmp_path / "events.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in events()))
    config = WINDOWS[window] | {
        "key_by": ["k"],
        "aggregations": AGGREGATIONS[aggregations],
    }
    checkpointing = ""
    if backend == "disk":
        checkpointing = (
            f"checkpointing: {{state_backend: disk, state_dir: {tmp_path / 'state'},"
            f" interval: 50ms, storage: {tmp_path / 'checkpoints'}}}"
        )
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        PIPELINE.format(
            name=name,
            data=data,
            config=json.dumps(config),
            checkpointing=checkpointing,
        )
    )
    summary = run_pipeline(path)
    assert summary.late == 0
    return result_rows(summary.output("out").to_pylist(), aggregations)


def duckdb_windows(window: str, aggregations: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    table = pa.Table.from_pylist(events())
    con.register("raw", table)
    con.execute("create view events as select t::timestamptz t, k, v, i from raw")
    order = "t, i" if window == "session" else "i"
    aggregates = DUCKDB[aggregations].format(order=order)
    if window == "tumbling":
        assigned = (
            "select time_bucket(interval 1 hour, t) ws,"
            " time_bucket(interval 1 hour, t) + interval 1 hour we, k, v, t, i"
            " from events"
        )
    elif window == "sliding":
        assigned = (
            "select s.ws, s.ws + interval 1 hour we, k, v, t, i from events,"
            " (select unnest([time_bucket(interval 15 minute, t) - o * interval"
            " 15 minute for o in range(4)]) ws) s"
        )
    else:
        assigned = """
            with marked as (
              select *, coalesce(t - lag(t) over w >= interval 20 minute, true) new
              from events window w as (partition by k order by t)
            ), numbered as (
              select *, sum(new::int) over (partition by k order by t) session
              from marked
            )
            select min(t) over s ws, max(t) over s + interval 20 minute we, k, v,
              t, i
            from numbered window s as (partition by k, session)
        """
    rows = con.execute(
        f"select ws, we, k, {aggregates} from ({assigned}) group by ws, we, k"
        " order by all"
    ).fetchall()
    return sorted(tuple(row) for row in rows)


@pytest.mark.parametrize("flush", list(FLUSH_ROWS))
@pytest.mark.parametrize("aggregations", list(AGGREGATIONS))
@pytest.mark.parametrize("window", list(WINDOWS))
def test_disk_backend_matches_memory_and_duckdb(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    window: str,
    aggregations: str,
    flush: str,
) -> None:
    monkeypatch.setattr(window_module, "FLUSH_ROWS", FLUSH_ROWS[flush])

    on_disk = run_windows(tmp_path, "disk", window, aggregations, "disk")
    in_memory = run_windows(tmp_path, "memory", window, aggregations, "memory")

    assert on_disk == in_memory
    assert on_disk == duckdb_windows(window, aggregations)
    assert not list((tmp_path / "state").iterdir())  # working files removed


def test_events_have_distinct_times_per_key() -> None:
    # Sessions order records by event time; ties would make first and last
    # depend on the sort, so the data has none.
    pairs = [(r["k"], r["t"]) for r in events()]

    assert len(set(pairs)) == len(pairs)


# --- snapshot and restore of one transform ---------------------------------------


class Context:
    """The parts of the operator context a window uses."""

    def __init__(self, backend: str, folder: Path) -> None:
        self.step = "windows"
        self.instance = 0
        self.parallelism = 1
        self.logger = logging.getLogger("test")
        self.state_backend = StateBackendSettings(backend, str(folder))  # type: ignore[arg-type]
        self.late: list[pa.RecordBatch] = []
        self.counts: dict[str, int] = {}

    def count(self, name: str, value: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + value

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        self.late.append(batch)


def batches() -> list[tuple[pa.RecordBatch, int]]:
    """Batches of 50 records, each with the watermark that follows it."""
    schema = pa.schema(
        [("k", pa.string()), ("v", pa.int64()), (EVENT_TIME, pa.timestamp("us", "UTC"))]
    )
    records = [
        {"k": r["k"], "v": r["v"], EVENT_TIME: datetime.fromisoformat(r["t"])}
        for r in events()
    ]
    out = []
    for start in range(0, len(records), 50):
        part = records[start : start + 50]
        newest = max(r[EVENT_TIME] for r in part)
        watermark = int((newest - T0).total_seconds() * 1e6) - 6 * 3600 * 10**6
        watermark += int(T0.timestamp() * 1e6)
        out.append((pa.RecordBatch.from_pylist(part, schema=schema), watermark))
    for i in range(1, len(out)):  # watermarks never go back
        out[i] = (out[i][0], max(out[i][1], out[i - 1][1]))
    return out


def make(window: str, aggregations: str, backend: str, folder: Path) -> WindowTransform:
    config = WindowConfig.model_validate(
        WINDOWS[window] | {"key_by": ["k"], "aggregations": AGGREGATIONS[aggregations]}
    )
    transform = WindowTransform(config, Context(backend, folder))  # type: ignore[arg-type]
    transform.open()
    return transform


def feed(
    transform: WindowTransform, part: list[tuple[pa.RecordBatch, int]]
) -> list[pa.RecordBatch]:
    fired: list[pa.RecordBatch] = []
    for batch, watermark in part:
        fired += transform.process(batch)
        fired += transform.on_watermark(watermark)
    return fired


def fired_rows(fired: list[pa.RecordBatch]) -> list[dict[str, Any]]:
    return [row for batch in fired for row in batch.to_pylist()]


@pytest.mark.parametrize("flush", list(FLUSH_ROWS))
@pytest.mark.parametrize("aggregations", list(AGGREGATIONS))
@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize(
    ("saved_in", "restored_in"),
    [("memory", "memory"), ("disk", "disk"), ("memory", "disk"), ("disk", "memory")],
)
def test_snapshot_restore_fires_as_uninterrupted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    window: str,
    aggregations: str,
    flush: str,
    saved_in: str,
    restored_in: str,
) -> None:
    monkeypatch.setattr(window_module, "FLUSH_ROWS", FLUSH_ROWS[flush])
    data = batches()
    middle = len(data) // 2 + 7

    whole = make(window, aggregations, "memory", tmp_path)
    expected = feed(whole, data) + whole.finish()
    whole.close()

    first = make(window, aggregations, saved_in, tmp_path)
    fired = feed(first, data[:middle])
    saved = first.snapshot_state()
    assert saved is not None
    # Records after the snapshot are lost with the crashed instance.
    feed(first, data[middle : middle + 3])
    first.close()

    second = make(window, aggregations, restored_in, tmp_path)
    second.restore_state(saved)
    assert second._frames.slots or second._pending, "the snapshot should hold records"
    fired += feed(second, data[middle:]) + second.finish()
    second.close()

    assert fired_rows(fired) == fired_rows(expected)
    assert len(fired_rows(expected)) > 20
    assert not list(tmp_path.iterdir())  # disk working folders removed


def test_snapshot_holds_flushed_and_pending_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(window_module, "FLUSH_ROWS", 64)
    data = batches()
    middle = len(data) // 2 + 7

    first = make("sliding", "partial", "disk", tmp_path)
    feed(first, data[:middle])
    first.process(data[middle][0])  # pending, as the watermark has not moved
    saved = first.snapshot_state()
    first.close()
    second = make("sliding", "partial", "memory", tmp_path)
    assert saved is not None
    second.restore_state(saved)

    assert second._frames.slots
    assert second._pending_rows >= data[middle][0].num_rows
    second.close()


def test_partial_results_are_compacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(window_module, "FLUSH_ROWS", 1)
    data = batches()[:6]
    records = pa.Table.from_batches([batch for batch, _ in data])
    records = records.append_column("i", pa.array(range(records.num_rows)))

    window = make("tumbling", "partial", "memory", tmp_path)
    for batch, _ in data:  # one record at a time and no watermark: all stay open
        for row in range(batch.num_rows):
            window.process(batch.slice(row, 1))
    max_frames = max(window._frames.slots.values())
    fired = fired_rows(window.finish())
    window.close()

    con = duckdb.connect()
    expected = con.sql(
        "select time_bucket(interval 1 hour, _event_time) ws, k, count(*) n,"
        " sum(v) total, first(v order by i) head, last(v order by i) tail"
        " from records group by all"
    ).fetchall()
    # Each record was flushed on its own, so a window got one frame per record.
    per_window = con.sql(
        "select count(*) from records group by time_bucket(interval 1 hour,"
        " _event_time)"
    ).fetchall()
    assert max(count for (count,) in per_window) > 2 * window_module._COMPACT_FRAMES
    assert max_frames <= window_module._COMPACT_FRAMES
    assert sorted(
        (r["window_start"], r["k"], r["n"], r["total"], r["head"], r["tail"])
        for r in fired
    ) == sorted(expected)

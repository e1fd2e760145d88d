"""Event-time windows: boundaries, out-of-order records, lateness, idleness."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from dataflare import Pipeline, PipelineValidationError
from dataflare.streaming.runner import PipelineRun

T0 = datetime(2024, 3, 1, tzinfo=UTC)


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


def window_pipeline(
    records: list[dict[str, Any]],
    tmp_path: Path,
    *,
    bound: str = "0s",
    late_reader: bool = False,
    **window: Any,
) -> Pipeline:
    p = Pipeline("windows")
    # One record per batch, so that the watermark advances after each record.
    src = p.source(
        "events",
        "memory",
        records=records,
        batch_rows=1,
        event_time={"field": "t"},
        watermark={"max_out_of_orderness": bound},
    )
    config = {"size": "1h", "aggregations": {"n": {"fn": "count"}}} | window
    hourly = p.transform("hourly", "window", [src], **config)
    p.destination("out", "memory", [hourly])
    if late_reader:
        p.destination("late", "memory", ["hourly.late"])
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    return p


def rows(table: pa.Table) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = table.to_pylist()
    return records


def test_record_on_window_end_goes_to_next(tmp_path: Path) -> None:
    records = [{"t": at(0)}, {"t": at(59.99)}, {"t": at(60)}]

    summary = window_pipeline(records, tmp_path).run()

    out = rows(summary.output("out"))
    assert [r["n"] for r in out] == [2, 1]
    assert out[1]["window_start"] == T0 + timedelta(hours=1)
    assert out[0]["window_end"] == T0 + timedelta(hours=1)


def test_out_of_order_within_bound_counts(tmp_path: Path) -> None:
    records = [{"t": at(55)}, {"t": at(62)}, {"t": at(58)}]

    summary = window_pipeline(records, tmp_path, bound="10m").run()

    assert [r["n"] for r in rows(summary.output("out"))] == [2, 1]
    assert summary.late == 0


def test_late_record_goes_to_side_output(tmp_path: Path) -> None:
    records = [{"t": at(10), "id": 1}, {"t": at(65), "id": 2}, {"t": at(20), "id": 3}]

    summary = window_pipeline(records, tmp_path, late_reader=True).run()

    assert [r["n"] for r in rows(summary.output("out"))] == [1, 1]
    late = rows(summary.output("late"))
    assert [r["id"] for r in late] == [3]
    assert summary.late == 1
    assert summary.rejected == 0


def test_late_record_without_reader_is_dead_lettered(tmp_path: Path) -> None:
    records = [{"t": at(10), "id": 1}, {"t": at(65), "id": 2}, {"t": at(20), "id": 3}]

    summary = window_pipeline(records, tmp_path).run()

    assert summary.late == 1
    assert summary.rejected == 1
    text = (tmp_path / "dead.jsonl").read_text()
    assert '"id":3' in text
    assert "late record" in text


def test_allowed_lateness_keeps_record(tmp_path: Path) -> None:
    records = [
        {"t": at(10)},
        {"t": at(65)},
        {"t": at(20)},
        {"t": at(75)},
        {"t": at(30)},
    ]

    summary = window_pipeline(records, tmp_path, allowed_lateness="10m").run()

    # 00:20 arrives at watermark 01:05 < 01:00 + 10m: still counted.
    # 00:30 arrives at watermark 01:15 >= 01:10: late.
    assert [r["n"] for r in rows(summary.output("out"))] == [2, 2]
    assert summary.late == 1


def test_empty_input_gives_empty_output(tmp_path: Path) -> None:
    empty = pa.table({"t": pa.array([], pa.string())})

    summary = window_pipeline(empty, tmp_path).run()

    out = summary.output("out")
    assert out.num_rows == 0
    assert "window_start" in out.schema.names


def test_keyed_tumbling_matches_duckdb(tmp_path: Path) -> None:
    records = [
        {"t": at(i * 7.3), "k": "abc"[i % 3], "v": (i * 37) % 11} for i in range(200)
    ]
    aggregations = {
        "n": {"fn": "count"},
        "total": {"fn": "sum", "field": "v"},
        "low": {"fn": "min", "field": "v"},
        "high": {"fn": "max", "field": "v"},
        "avg": {"fn": "mean", "field": "v"},
        "kinds": {"fn": "count_distinct", "field": "v"},
        "p90": {"fn": "percentile", "field": "v", "q": 0.9},
    }

    summary = window_pipeline(
        records, tmp_path, key_by=["k"], aggregations=aggregations
    ).run()

    actual = sorted(
        (
            r["window_start"],
            r["k"],
            r["n"],
            r["total"],
            r["low"],
            r["high"],
            round(r["avg"], 9),
            r["kinds"],
            round(r["p90"], 9),
        )
        for r in rows(summary.output("out"))
    )
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("events", pa.Table.from_pylist(records))
    expected = con.execute(
        "select time_bucket(interval 1 hour, t::timestamptz) ws, k, count(*), sum(v),"
        " min(v), max(v), round(avg(v), 9), count(distinct v),"
        " round(quantile_cont(v, 0.9), 9) from events group by all order by all"
    ).fetchall()
    assert [a[1:] for a in actual] == [tuple(e[1:]) for e in expected]
    assert [a[0] for a in actual] == [e[0] for e in expected]


def test_sliding_window_counts(tmp_path: Path) -> None:
    records = [{"t": at(m)} for m in (5, 20, 35, 50, 65)]

    summary = window_pipeline(records, tmp_path, kind="sliding", slide="30m").run()

    out = {r["window_start"]: r["n"] for r in rows(summary.output("out"))}
    expected = {}
    for start in range(-30, 70, 30):
        count = sum(1 for m in (5, 20, 35, 50, 65) if start <= m < start + 60)
        if count:
            expected[T0 + timedelta(minutes=start)] = count
    assert out == expected


def test_session_windows_split_on_gap(tmp_path: Path) -> None:
    minutes = [0, 10, 25, 60, 61, 200]
    records = [{"t": at(m), "k": "a"} for m in minutes] + [{"t": at(5), "k": "b"}]
    records.sort(key=lambda r: r["t"])

    summary = window_pipeline(
        records, tmp_path, kind="session", gap="30m", key_by=["k"], size=None
    ).run()

    sessions = [
        (r["k"], r["window_start"], r["window_end"], r["n"])
        for r in rows(summary.output("out"))
    ]
    gap = timedelta(minutes=30)
    assert sorted(sessions) == sorted(
        [
            ("a", T0, T0 + timedelta(minutes=25) + gap, 3),
            ("a", T0 + timedelta(minutes=60), T0 + timedelta(minutes=61) + gap, 2),
            ("a", T0 + timedelta(minutes=200), T0 + timedelta(minutes=200) + gap, 1),
            ("b", T0 + timedelta(minutes=5), T0 + timedelta(minutes=5) + gap, 1),
        ]
    )


def test_window_needs_event_time(tmp_path: Path) -> None:
    p = Pipeline("no-time")
    src = p.source("events", "memory", records=[{"v": 1}])
    p.transform("w", "window", [src], size="1h", aggregations={"n": {"fn": "count"}})
    p.destination("out", "memory", ["w"])

    with pytest.raises(PipelineValidationError) as caught:
        p.build()

    assert "event_time" in str(caught.value)


def test_window_misspelt_key_is_named(tmp_path: Path) -> None:
    p = window_pipeline([{"t": at(0), "carrier": "AA"}], tmp_path, key_by=["carier"])

    with pytest.raises(PipelineValidationError) as caught:
        p.build()

    message = str(caught.value)
    assert "transformations.hourly.config.key_by" in message
    assert "'carier'" in message
    assert "carrier" in message


def test_idle_source_releases_watermark(tmp_path: Path) -> None:
    busy = tmp_path / "busy.csv"
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    busy.write_text("t\n" + "".join(f"{at(m)}\n" for m in (0, 30, 70)))
    p = Pipeline("idle")
    config = {"follow": True, "poll_interval": "20ms", "schema": {"t": "string"}}
    a = p.source(
        "busy",
        "csv",
        path=str(busy),
        event_time={"field": "t"},
        watermark={"idle_timeout": "100ms"},
        **config,
    )
    b = p.source(
        "quiet",
        "csv",
        path=str(quiet),
        event_time={"field": "t"},
        watermark={"idle_timeout": "100ms"},
        **config,
    )
    w = p.transform(
        "hourly", "window", [a, b], size="1h", aggregations={"n": {"fn": "count"}}
    )
    p.destination("out", "memory", [w])
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    run = PipelineRun(p.build())
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(summary=run.run()))
    thread.start()

    deadline = time.monotonic() + 20
    while run.snapshot().records_written == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    written_while_running = run.snapshot().records_written
    run.stop()
    thread.join(timeout=20)

    assert written_while_running == 1  # the first hour closed while running
    assert [r["n"] for r in result["summary"].output("out").to_pylist()] == [2, 1]


def sessions_of(table: pa.Table) -> list[tuple[Any, ...]]:
    return sorted(
        (r.get("k"), r["window_start"], r["window_end"], r["n"]) for r in rows(table)
    )


def session_pipeline(
    minutes: Sequence[tuple[str, float]], tmp_path: Path, **window: Any
) -> Pipeline:
    """Sessions with a 30-minute gap over records `(key, minute)`, in this order."""
    records = [{"t": at(m), "k": k, "id": i} for i, (k, m) in enumerate(minutes)]
    config = {"kind": "session", "gap": "30m", "size": None, "key_by": ["k"]}
    return window_pipeline(records, tmp_path, late_reader=True, **(config | window))


def test_record_joining_emitted_session_is_late(tmp_path: Path) -> None:
    # Records at 00:00 and 00:10 form a session that ends at 00:40 (last
    # record plus the 30-minute gap). The record at 00:45 moves the watermark
    # past 00:40, so the session is emitted. Records at 00:20 and 00:39 would
    # extend it, so they are late.
    minutes = [("a", 0), ("a", 10), ("a", 45), ("a", 20), ("a", 39)]

    summary = session_pipeline(minutes, tmp_path).run()

    gap = timedelta(minutes=30)
    assert sessions_of(summary.output("out")) == [
        ("a", T0, T0 + timedelta(minutes=10) + gap, 2),
        ("a", T0 + timedelta(minutes=45), T0 + timedelta(minutes=45) + gap, 1),
    ]
    assert [r["id"] for r in rows(summary.output("late"))] == [3, 4]
    assert summary.late == 2


def test_record_one_gap_after_emitted_session_counts(tmp_path: Path) -> None:
    # 00:40 is exactly one gap after 00:10, so it starts a session of its
    # own, which 00:45 then joins.
    minutes = [("a", 0), ("a", 10), ("a", 45), ("a", 40)]

    summary = session_pipeline(minutes, tmp_path).run()

    gap = timedelta(minutes=30)
    assert sessions_of(summary.output("out")) == [
        ("a", T0, T0 + timedelta(minutes=10) + gap, 2),
        ("a", T0 + timedelta(minutes=40), T0 + timedelta(minutes=45) + gap, 2),
    ]
    assert summary.late == 0


def test_emitted_session_makes_only_its_key_late(tmp_path: Path) -> None:
    minutes = [("a", 0), ("a", 10), ("a", 45), ("b", 20)]

    summary = session_pipeline(minutes, tmp_path).run()

    gap = timedelta(minutes=30)
    assert ("b", T0 + timedelta(minutes=20), T0 + timedelta(minutes=20) + gap, 1) in (
        sessions_of(summary.output("out"))
    )
    assert summary.late == 0


def test_session_allowed_lateness_keeps_record(tmp_path: Path) -> None:
    # With 10 minutes of allowed lateness, the session of a from 00:00 is
    # emitted once the watermark reaches its end plus 10 minutes. At 00:45
    # it is still open, so a at 00:20 joins it and moves its end to 00:50. At
    # 01:00 it is emitted, so a at 00:40, before 00:50, is late.
    minutes = [("a", 0), ("a", 10), ("b", 45), ("a", 20), ("b", 60), ("a", 40)]

    summary = session_pipeline(minutes, tmp_path, allowed_lateness="10m").run()

    gap = timedelta(minutes=30)
    assert sessions_of(summary.output("out")) == [
        ("a", T0, T0 + timedelta(minutes=20) + gap, 3),
        ("b", T0 + timedelta(minutes=45), T0 + timedelta(minutes=60) + gap, 2),
    ]
    assert [r["id"] for r in rows(summary.output("late"))] == [5]


def test_global_session_late_after_emission(tmp_path: Path) -> None:
    records = [{"t": at(m), "id": i} for i, m in enumerate([0, 10, 45, 20])]

    summary = window_pipeline(
        records, tmp_path, late_reader=True, kind="session", gap="30m", size=None
    ).run()

    gap = timedelta(minutes=30)
    assert sorted(
        (r["window_start"], r["window_end"], r["n"])
        for r in rows(summary.output("out"))
    ) == [
        (T0, T0 + timedelta(minutes=10) + gap, 2),
        (T0 + timedelta(minutes=45), T0 + timedelta(minutes=45) + gap, 1),
    ]
    assert [r["id"] for r in rows(summary.output("late"))] == [3]


@pytest.mark.parametrize(
    ("window", "exact"),
    [
        ({"kind": "session", "gap": "10m", "size": None}, False),
        ({"kind": "tumbling", "size": "1h"}, False),
        ({"kind": "tumbling", "size": "1h"}, True),
        ({"kind": "sliding", "size": "1h", "slide": "30m"}, True),
    ],
)
@pytest.mark.parametrize("batch_rows", [1, 7])
def test_first_last_on_equal_times(
    window: dict[str, Any], exact: bool, batch_rows: int
) -> None:
    # Every record has the same event time and the keys interleave, so only
    # arrival order decides which record is first and last of each key.
    p = Pipeline("ties")
    src = p.source(
        "events",
        "generate",
        count=100,
        seed=1,
        batch_rows=batch_rows,
        fields={
            "v": "sequence",
            "k": {"type": "choice", "values": ["a", "b"]},
            "at": {"type": "constant", "value": "2024-05-01T10:00:00Z"},
        },
        event_time={"field": "at"},
    )
    fns = ["first", "last", "min", "max"]
    aggregations = {f"{fn}_v": {"fn": fn, "field": "v"} for fn in fns}
    if exact:
        # count_distinct makes the frame store keep records, not partial results.
        aggregations["distinct_v"] = {"fn": "count_distinct", "field": "v"}
    windows = p.transform(
        "w", "window", [src], key_by=["k"], aggregations=aggregations, **window
    )
    p.destination("out", "memory", [windows])
    p.destination("raw", "memory", [src])

    summary = p.run()

    raw = summary.output("raw").to_pandas()
    expected = raw.groupby("k")["v"].agg(fns).reset_index()
    assert expected["k"].tolist() == ["a", "b"]
    got = summary.output("out").to_pandas()
    assert len(got) == (2 if window["kind"] == "sliding" else 1) * 2
    for _, row in got.iterrows():
        want = expected[expected["k"] == row["k"]].iloc[0]
        for fn in fns:
            assert row[f"{fn}_v"] == want[fn], (row["k"], fn)


def nullable_records(count: int) -> list[dict[str, Any]]:
    """Records with null values, text and floats, in arrival order `seq`."""
    return [
        {
            "t": at(i * 4.1),
            "k": "abc"[i % 3] if i % 7 else None,
            "v": None if i % 5 == 0 else (i * 37) % 11 - 3,
            "s": None if i % 4 == 0 else "xyz"[i % 3] * (i % 2 + 1),
            "f": None if i % 6 == 0 else i / 8,
            "seq": i,
        }
        for i in range(count)
    ]


MERGEABLE = {
    "n": {"fn": "count"},
    "n_v": {"fn": "count", "field": "v"},
    "total": {"fn": "sum", "field": "v"},
    "low_s": {"fn": "min", "field": "s"},
    "high_s": {"fn": "max", "field": "s"},
    "avg": {"fn": "mean", "field": "v"},
    "sum_f": {"fn": "sum", "field": "f"},
    "first_v": {"fn": "first", "field": "v"},
    "last_s": {"fn": "last", "field": "s"},
}


@pytest.mark.parametrize("window", [{}, {"kind": "sliding", "slide": "20m"}])
def test_mergeable_aggregations_match_duckdb_and_record_path(
    tmp_path: Path, window: dict[str, Any]
) -> None:
    """Arrow's partial results equal DuckDB's and the Polars record path's.

    Adding `count_distinct` makes the window keep records and aggregate them
    with Polars; the other results and their types must not change.
    """
    records = nullable_records(300)
    mergeable = window_pipeline(
        records, tmp_path, key_by=["k"], aggregations=MERGEABLE, **window
    ).run()
    with_records = window_pipeline(
        records,
        tmp_path,
        key_by=["k"],
        aggregations=MERGEABLE | {"kinds": {"fn": "count_distinct", "field": "v"}},
        **window,
    ).run()

    out = mergeable.output("out")
    both = with_records.output("out")
    assert both.drop_columns(["kinds"]).equals(out)
    types = {name: str(out.schema.field(name).type) for name in MERGEABLE}
    assert types == {
        "n": "int64",
        "n_v": "int64",
        "total": "int64",
        "low_s": "string",
        "high_s": "string",
        "avg": "double",
        "sum_f": "double",
        "first_v": "int64",
        "last_s": "string",
    }
    assert out.schema.field("k").type == pa.string()

    slide = 20 if window else 60
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("events", pa.Table.from_pylist(records))
    # Each record belongs to the windows that start at most 1 hour before it.
    expected = con.execute(
        f"""
        with starts as (
            select *, time_bucket(interval {slide} minute, t::timestamptz)
                - interval (o * {slide}) minute as ws
            from events, range(0, {60 // slide}) r(o)
        )
        select ws, k, count(*), count(v), sum(v), min(s), max(s), avg(v), sum(f),
            max(seq), min(seq)
        from starts group by ws, k order by ws, k nulls first
        """
    ).fetchall()
    by_seq = {r["seq"]: r for r in records}
    actual = rows(out)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert (got["window_start"], got["k"]) == (want[0], want[1])
        assert [got[n] for n in ("n", "n_v", "total", "low_s", "high_s")] == list(
            want[2:7]
        )
        for name, value in (("avg", want[7]), ("sum_f", want[8])):
            assert got[name] == (None if value is None else pytest.approx(value))
        # `first` and `last` are the values of the window's first and last
        # record, null or not.
        assert got["first_v"] == by_seq[want[10]]["v"]
        assert got["last_s"] == by_seq[want[9]]["s"]


@pytest.mark.parametrize(
    ("fn", "field", "result"),
    [
        ("sum", pa.int32(), pa.int64()),
        ("sum", pa.uint8(), pa.uint64()),
        ("sum", pa.bool_(), pa.int64()),
        ("sum", pa.float32(), pa.float64()),
        ("mean", pa.int8(), pa.float64()),
        ("percentile", pa.int32(), pa.float64()),
        ("count_distinct", pa.string(), pa.int64()),
        ("min", pa.string(), pa.string()),
        ("last", pa.timestamp("ms", tz="UTC"), pa.timestamp("ms", tz="UTC")),
        # Left to Polars, and aggregated from records:
        ("sum", pa.decimal128(10, 2), None),
        ("mean", pa.timestamp("us"), None),
        ("max", pa.list_(pa.int64()), None),
    ],
)
def test_result_types(fn: str, field: pa.DataType, result: pa.DataType | None) -> None:
    from dataflare.transforms.window import Aggregation

    aggregation = Aggregation(fn=fn, field="x", q=0.5)  # type: ignore[arg-type]

    assert aggregation.result_type(field) == result


def test_decimal_sum_keeps_records_and_polars_type(tmp_path: Path) -> None:
    records = [{"t": at(m), "d": Decimal(f"{m}.25")} for m in (1, 2, 70)]

    summary = window_pipeline(
        records, tmp_path, aggregations={"s": {"fn": "sum", "field": "d"}}
    ).run()

    out = summary.output("out")
    assert out.column("s").to_pylist() == [Decimal("3.50"), Decimal("70.25")]
    assert pa.types.is_decimal(out.schema.field("s").type)


@pytest.mark.parametrize(
    "values", [[2**53 + 1], [2**63 - 1, 2**63 - 1], [-(2**63), -(2**63), 4]]
)
def test_mean_of_large_integers(tmp_path: Path, values: list[int]) -> None:
    """Means past 2^53 and sums past int64 come out as the float mean."""
    records = [{"t": at(0), "v": v} for v in values]

    summary = window_pipeline(
        records, tmp_path, aggregations={"m": {"fn": "mean", "field": "v"}}
    ).run()

    (mean,) = summary.output("out").column("m").to_pylist()
    assert mean == pytest.approx(sum(values) / len(values), rel=1e-12)


def test_window_mean_of_text_field_is_invalid() -> None:
    p = Pipeline("text-mean")
    rows = p.source(
        "rows",
        "memory",
        records=[{"name": "a", "t": "2024-01-01T00:00:00Z"}],
        event_time={"field": "t"},
    )
    win = p.transform(
        "win",
        "window",
        [rows],
        size="1h",
        aggregations={"n": {"fn": "mean", "field": "name"}},
    )
    p.destination("out", "memory", [win])

    with pytest.raises(PipelineValidationError) as raised:
        p.build()

    [issue] = raised.value.issues
    assert issue.path == (
        "transformations",
        "win",
        "config",
        "aggregations",
        "n",
        "field",
    )
    assert "aggregation 'n': mean does not apply to field 'name' of type string" in (
        issue.message
    )

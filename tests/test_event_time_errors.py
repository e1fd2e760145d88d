"""Records whose event time does not parse go to the dead-letter file, even
when no value in their batch parses."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataflare import Pipeline

# The smallest block size of the JSON lines source. Lines longer than half of
# it put at most one whole line in each block, so bad lines get batches alone.
BLOCK_SIZE = 4096
PAD = "x" * 3000


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def run(
    path: Path,
    tmp_path: Path,
    *,
    event_time: dict[str, Any] | None = None,
    metadata: bool = False,
    **source: Any,
) -> tuple[list[Any], list[Any]]:
    p = Pipeline("times")
    src = p.source(
        "src",
        "jsonl",
        path=str(path),
        schema={"k": "string", "at": "string", "pad": "string"},
        event_time=event_time or {"field": "at"},
        **source,
    )
    out = tmp_path / "out.jsonl"
    dead = tmp_path / "dead.jsonl"
    p.destination("out", "jsonl", [src], path=str(out), include_metadata=metadata)
    p.errors(dead_letter={"path": str(dead)})
    p.run()
    written = [json.loads(line) for line in out.read_text().splitlines()]
    rejected = (
        [json.loads(line) for line in dead.read_text().splitlines()]
        if dead.exists()
        else []
    )
    return written, rejected


def reason(value: str) -> str:
    return (
        f"invalid event time: field 'at' value {value!r} "
        "does not match format 'ISO 8601'"
    )


def test_batch_with_no_parseable_time(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_lines(path, [{"k": "a", "at": "garbage", "pad": ""}])
    written, rejected = run(path, tmp_path)
    assert written == []
    assert [(r["step"], r["position"], r["reason"], r["record"]) for r in rejected] == [
        (
            "src",
            f"{path} line 1",
            reason("garbage"),
            {"k": "a", "at": "garbage", "pad": ""},
        )
    ]


def test_bad_lines_alone_in_their_batches(tmp_path: Path) -> None:
    times = [
        ("a", "2024-03-01T10:00:00+00:00"),
        ("b", "garbage"),
        ("c", "2024-03-01T11:00:00+00:00"),
        ("d", "not a time"),
        ("e", "also bad"),
        ("f", "2024-03-01T12:30:00+00:00"),
        ("g", "13:00 yesterday"),
    ]
    path = tmp_path / "in.jsonl"
    write_lines(path, [{"k": k, "at": at, "pad": PAD} for k, at in times])
    written, rejected = run(path, tmp_path, block_size=BLOCK_SIZE)
    assert [(r["k"], r["at"]) for r in written] == [
        ("a", "2024-03-01T10:00:00+00:00"),
        ("c", "2024-03-01T11:00:00+00:00"),
        ("f", "2024-03-01T12:30:00+00:00"),
    ]
    assert [(r["position"], r["reason"], r["record"]["k"]) for r in rejected] == [
        (f"{path} line 2", reason("garbage"), "b"),
        (f"{path} line 4", reason("not a time"), "d"),
        (f"{path} line 5", reason("also bad"), "e"),
        (f"{path} line 7", reason("13:00 yesterday"), "g"),
    ]


def test_bad_and_good_times_in_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    records: list[dict[str, Any]] = [
        {"k": "a", "at": "garbage", "pad": ""},
        {"k": "b", "at": "2024-03-01T10:00:00Z", "pad": ""},
        {"k": "c", "at": None, "pad": ""},
    ]
    write_lines(path, records)
    written, rejected = run(path, tmp_path)
    assert [r["k"] for r in written] == ["b"]
    assert [(r["position"], r["reason"]) for r in rejected] == [
        (f"{path} line 1", reason("garbage")),
        (
            f"{path} line 3",
            "missing event time: field 'at' is empty or absent",
        ),
    ]


def test_timestamp_field_without_value_is_rejected(tmp_path: Path) -> None:
    """A field read as a timestamp is cast, not parsed; a missing value is named."""
    path = tmp_path / "in.jsonl"
    write_lines(
        path,
        [
            {"k": "a", "at": "2024-03-01T10:00:00+02:00"},
            {"k": "b", "at": None},
            {"k": "c"},
            {"k": "d", "at": "2024-03-01T09:00:00.5Z"},
        ],
    )
    p = Pipeline("times")
    src = p.source(
        "src",
        "jsonl",
        path=str(path),
        schema={"k": "string", "at": "timestamp"},
        event_time={"field": "at"},
    )
    hourly = p.transform(
        "hourly",
        "window",
        [src],
        size="1h",
        aggregations={"k": {"fn": "first", "field": "k"}},
    )
    p.destination("out", "memory", [hourly])
    dead = tmp_path / "dead.jsonl"
    p.errors(dead_letter={"path": str(dead)})

    summary = p.run()

    out = summary.output("out").to_pylist()
    assert [(r["k"], r["window_start"].isoformat()) for r in out] == [
        ("a", "2024-03-01T08:00:00+00:00"),
        ("d", "2024-03-01T09:00:00+00:00"),
    ]
    rejected = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [(r["record"]["k"], r["reason"]) for r in rejected] == [
        (k, "missing event time: field 'at' is empty or absent") for k in "bc"
    ]


def test_iso_mixed_forms_one_batch(tmp_path: Path) -> None:
    """Each value parses, whatever form the first value of its batch has."""
    path = tmp_path / "in.jsonl"
    times = [
        "2024-05-01T10:00:00",
        "2024-05-01T10:00:00Z",
        "2024-05-01T12:00:00+02:00",
        "2024-05-01T10:00:00.123456Z",
        "garbage",
    ]
    write_lines(path, [{"k": str(i), "at": t, "pad": ""} for i, t in enumerate(times)])

    written, rejected = run(path, tmp_path)

    assert [row["k"] for row in written] == ["0", "1", "2", "3"]
    assert [r["reason"] for r in rejected] == [reason("garbage")]


def test_parse_iso_mixed_zones() -> None:
    import polars as pl

    from dataflare.streaming.time import _parse_iso

    texts = ["2024-05-01T10:00:00", "2024-05-01T10:00:00Z", "2024-05-01T12:00+02:00"]

    parsed = _parse_iso(pl.Series("at", texts), "Europe/Paris")

    assert [t.isoformat() for t in parsed.to_list()] == [
        "2024-05-01T08:00:00+00:00",  # no zone: Europe/Paris, UTC+2 in May
        "2024-05-01T10:00:00+00:00",
        "2024-05-01T10:00:00+00:00",
    ]


def test_timestamp_beyond_microseconds_rejected(tmp_path: Path) -> None:
    """A seconds timestamp too far for microseconds is dead-lettered, not fatal."""
    import pyarrow as pa
    import pyarrow.feather as feather

    path = tmp_path / "in.arrow"
    seconds = pa.array([3600, 10**16, None, 7200], pa.timestamp("s", tz="UTC"))
    feather.write_feather(pa.table({"k": ["a", "b", "c", "d"], "at": seconds}), path)
    p = Pipeline("times")
    src = p.source("src", "arrow", path=str(path), event_time={"field": "at"})
    hourly = p.transform(
        "hourly", "window", [src], size="1h", aggregations={"n": {"fn": "count"}}
    )
    p.destination("out", "memory", [hourly])
    dead = tmp_path / "dead.jsonl"
    p.errors(dead_letter={"path": str(dead)})

    summary = p.run()

    out = summary.output("out").to_pylist()
    assert [(r["window_start"].hour, r["n"]) for r in out] == [(1, 1), (2, 1)]
    rejected = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [(r["record"]["k"], r["reason"]) for r in rejected] == [
        (
            "b",
            "invalid event time: field 'at' is beyond the range of timestamps in "
            "microseconds (about 292,000 years either side of 1970)",
        ),
        ("c", "missing event time: field 'at' is empty or absent"),
    ]
    # Python has no datetime that far out: the record keeps the seconds.
    assert rejected[0]["record"]["at"] == 10**16


@pytest.mark.parametrize("fmt", [None, "%Y-%m-%d %H:%M:%S"])
def test_local_times_at_clock_changes(tmp_path: Path, fmt: str | None) -> None:
    """A skipped local time is rejected; a repeated one is the earlier."""
    zone = ZoneInfo("Europe/Paris")
    times = [
        ("a", "2024-03-31 01:30:00"),
        ("gap", "2024-03-31 02:30:00"),  # clocks go from 02:00 to 03:00
        ("b", "2024-03-31 03:30:00"),
        ("twice", "2024-10-27 02:30:00"),  # clocks go from 03:00 back to 02:00
        ("bad", "garbage"),
        ("c", "2024-10-27 03:30:00"),
    ]
    path = tmp_path / "in.jsonl"
    write_lines(path, [{"k": k, "at": at, "pad": ""} for k, at in times])
    event_time: dict[str, Any] = {"field": "at", "timezone": "Europe/Paris"}
    if fmt is not None:
        event_time["format"] = fmt

    written, rejected = run(path, tmp_path, event_time=event_time, metadata=True)

    def utc(text: str) -> str:
        local = dt.datetime.fromisoformat(text).replace(tzinfo=zone, fold=0)
        return local.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")

    assert [(r["k"], r["_event_time"]) for r in written] == [
        (k, utc(at)) for k, at in times if k not in ("gap", "bad")
    ]
    assert [r["record"]["k"] for r in rejected] == ["gap", "bad"]
    assert "does not exist in time zone 'Europe/Paris'" in rejected[0]["reason"]
    assert "does not match format" in rejected[1]["reason"]


def test_python_api_sets_replay(tmp_path: Path) -> None:
    times = ["2024-03-01T10:00:02Z", "2024-03-01T10:00:00Z", "2024-03-01T10:00:01Z"]
    path = tmp_path / "in.jsonl"
    write_lines(
        path, [{"k": str(i), "at": at, "pad": ""} for i, at in enumerate(times)]
    )

    written, rejected = run(path, tmp_path, replay={"sort_by_event_time": True})

    assert [r["at"] for r in written] == sorted(times)
    assert rejected == []


def test_skipped_local_time_named_for_expression_and_parquet(tmp_path: Path) -> None:
    naive = [
        dt.datetime(2024, 3, 31, 1, 29),
        dt.datetime(2024, 3, 31, 2, 29),  # clocks skip 02:00-03:00 that day
        dt.datetime(2024, 3, 31, 3, 29),
    ]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"k": ["a", "gap", "b"], "at": naive}), path)
    dead = tmp_path / "dead.jsonl"
    reasons = []
    for event_time in (
        {"expression": "at + INTERVAL '1 minute'", "timezone": "Europe/Paris"},
        {"field": "at", "timezone": "Europe/Paris"},
    ):
        dead.unlink(missing_ok=True)
        p = Pipeline("skipped")
        src = p.source("src", "parquet", path=str(path), event_time=event_time)
        p.destination("out", "memory", [src])
        p.errors(dead_letter={"path": str(dead)})

        summary = p.run()

        assert summary.output("out").column("k").to_pylist() == ["a", "b"]
        [line] = dead.read_text().splitlines()
        reasons.append(json.loads(line)["reason"])

    skipped = (
        "does not exist in time zone 'Europe/Paris', whose clocks skip it "
        "(a daylight saving time change); correct the time or give its offset"
    )
    assert reasons[0] == (
        "invalid event time: expression \"at + INTERVAL '1 minute'\" gave "
        f"'2024-03-31 02:30:00', which {skipped}"
    )
    assert reasons[1] == (
        f"invalid event time: field 'at' value '2024-03-31 02:29:00' {skipped}"
    )

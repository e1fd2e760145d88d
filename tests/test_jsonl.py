"""JSON Lines source and sink: parsing, bad lines, following, writing."""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.json as pajson
import pytest
from conftest import RecordingContext
from pydantic import ValidationError

import dataflare.connectors.files.jsonl as jsonl_module
from dataflare import Pipeline
from dataflare.connectors.files.jsonl import (
    JsonLinesParser,
    JsonLinesSink,
    JsonLinesSinkConfig,
    JsonLinesSource,
    JsonLinesSourceConfig,
    encode_json_lines,
    timestamps_as_text,
)
from dataflare.plugin.interface import Idle, SourceBatch
from dataflare.streaming.runner import PipelineRun

UTC = dt.UTC


def make_source(
    context: RecordingContext, path: Path | str, **config: Any
) -> JsonLinesSource:
    return JsonLinesSource(
        JsonLinesSourceConfig.model_validate({"path": str(path), **config}), context
    )


def read_all(source: JsonLinesSource) -> tuple[pa.Table, list[SourceBatch]]:
    source.open()
    batches = [item for item in source.read() if isinstance(item, SourceBatch)]
    table = pa.Table.from_batches([b.batch for b in batches], schema=source.schema())
    return table, batches


def positions(batches: list[SourceBatch]) -> list[str]:
    return [
        b.origin.position(row)
        for b in batches
        if b.origin is not None
        for row in range(b.batch.num_rows)
    ]


def write_lines(path: Path, rows: list[Any]) -> None:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))


# --- reading good input --------------------------------------------------------


def test_values_match_pandas(tmp_path: Path, context: RecordingContext) -> None:
    rows = [
        {"id": i, "name": f"user {i}", "score": i / 7, "ok": i % 3 == 0}
        for i in range(2000)
    ]
    path = tmp_path / "users.jsonl"
    write_lines(path, rows)
    source = make_source(context, path, block_size=4096)

    table, batches = read_all(source)

    expected = pd.read_json(path, lines=True)
    assert table.num_rows == 2000
    assert len(batches) > 1  # 4 KiB blocks split the file
    assert table.column("id").to_pylist() == expected["id"].tolist()
    assert table.column("name").to_pylist() == expected["name"].tolist()
    assert table.column("score").to_pylist() == pytest.approx(
        expected["score"].tolist()
    )
    assert table.column("ok").to_pylist() == expected["ok"].tolist()
    assert context.rejected == []


def test_inferred_types(tmp_path: Path, context: RecordingContext) -> None:
    path = tmp_path / "types.jsonl"
    write_lines(
        path,
        [
            {
                "i": 1,
                "f": 1,
                "s": "a",
                "b": True,
                "t": "2024-01-01T10:00:00Z",
                "d": "2024-01-02",
                "n": None,
                "o": {"x": 1},
                "l": [1, 2],
            },
            {
                "i": 2,
                "f": 2.5,
                "s": "b",
                "b": False,
                "t": "2024-01-01 12:00:00+02:00",
                "d": "2024-01-03",
                "n": None,
                "o": {"x": 2},
                "l": [],
            },
        ],
    )

    schema = make_source(context, path).schema()

    assert schema.field("i").type == pa.int64()
    assert schema.field("f").type == pa.float64()
    assert schema.field("s").type == pa.string()
    assert schema.field("b").type == pa.bool_()
    assert schema.field("t").type == pa.timestamp("us", tz="UTC")
    assert schema.field("d").type == pa.date32()
    assert schema.field("n").type == pa.string()
    assert schema.field("o").type == pa.struct([("x", pa.int64())])
    assert schema.field("l").type == pa.list_(pa.int64())


def test_timestamps_converted_to_utc(tmp_path: Path, context: RecordingContext) -> None:
    path = tmp_path / "times.jsonl"
    write_lines(
        path,
        [
            {"t": "2024-01-01T10:00:00Z"},
            {"t": "2024-01-01T10:00:00+02:00"},
            {"t": "2024-01-01 10:00:00"},
            {"t": "2024-01-01T10:00:00.123456789Z"},
        ],
    )
    source = make_source(context, path, schema={"t": "timestamp"})

    table, _ = read_all(source)

    assert table.column("t").to_pylist() == [
        dt.datetime(2024, 1, 1, 10, tzinfo=UTC),
        dt.datetime(2024, 1, 1, 8, tzinfo=UTC),
        dt.datetime(2024, 1, 1, 10, tzinfo=UTC),
        dt.datetime(2024, 1, 1, 10, 0, 0, 123456, tzinfo=UTC),
    ]
    assert context.rejected == []


def test_declared_schema_ignores_other_fields(
    tmp_path: Path, context: RecordingContext
) -> None:
    path = tmp_path / "extra.jsonl"
    write_lines(path, [{"id": 1, "extra": "x"}, {"extra": "y"}])
    source = make_source(context, path, schema={"id": "int", "name": "string"})

    table, _ = read_all(source)

    assert table.schema.names == ["id", "name"]
    assert table.to_pylist() == [{"id": 1, "name": None}, {"id": None, "name": None}]


def test_directory_and_glob(tmp_path: Path, context: RecordingContext) -> None:
    write_lines(tmp_path / "b.ndjson", [{"id": 2}])
    write_lines(tmp_path / "a.jsonl", [{"id": 1}])
    write_lines(tmp_path / "c.json", [{"id": 3}])
    write_lines(tmp_path / "notes.txt", [{"id": 99}])

    by_directory, _ = read_all(make_source(context, tmp_path))
    by_glob, _ = read_all(make_source(RecordingContext(), tmp_path / "*.jsonl"))

    assert by_directory.column("id").to_pylist() == [1, 2, 3]
    assert by_glob.column("id").to_pylist() == [1]


def test_missing_path_error(tmp_path: Path, context: RecordingContext) -> None:
    source = make_source(context, tmp_path / "nothing-*.jsonl")

    with pytest.raises(ValueError, match="no input files match path"):
        source.schema()


# --- awkward and bad input --------------------------------------------------------


def test_bom_crlf_blank_lines_no_final_newline(
    tmp_path: Path, context: RecordingContext
) -> None:
    path = tmp_path / "windows.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": 1, "name": "a"}\r\n'
        b"\r\n"
        b'{"id": 2, "name": "b"}\r\n'
        b"   \t \r\n"
        b'{"id": 3, "name": "c"}'
    )
    source = make_source(context, path)

    table, batches = read_all(source)

    assert table.to_pylist() == [
        {"id": 1, "name": "a"},
        {"id": 2, "name": "b"},
        {"id": 3, "name": "c"},
    ]
    assert positions(batches) == [f"{path} line 1", f"{path} line 3", f"{path} line 5"]
    assert context.rejected == []
    assert source.progress().done == path.stat().st_size


def test_bad_lines_rejected_with_line_numbers(
    tmp_path: Path, context: RecordingContext
) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"id": 1, "at": "2024-01-01T00:00:00Z"}\n'  # 1
        b"\n"  # 2: blank, counted
        b"this is not json\n"  # 3
        b'{"id": "seven", "at": "2024-01-01T00:00:00Z"}\n'  # 4
        b'{"id": 5, "at": "yesterday"}\n'  # 5
        b"[1, 2]\n"  # 6
        b'{"id": 7} {"id": 8}\n'  # 7: two objects on one line
        b'{"id": 9, "at": "2024-01-02T00:00:00+01:00"}\n'  # 8
        b'{"id": 9.5}\n'  # 9
        b'{"id": "10"}\n'  # 10: a number written as a string converts
    )
    source = make_source(context, path, schema={"id": "int", "at": "timestamp"})

    table, batches = read_all(source)

    assert table.column("id").to_pylist() == [1, 9, 10]
    assert table.column("at").to_pylist() == [
        dt.datetime(2024, 1, 1, tzinfo=UTC),
        dt.datetime(2024, 1, 1, 23, tzinfo=UTC),
        None,
    ]
    assert positions(batches) == [f"{path} line {n}" for n in (1, 8, 10)]
    rejected = {
        position: (record, reason) for record, reason, position in context.rejected
    }
    assert sorted(rejected) == sorted(f"{path} line {n}" for n in (3, 4, 5, 6, 7, 9))
    record, reason = rejected[f"{path} line 3"]
    assert record == "this is not json"
    assert reason.startswith("invalid JSON at column 1")
    record, reason = rejected[f"{path} line 4"]
    assert record == {"id": "seven", "at": "2024-01-01T00:00:00Z"}
    assert reason == "field 'id': value \"seven\" is not a valid integer"
    assert rejected[f"{path} line 5"][1] == (
        "field 'at': value \"yesterday\" is not a valid timestamp "
        "(ISO 8601, e.g. 2013-01-01T05:00:00Z)"
    )
    assert rejected[f"{path} line 6"][1] == "expected a JSON object, found an array"
    assert rejected[f"{path} line 7"][1].startswith("invalid JSON at column 11")
    assert (
        rejected[f"{path} line 9"][1] == "field 'id': value 9.5 is not a valid integer"
    )


def test_bad_line_in_large_block(tmp_path: Path, context: RecordingContext) -> None:
    rows: list[Any] = [{"id": i, "v": i * 0.5} for i in range(1, 5001)]
    rows[2499] = {"id": "bad", "v": 1.0}  # line 2500
    rows[3999] = {"id": 4000, "v": "NaN?"}  # line 4000
    path = tmp_path / "big.jsonl"
    write_lines(path, rows)
    source = make_source(context, path, schema={"id": "int", "v": "float"})

    table, batches = read_all(source)

    expected = [i for i in range(1, 5001) if i not in (2500, 4000)]
    assert table.column("id").to_pylist() == expected
    assert positions(batches) == [f"{path} line {i}" for i in expected]
    assert [(r[1], r[2]) for r in context.rejected] == [
        ("field 'id': value \"bad\" is not a valid integer", f"{path} line 2500"),
        ("field 'v': value \"NaN?\" is not a valid number", f"{path} line 4000"),
    ]


def test_empty_inputs(tmp_path: Path, context: RecordingContext) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\r\n  \n")
    source = make_source(context, tmp_path, schema={"id": "int"})

    table, _ = read_all(source)

    assert table.num_rows == 0
    assert context.rejected == []


def test_empty_file_needs_schema(tmp_path: Path, context: RecordingContext) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")

    with pytest.raises(ValueError, match=r"cannot infer field types.*set `schema`"):
        make_source(context, tmp_path / "empty.jsonl").schema()


def test_unknown_config_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="block_bytes"):
        JsonLinesSourceConfig.model_validate({"path": "x.jsonl", "block_bytes": 10})


def test_dead_letter_file_in_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": \n{"id": 3}\n')
    dead_letter = tmp_path / "dl.jsonl"
    p = Pipeline("jsonl-dead-letter")
    events = p.source("events", "jsonl", path=str(path), schema={"id": "int"})
    p.destination("out", "memory", [events])
    p.errors(policy="dead_letter", dead_letter={"path": str(dead_letter)})

    summary = p.run()

    assert summary.output("out").column("id").to_pylist() == [1, 3]
    entries = [orjson.loads(line) for line in dead_letter.read_bytes().splitlines()]
    assert len(entries) == 1
    assert entries[0]["step"] == "events"
    assert entries[0]["position"] == f"{path} line 2"
    assert entries[0]["record"] == '{"id":'
    assert entries[0]["reason"].startswith("invalid JSON")


# --- following growing files ------------------------------------------------------


def next_batch(items: Any) -> SourceBatch | None:
    """Return the next batch, or None when the source reports idle first."""
    item = next(items)
    return item if isinstance(item, SourceBatch) else None


def test_follow_reads_appends_and_new_files(
    tmp_path: Path, context: RecordingContext
) -> None:
    first = tmp_path / "a.jsonl"
    write_lines(first, [{"id": 1}, {"id": 2}])
    source = make_source(
        context, tmp_path, follow=True, poll_interval="1ms", schema={"id": "int"}
    )
    source.open()
    items = source.read()

    batch = next_batch(items)
    assert batch is not None
    assert batch.batch.column("id").to_pylist() == [1, 2]
    assert isinstance(next(items), Idle)

    with first.open("ab") as f:
        f.write(b'{"id": 3')  # a partial line waits for its newline
    assert isinstance(next(items), Idle)
    with first.open("ab") as f:
        f.write(b'}\n\n{"id": 4}\n')
    batch = next_batch(items)
    assert batch is not None
    assert batch.batch.column("id").to_pylist() == [3, 4]
    assert [batch.origin.position(i) for i in range(2)] == [
        f"{first} line 3",
        f"{first} line 5",
    ]

    write_lines(tmp_path / "b.jsonl", [{"id": 5}])
    batch = next_batch(items)
    assert batch is not None
    assert batch.batch.column("id").to_pylist() == [5]
    assert batch.origin.position(0) == f"{tmp_path / 'b.jsonl'} line 1"

    context.stopping = True
    assert list(items) in ([], [Idle()])


def test_follow_restarts_rotated_and_truncated_files(
    tmp_path: Path, context: RecordingContext
) -> None:
    path = tmp_path / "app.jsonl"
    write_lines(path, [{"id": 1}, {"id": 2}])
    source = make_source(
        context, path, follow=True, poll_interval="1ms", schema={"id": "int"}
    )
    source.open()
    items = source.read()
    batch = next_batch(items)
    assert batch is not None
    assert batch.batch.column("id").to_pylist() == [1, 2]

    path.rename(tmp_path / "app.jsonl.1")  # rotated: a new file takes the name
    write_lines(path, [{"id": 10}, {"id": 11}, {"id": 12}])
    batch = next_batch(items)
    assert batch is not None
    assert batch.batch.column("id").to_pylist() == [10, 11, 12]
    assert batch.origin.position(0) == f"{path} line 1"

    write_lines(path, [{"id": 20}])  # truncated in place, then written
    batch = next_batch(items)
    assert batch is not None
    assert batch.batch.column("id").to_pylist() == [20]
    assert batch.origin.position(0) == f"{path} line 1"


def test_follow_pipeline_with_writer_thread(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    path.write_bytes(b"")
    p = Pipeline("jsonl-follow")
    live = p.source(
        "live",
        "jsonl",
        path=str(path),
        follow=True,
        poll_interval="5ms",
        schema={"id": "int", "text": "string"},
    )
    p.destination("out", "memory", [live])
    p.errors(policy="dead_letter", dead_letter={"path": str(tmp_path / "dl.jsonl")})
    run = PipelineRun(p.build())
    summaries = []
    runner = threading.Thread(target=lambda: summaries.append(run.run()))
    runner.start()

    def append() -> None:
        for i in range(1, 51):
            with path.open("ab") as f:
                line = orjson.dumps({"id": i, "text": f"line {i}"}) + b"\n"
                f.write(line if i != 25 else b"oops\n")

    writer = threading.Thread(target=append)
    writer.start()
    writer.join()
    deadline = time.monotonic() + 20
    while run.snapshot().records_written < 49 and time.monotonic() < deadline:
        time.sleep(0.01)
    run.stop()
    runner.join(timeout=20)

    assert not runner.is_alive()
    summary = summaries[0]
    assert summary.status == "stopped"
    ids = summary.output("out").column("id").to_pylist()
    assert ids == [i for i in range(1, 51) if i != 25]
    assert summary.rejected == 1
    dead = orjson.loads((tmp_path / "dl.jsonl").read_bytes().splitlines()[0])
    assert dead["position"] == f"{path} line 25"


# --- the sink ---------------------------------------------------------------------


def sample_table() -> pa.Table:
    return pa.table(
        {
            "id": pa.array([1, 2, None], pa.int64()),
            "name": ["a", 'quote " and é', None],
            "at": pa.array(
                [
                    dt.datetime(2024, 1, 1, 10, 0, 0, 250000, tzinfo=UTC),
                    None,
                    dt.datetime(2024, 6, 30, 23, 59, 59, tzinfo=UTC),
                ],
                pa.timestamp("us", tz="UTC"),
            ),
            "day": [dt.date(2024, 1, 1), None, dt.date(2024, 2, 29)],
            "score": [1.5, float("nan"), -0.25],
        }
    )


def test_sink_writes_iso_timestamps(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    p = Pipeline("jsonl-sink")
    rows = p.source("rows", "memory", records=sample_table())
    p.destination("file", "jsonl", [rows], path=str(out))

    p.run()

    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert lines == [
        {
            "id": 1,
            "name": "a",
            "at": "2024-01-01T10:00:00.250000Z",
            "day": "2024-01-01",
            "score": 1.5,
        },
        {"id": 2, "name": 'quote " and é', "at": None, "day": None, "score": None},
        {
            "id": None,
            "name": None,
            "at": "2024-06-30T23:59:59.000000Z",
            "day": "2024-02-29",
            "score": -0.25,
        },
    ]
    # Arrow's own JSON reader parses the output with the same values.
    read_back = pajson.read_json(out)
    assert read_back.column("name").to_pylist() == ["a", 'quote " and é', None]


def test_sink_then_source_round_trip(tmp_path: Path) -> None:
    table = sample_table().drop_columns(["score"])
    out = tmp_path / "out.jsonl"
    sink = JsonLinesSink(JsonLinesSinkConfig(path=str(out)), RecordingContext())
    sink.open()
    for batch in table.to_batches(max_chunksize=2):
        sink.write(batch)
    sink.flush()
    sink.close()

    source = make_source(
        RecordingContext(),
        out,
        schema={"id": "int", "name": "string", "at": "timestamp", "day": "date"},
    )
    read_back, _ = read_all(source)

    assert read_back.equals(table.cast(read_back.schema))


def test_sink_binary_and_decimal_values(tmp_path: Path) -> None:
    import decimal

    out = tmp_path / "other.jsonl"
    sink = JsonLinesSink(JsonLinesSinkConfig(path=str(out)), RecordingContext())
    sink.open()
    sink.write(
        pa.record_batch(
            {
                "raw": pa.array([b"\x00\xff"]),
                "price": pa.array([decimal.Decimal("12.50")], pa.decimal128(6, 2)),
                "wait": pa.array([dt.timedelta(seconds=90)]),
            }
        )
    )
    sink.flush()

    assert orjson.loads(out.read_bytes()) == {
        "raw": "AP8=",
        "price": "12.50",
        "wait": 90.0,
    }


def test_sink_rolls_files(tmp_path: Path) -> None:
    table = pa.table({"id": list(range(1000)), "text": ["x" * 50] * 1000})
    out = tmp_path / "parts"
    p = Pipeline("jsonl-roll")
    rows = p.source("rows", "memory", records=table, batch_rows=100)
    p.destination("file", "jsonl", [rows], path=str(out), roll_bytes=10_000)
    p.execution(max_batch_rows=100)  # several writes, so the sink can roll

    summary = p.run()

    parts = sorted(out.glob("part-*.jsonl"))
    assert len(parts) > 1
    assert summary.outputs["file"] == [str(part) for part in parts]
    ids = [
        orjson.loads(line)["id"]
        for part in parts
        for line in part.read_bytes().splitlines()
    ]
    assert ids == list(range(1000))
    assert not list(out.glob("*.inprogress"))


# --- blocks parsed on several threads ------------------------------------------


def mixed_lines(count: int) -> tuple[bytes, set[int], set[int]]:
    """Return JSON lines with some blank and bad ones, and those line numbers."""
    lines: list[bytes] = []
    blank: set[int] = set()
    bad: set[int] = set()
    for i in range(1, count + 1):
        if i % 997 == 0:
            lines.append(b"  ")
            blank.add(i)
        elif i % 1499 == 0:
            lines.append(b'{"id": "x%d"}' % i)
            bad.add(i)
        else:
            row = {
                "id": i,
                "name": f"n{i}",
                "score": i / 8,
                "at": f"2024-01-01T00:00:{i % 60:02d}Z",
            }
            lines.append(orjson.dumps(row))
    ends = [b"\r\n" if i % 5 == 0 else b"\n" for i in range(count)]
    return (
        b"".join(line + end for line, end in zip(lines, ends, strict=True)),
        blank,
        bad,
    )


SCHEMA = {"id": "int", "name": "string", "score": "float", "at": "timestamp"}


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_same_records_and_positions(
    tmp_path: Path, context: RecordingContext, threads: int
) -> None:
    data, blank, bad = mixed_lines(6000)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(data)
    source = make_source(
        context, path, schema=SCHEMA, block_size=4096, parse_threads=threads
    )

    table, batches = read_all(source)
    source.close()

    good = [i for i in range(1, 6001) if i not in blank and i not in bad]
    expected = pl.read_ndjson(
        b"\n".join(
            line for i, line in enumerate(data.splitlines(), 1) if i in set(good)
        ),
        schema={
            "id": pl.Int64,
            "name": pl.String,
            "score": pl.Float64,
            "at": pl.String,
        },
    )
    assert len(batches) > 100  # 4 KiB blocks split the file
    assert table.column("id").to_pylist() == expected["id"].to_list()
    assert table.column("name").to_pylist() == expected["name"].to_list()
    assert table.column("score").to_pylist() == expected["score"].to_list()
    assert [t.isoformat() for t in table.column("at").to_pylist()] == [
        dt.datetime.fromisoformat(t).isoformat() for t in expected["at"].to_list()
    ]
    assert positions(batches) == [f"{path} line {i}" for i in good]
    assert [r[2] for r in context.rejected] == [f"{path} line {i}" for i in sorted(bad)]
    assert source.progress().done == len(data)


def test_checkpoint_offset_with_threads(tmp_path: Path) -> None:
    rows = [{"id": i, "name": "x" * (i % 50)} for i in range(5000)]
    path = tmp_path / "a.jsonl"
    write_lines(path, rows)
    data = path.read_bytes()
    source = make_source(
        RecordingContext(),
        path,
        schema={"id": "int", "name": "string"},
        block_size=4096,
        parse_threads=2,
    )
    source.open()
    items = source.read()
    seen = []
    for _ in range(7):
        item = next(items)
        assert isinstance(item, SourceBatch)
        seen += item.batch.column("id").to_pylist()
    position = source.snapshot_position()
    items.close()
    source.close()

    # The offset is just after the last line handed on, counted independently.
    offset = position["files"][str(path)]["offset"]
    assert offset == sum(len(line) + 1 for line in data.splitlines()[: len(seen)])
    assert position["files"][str(path)]["lines"] == len(seen)
    resumed = make_source(
        RecordingContext(),
        path,
        schema={"id": "int", "name": "string"},
        parse_threads=2,
    )
    resumed.restore_position(position)
    rest, batches = read_all(resumed)
    resumed.close()
    assert seen + rest.column("id").to_pylist() == list(range(5000))
    assert positions(batches)[0] == f"{path} line {len(seen) + 1}"


def test_line_longer_than_block(tmp_path: Path, context: RecordingContext) -> None:
    rows = [
        {"id": 1, "text": "a"},
        {"id": 2, "text": "b" * 20_000},
        {"id": 3, "text": "c"},
    ]
    path = tmp_path / "long.jsonl"
    write_lines(path, rows)

    table, batches = read_all(make_source(context, path, block_size=4096))

    assert table.to_pylist() == rows
    assert positions(batches) == [f"{path} line {i}" for i in (1, 2, 3)]


def test_two_objects_and_blank_line_in_one_block(
    tmp_path: Path, context: RecordingContext
) -> None:
    # As many records as lines, but line 2 has two objects and line 3 none.
    path = tmp_path / "tricky.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2}{"id": 3}\n\n{"id": 4}\n')

    table, batches = read_all(make_source(context, path, schema={"id": "int"}))

    assert table.column("id").to_pylist() == [1, 4]
    assert positions(batches) == [f"{path} line 1", f"{path} line 4"]
    assert [r[2] for r in context.rejected] == [f"{path} line 2"]


def test_reasons_show_json_text(tmp_path: Path, context: RecordingContext) -> None:
    path = tmp_path / "values.jsonl"
    path.write_bytes(
        b'{"id": true}\n'
        b'{"id": 1e20}\n'
        b'{"id": [1, null]}\n'
        b'{"id": NaN}\n'
        b'{"id": 1, "ok": "maybe"}\n'
        b'{"id": 2, "ok": {"a": false}}\n'
    )
    source = make_source(context, path, schema={"id": "int", "ok": "bool"})

    read_all(source)

    assert [r[1] for r in context.rejected] == [
        "field 'id': value true is not a valid integer",
        "field 'id': value 1e20 is out of range for int64 "
        "(-9223372036854775808 to 9223372036854775807)",
        "field 'id': value [1,null] is not a valid integer",
        "field 'id': value NaN is not a valid integer",
        "field 'ok': value \"maybe\" is not a valid boolean (true or false)",
        "field 'ok': value {\"a\":false} is not a valid boolean (true or false)",
    ]


NUMBER_TEXTS = [
    "1E2",
    "1e400",
    "-0",
    "0.1000000000000000000001",
    "12345678901234567890123",
    "-1.5e-7",
    "NaN",
]


def test_string_field_keeps_number_text(
    tmp_path: Path, context: RecordingContext
) -> None:
    values = [*NUMBER_TEXTS, "[1E2, -0]", '{"a": 1.50}', "true"]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(f'{{"id": {i}, "s": {v}}}\n' for i, v in enumerate(values)))
    source = make_source(context, path, schema={"id": "int", "s": "string"})

    table, _ = read_all(source)

    assert table.column("id").to_pylist() == list(range(len(values)))
    # Numbers keep their text; arrays and objects are compact JSON.
    expected = [*NUMBER_TEXTS, "[1E2,-0]", '{"a":1.50}', "true"]
    assert table.column("s").to_pylist() == expected
    assert context.rejected == []


def test_every_bad_field_in_reason(tmp_path: Path, context: RecordingContext) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"id": "x", "ok": true, "at": "soon", "n": 1.5}\n'
        b'{"id": 2, "ok": false, "at": "2024-01-01T00:00:00Z", "n": 3}\n'
    )
    schema = {"id": "int", "ok": "bool", "at": "timestamp", "n": "int"}
    source = make_source(context, path, schema=schema)

    table, _ = read_all(source)

    assert table.column("id").to_pylist() == [2]
    assert context.rejected == [
        (
            {"id": "x", "ok": True, "at": "soon", "n": 1.5},
            "field 'id': value \"x\" is not a valid integer; "
            "field 'at': value \"soon\" is not a valid timestamp "
            "(ISO 8601, e.g. 2013-01-01T05:00:00Z); "
            "field 'n': value 1.5 is not a valid integer",
            f"{path} line 1",
        )
    ]


def test_dead_letter_keeps_numbers_as_written(tmp_path: Path) -> None:
    rejected = (
        b'{"id": 123456789012345678901234567890, "low": -12345678901234567890, '
        b'"x": 1E2, "y": 1e400, "z": 0.1000000000000000000001, '
        b'"nested": [1.50, {"w": -0}]}'
    )
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"id": 1}\n' + rejected + b"\n")
    dead_letter = tmp_path / "dl.jsonl"
    p = Pipeline("jsonl-exact-numbers")
    events = p.source("events", "jsonl", path=str(path), schema={"id": "int"})
    p.destination("out", "memory", [events])
    p.errors(policy="dead_letter", dead_letter={"path": str(dead_letter)})

    summary = p.run()

    assert summary.output("out").column("id").to_pylist() == [1]
    [entry] = dead_letter.read_bytes().splitlines()
    # The record is the line as written, without the spaces between tokens.
    assert b'"record":' + rejected.replace(b" ", b"") + b"," in entry
    assert json.loads(entry)["record"]["id"] == 123456789012345678901234567890


INT64_RANGE = "(-9223372036854775808 to 9223372036854775807)"


def test_integers_beyond_int64_rejected(
    tmp_path: Path, context: RecordingContext
) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(
        b'{"id": 1}\n'
        b'{"id": -9223372036854775809}\n'  # 2: one below the minimum
        b'{"id": 3}\n'
        b'{"id": -9223372036854775808}\n'  # 4: the minimum fits
        b'{"id": 9223372036854775808}\n'  # 5: one above the maximum
        b'{"id": -92233720368547758090}\n'  # 6
    )
    source = make_source(context, path, schema={"id": "int"})

    table, batches = read_all(source)

    assert table.column("id").to_pylist() == [1, 3, -(2**63)]
    assert positions(batches) == [f"{path} line {n}" for n in (1, 3, 4)]
    assert [(r[0], r[1], r[2]) for r in context.rejected] == [
        (
            {"id": -(2**63) - 1},
            f"field 'id': value -9223372036854775809 is out of range for int64 "
            f"{INT64_RANGE}",
            f"{path} line 2",
        ),
        (
            {"id": 2**63},
            f"field 'id': value 9223372036854775808 is out of range for int64 "
            f"{INT64_RANGE}",
            f"{path} line 5",
        ),
        (
            {"id": -(2**63) * 10 - 10},
            f"field 'id': value -92233720368547758090 is out of range for int64 "
            f"{INT64_RANGE}",
            f"{path} line 6",
        ),
    ]


def test_integers_beyond_int64_inferred_as_text(
    tmp_path: Path, context: RecordingContext
) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(
        b'{"id": 1, "x": 1}\n{"id": -9223372036854775809, "x": 18446744073709551617}\n'
        b'{"id": 3, "x": 2.5}\n'
    )
    source = make_source(context, path)

    table, _ = read_all(source)

    assert source.schema() == pa.schema(
        [pa.field("id", pa.string()), pa.field("x", pa.float64())]
    )
    assert table.column("id").to_pylist() == ["1", "-9223372036854775809", "3"]
    assert table.column("x").to_pylist() == [1.0, float(2**64 + 1), 2.5]
    assert context.rejected == []


@pytest.mark.parametrize("schema", [None, {"id": "int", "s": "string"}])
def test_unpaired_surrogate_rejected(
    tmp_path: Path, context: RecordingContext, schema: dict[str, str] | None
) -> None:
    path = tmp_path / "text.jsonl"
    path.write_bytes(
        b'{"id": 1, "s": "a"}\n'
        b'{"id": 2, "s": "\\ud800"}\n'
        b'{"id": 3, "s": "c"}\n'
        b'{"id": 4, "s": "\\ud83d\\ude00"}\n'  # a surrogate pair is one character
        b'{"id": 5, "s": "x\\uDC00y"}\n'
    )
    config = {} if schema is None else {"schema": schema}
    source = make_source(context, path, **config)

    table, batches = read_all(source)

    assert table.column("id").to_pylist() == [1, 3, 4]
    assert table.column("s").to_pylist() == ["a", "c", "\N{GRINNING FACE}"]
    assert positions(batches) == [f"{path} line {n}" for n in (1, 3, 4)]
    assert context.rejected == [
        (
            '{"id": 2, "s": "\\ud800"}',
            "field 's': text contains an unpaired surrogate escape \\ud800",
            f"{path} line 2",
        ),
        (
            '{"id": 5, "s": "x\\uDC00y"}',
            "field 's': text contains an unpaired surrogate escape \\udc00",
            f"{path} line 5",
        ),
    ]


def test_unpaired_surrogate_in_dead_letter_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b'{"id": 1, "s": "a"}\n{"id": 2, "s": "\\ud800"}\n{"id": 3, "s": "c"}\n'
    )
    dead_letter = tmp_path / "dl.jsonl"
    p = Pipeline("jsonl-surrogate")
    events = p.source("events", "jsonl", path=str(path))
    p.destination("out", "memory", [events])
    p.errors(policy="dead_letter", dead_letter={"path": str(dead_letter)})

    summary = p.run()

    assert summary.output("out").column("s").to_pylist() == ["a", "c"]
    entries = [orjson.loads(line) for line in dead_letter.read_bytes().splitlines()]
    assert [(e["position"], e["record"], e["reason"]) for e in entries] == [
        (
            f"{path} line 2",
            '{"id": 2, "s": "\\ud800"}',
            "field 's': text contains an unpaired surrogate escape \\ud800",
        )
    ]


# --- an unterminated last line in follow mode -------------------------------------


def test_follow_leaves_unterminated_line_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "live.jsonl"
    partial = b'{"id": 3, "na'
    path.write_bytes(b'{"id": 1}\n{"id": 2}\n' + partial)
    schema = {"id": "int", "name": "string"}
    context = RecordingContext("live")
    source = make_source(context, path, follow=True, poll_interval="1ms", schema=schema)
    source.open()
    items = source.read()
    batch = next_batch(items)
    assert batch is not None
    assert batch.batch.column("id").to_pylist() == [1, 2]
    assert isinstance(next(items), Idle)
    context.stopping = True
    position = source.snapshot_position()

    with caplog.at_level("WARNING", logger="dataflare.test.live"):
        source.close()

    offset = len(b'{"id": 1}\n{"id": 2}\n')
    assert position["files"][str(path)]["offset"] == offset
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{path}: the last line has no newline, so its {len(partial)} bytes from "
        f"byte offset {offset} were not read; a run that resumes from a checkpoint "
        "reads them once the line ends with a newline"
    ]

    # Once the writer ends the line, a run resuming from the position reads it.
    with path.open("ab") as file:
        file.write(b'me": "c"}\n')
    resumed = make_source(RecordingContext(), path, schema=schema)
    resumed.restore_position(position)
    rest, batches = read_all(resumed)
    assert (
        rest.to_pylist()
        == pl.read_ndjson(path, schema={"id": pl.Int64, "name": pl.String})[
            2:
        ].to_dicts()
    )
    assert positions(batches) == [f"{path} line 3"]


# --- encoding ---------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("zone", [None, "UTC", "Asia/Kolkata"])
def test_timestamps_as_text_match_python(unit: str, zone: str | None) -> None:
    moments = [
        dt.datetime(2024, 2, 29, 23, 59, 59, 123456),
        dt.datetime(1969, 12, 31, 23, 59, 59, 999999),
        dt.datetime(1970, 1, 1),
        dt.datetime(2261, 12, 31, 5, 6, 7, 1000),
    ]
    digits = {"s": 0, "ms": 3, "us": 6, "ns": 9}[unit]
    values = pa.array([*moments, None], pa.timestamp("us")).cast(
        pa.timestamp(unit), safe=False
    )
    if zone is not None:
        values = values.cast(pa.timestamp(unit, tz="UTC")).cast(
            pa.timestamp(unit, tz=zone)
        )

    text = timestamps_as_text(values).to_pylist()

    expected: list[str | None] = []
    for moment in values.cast(pa.timestamp(unit)).to_pylist()[:-1]:
        if unit == "ns":
            moment = moment.to_pydatetime()  # pandas Timestamp
        fraction = f"{moment.microsecond:06d}000"[:digits]
        written = moment.strftime("%Y-%m-%dT%H:%M:%S") + (
            "." + fraction if digits else ""
        )
        expected.append(written + ("Z" if zone is not None else ""))
    assert text == [*expected, None]


def test_small_and_large_batches_encode_alike() -> None:
    count = 1000
    table = pa.table(
        {
            "id": pa.array(range(count), pa.int64()),
            "name": [f'n "{i}" é\n' if i % 3 else None for i in range(count)],
            "ok": [i % 2 == 0 for i in range(count)],
            "score": [
                (-1) ** i * 1.37**i * 10.0 ** (i % 40 - 25) for i in range(count)
            ],
            "day": pa.array([i for i in range(count)], pa.int32()).cast(pa.date32()),
            "at": pa.array(
                [i * 1_000_250 for i in range(count)], pa.timestamp("us", tz="UTC")
            ),
            "local": pa.array(
                [i * 3_600_000_000_001 for i in range(count)], pa.timestamp("ns")
            ),
            "zoned": pa.array(
                [i * 86_399 for i in range(count)], pa.timestamp("s", tz="Asia/Tokyo")
            ),
        }
    )
    batch = table.to_batches()[0]

    whole = encode_json_lines(batch)
    pieces = b"".join(
        encode_json_lines(batch.slice(i, 10)) for i in range(0, count, 10)
    )

    assert pieces == whole
    expected = []
    for row, nanos in zip(
        table.drop_columns(["local"]).to_pylist(),
        table.column("local").cast(pa.int64()).to_pylist(),
        strict=True,
    ):
        seconds, fraction = divmod(nanos, 1_000_000_000)
        local = dt.datetime(1970, 1, 1) + dt.timedelta(seconds=seconds)
        expected.append(
            {
                **row,
                "day": row["day"].isoformat(),
                "at": row["at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "local": f"{local:%Y-%m-%dT%H:%M:%S}.{fraction:09d}",
                "zoned": row["zoned"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    assert [orjson.loads(line) for line in whole.splitlines()] == expected


def test_large_batches_use_orjson_until_polars_is_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    count = 100
    batch = pa.RecordBatch.from_pydict(
        {
            "id": pa.array(range(count), pa.int64()),
            "name": [f"n{i} é" if i % 4 else None for i in range(count)],
            "score": [i / 7 for i in range(count)],
            "at": pa.array(
                [i * 1_000_250 for i in range(count)], pa.timestamp("us", tz="UTC")
            ),
        }
    )
    by_polars = encode_json_lines(batch)  # Polars is imported in this process
    encoded_rows: list[int] = []
    encode_small = jsonl_module._encode_small

    def counting(part: pa.RecordBatch) -> bytes:
        encoded_rows.append(part.num_rows)
        return encode_small(part)

    monkeypatch.setattr(jsonl_module, "_encode_small", counting)
    imported = [False]
    monkeypatch.setattr(jsonl_module, "_polars_imported", lambda: imported[0])

    outputs = [encode_json_lines(batch) for _ in range(2)]
    imported[0] = True
    outputs.append(encode_json_lines(batch))

    assert encoded_rows == [count, count]  # orjson until Polars is imported
    assert outputs == [by_polars] * 3


def test_invalid_utf8_line_rejected(tmp_path: Path, context: RecordingContext) -> None:
    """Arrow's reader copies string bytes unchecked; such a line is rejected."""
    path = tmp_path / "text.jsonl"
    path.write_bytes(
        b'{"id": 1, "s": "ok"}\n'
        b'{"id": 2, "s": "\xff"}\n'
        b'{"id": 3, "s": "a\xc3"}\n'
        b'{"id": 4, "s": "fine"}\n'
    )
    source = make_source(context, path, schema={"id": "int", "s": "string"})

    table, batches = read_all(source)

    assert positions(batches) == [f"{path} line 1", f"{path} line 4"]
    assert table.column("id").to_pylist() == [1, 4]
    assert table.column("s").to_pylist() == ["ok", "fine"]
    assert [(reason, where) for _, reason, where in context.rejected] == [
        ("the line is not valid UTF-8 text", f"{path} line 2"),
        ("the line is not valid UTF-8 text", f"{path} line 3"),
    ]


@pytest.mark.parametrize("depth", [200, 500, 1000, 5000])
def test_deeply_nested_line_rejected(
    tmp_path: Path, context: RecordingContext, depth: int
) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text('{"id": 1}\n' + "[" * depth + "]" * depth + '\n{"id": 3}\n')
    source = make_source(context, path, schema={"id": "int"})

    table, _ = read_all(source)

    assert table.column("id").to_pylist() == [1, 3]
    [(record, reason, where)] = context.rejected
    assert where == f"{path} line 2"
    if depth <= 1000:  # orjson reads up to 1024 levels
        assert reason == "expected a JSON object, found an array"
    else:
        assert reason.startswith("JSON nested deeper than the parser's limit")
    if depth > 100:
        assert record == "[" * depth + "]" * depth  # kept as its text


def test_timestamps_after_year_9999_keep_their_date() -> None:
    """Both encoders put the `T` after the date, whatever its length."""
    micros = 253_402_300_800 * 1_000_000  # 10000-01-01T00:00:00Z
    few = pa.RecordBatch.from_arrays(
        [pa.array([micros], pa.timestamp("us", tz="UTC"))], names=["t"]
    )
    many = pa.RecordBatch.from_arrays(
        [pa.array([micros] * 100, pa.timestamp("us", tz="UTC"))], names=["t"]
    )

    small = encode_json_lines(few)
    large = encode_json_lines(many)  # Polars is loaded in this process

    assert small == b'{"t":"10000-01-01T00:00:00.000000Z"}\n'
    assert large == small * 100


@pytest.mark.parametrize("text", ["plain", 'a},{"b', "}{,", "\u2028},{\n"])
def test_orjson_encoder_one_line_per_record(text: str) -> None:
    rows = 100  # enough for one orjson call over all rows
    names = [text, None, "other"] * 34
    batch = pa.RecordBatch.from_pydict(
        {
            "name": names[:rows],
            "count": list(range(rows)),
            "ratio": [i / 4 for i in range(rows)],
            "ok": [i % 2 == 0 for i in range(rows)],
            "at": pa.array(
                [i * 1_000_000 for i in range(rows)], pa.timestamp("us", tz="UTC")
            ),
        }
    )

    lines = jsonl_module._encode_small(batch).split(b"\n")

    assert lines[-1] == b""
    expected = [
        {**row, "at": row["at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        for row in batch.to_pylist()
    ]
    assert [json.loads(line) for line in lines[:-1]] == expected


def test_orjson_encoder_name_with_separator() -> None:
    batch = pa.RecordBatch.from_pydict({"a},{b": list(range(100))})

    encoded = jsonl_module._encode_small(batch)

    assert encoded == b"".join(b'{"a},{b":%d}\n' % i for i in range(100))
    assert jsonl_module._encode_small(batch.slice(0, 0)) == b""


def random_text_batch(rows: int, seed: int, *, escapes: bool) -> pa.RecordBatch:
    import random

    rng = random.Random(seed)
    letters = "abc é😀\u2028" + ('"\\\n\t\x00' if escapes else "")

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.1 else value

    return pa.RecordBatch.from_pydict(
        {
            "id": pa.array(
                [maybe(rng.randint(-(2**63), 2**63 - 1)) for _ in range(rows)],
                pa.int64(),
            ),
            "big": pa.array(
                [maybe(rng.choice([0, 2**64 - 1, 7])) for _ in range(rows)],
                pa.uint64(),
            ),
            "small": pa.array(
                [maybe(rng.randint(-128, 127)) for _ in range(rows)], pa.int8()
            ),
            "ok": pa.array(
                [maybe(rng.random() < 0.5) for _ in range(rows)], pa.bool_()
            ),
            "text": pa.array(
                [
                    maybe(
                        "".join(rng.choice(letters) for _ in range(rng.randint(0, 8)))
                    )
                    for _ in range(rows)
                ],
                pa.string(),
            ),
            "long text": pa.array(
                [maybe(f"v{rng.randint(0, 99)}") for _ in range(rows)],
                pa.large_string(),
            ),
        }
    )


@pytest.mark.parametrize("seed", range(5))
def test_arrow_encoder_matches_orjson_and_polars(seed: int) -> None:
    batch = random_text_batch(600, seed, escapes=False)
    expected = jsonl_module._encode_small(batch)  # orjson
    by_polars = pl.from_arrow(batch)
    assert isinstance(by_polars, pl.DataFrame)
    buffer = io.BytesIO()
    by_polars.write_ndjson(buffer)

    whole = jsonl_module._encode_with_arrow(batch)
    part = jsonl_module._encode_with_arrow(batch.slice(37, 300))

    assert whole == expected
    assert whole == buffer.getvalue()
    assert part == jsonl_module._encode_small(batch.slice(37, 300))
    assert [json.loads(line) for line in whole.splitlines()] == batch.to_pylist()


def test_arrow_encoder_leaves_escapes_to_orjson() -> None:
    batch = random_text_batch(600, 11, escapes=True)

    assert jsonl_module._encode_with_arrow(batch) is None
    assert encode_json_lines(batch) == jsonl_module._encode_small(batch)
    assert [json.loads(x) for x in encode_json_lines(batch).splitlines()] == (
        batch.to_pylist()
    )


def test_arrow_encoder_used_for_large_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    encode = jsonl_module._encode_with_arrow

    def counting(batch: pa.RecordBatch) -> bytes | None:
        calls.append(batch.num_rows)
        return encode(batch)

    monkeypatch.setattr(jsonl_module, "_encode_with_arrow", counting)
    batch = random_text_batch(600, 3, escapes=False)

    encode_json_lines(batch.slice(0, 255))
    encode_json_lines(batch)

    assert calls == [600]


def test_read_ahead_yields_blocks_in_order() -> None:
    blocks = [bytearray(f"{i}\n".encode()) for i in range(50)]

    assert list(jsonl_module._read_ahead(iter(blocks), 2)) == blocks


def test_read_ahead_stops_its_thread_when_left_early() -> None:
    read: list[int] = []

    def endless() -> Iterator[bytearray]:
        n = 0
        while True:
            read.append(n)
            yield bytearray(b"x\n")
            n += 1

    ahead = jsonl_module._read_ahead(endless(), 2)
    taken = [next(ahead) for _ in range(3)]
    ahead.close()
    count = len(read)
    time.sleep(0.2)

    assert len(taken) == 3
    assert len(read) == count  # the reading thread has stopped
    assert not any(t.name == "jsonl-read" for t in threading.enumerate())


def test_read_ahead_raises_reading_errors() -> None:
    def failing() -> Iterator[bytearray]:
        yield bytearray(b"a\n")
        raise OSError("disk gone")

    ahead = jsonl_module._read_ahead(failing(), 2)

    assert next(ahead) == bytearray(b"a\n")
    with pytest.raises(OSError, match="disk gone"):
        next(ahead)


TIMES = [
    "2024-05-01T10:00:00+02:00",
    "2024-05-01T10:00:00.123456789+02:00",
    "2024-05-01T10:00:00.5",
    "2024-05-01 10:00:00.123",
    "2024-05-01T10:00:00,5",
    "2024-05-01T10:00",
    "2024-05-01",
    "2300-01-01T00:00:00",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:00:00-05:00",
    "1677-09-21T00:12:43.145224192Z",
    "1677-09-21T00:12:43.145224191Z",
    "2262-04-11T23:47:16.854775807Z",
    "2262-04-11T23:47:16.854775808Z",
    "0000-06-01T00:00:00Z",  # Arrow reads year 0, Python's datetime has none
    "0000-02-29T10:00:00.5+01:00",
]
NS_OUT_OF_RANGE = {8, 9, 10, 12, 14, 15, 16}  # line numbers in TIMES


def arrow_reads(line: bytes, dtype: pa.DataType) -> int | None:
    """Return what Arrow's JSON reader makes of one line, or None if it fails."""
    options = pajson.ParseOptions(explicit_schema=pa.schema([("t", dtype)]))
    try:
        table = pajson.read_json(io.BytesIO(line + b"\n"), parse_options=options)
    except pa.ArrowInvalid:
        return None
    [value] = table.column(0).cast(pa.int64()).to_pylist()
    return value


def epoch_units(text: str, unit: str) -> int:
    """Return `text` as units since the epoch, worked out from its digits."""
    day, _, clock = text.rstrip("Z").replace(" ", "T").partition("T")
    offset = 0
    if len(clock) > 6 and clock[-6] in "+-":
        sign = 1 if clock[-6] == "+" else -1
        offset = sign * (int(clock[-5:-3]) * 3600 + int(clock[-2:]) * 60)
        clock = clock[:-6]
    days = 0
    if day.startswith("0000"):  # 400 Gregorian years are 146,097 days
        day, days = "0400" + day[4:], -146_097
    days += (dt.date.fromisoformat(day) - dt.date(1970, 1, 1)).days
    parts = (clock or "00:00").replace(",", ".").split(":")
    seconds, _, fraction = (parts[2] if len(parts) > 2 else "0").partition(".")
    whole = days * 86400 + int(parts[0]) * 3600 + int(parts[1]) * 60 + int(seconds)
    nanos = int(fraction[:9].ljust(9, "0"))
    total = (whole - offset) * 10**9 + nanos
    return total // {"s": 10**9, "ms": 10**6, "us": 1000, "ns": 1}[unit]


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("zone", [None, "UTC"])
@pytest.mark.parametrize("native", [True, False])
def test_jsonl_timestamps_same_alone_and_in_block(
    unit: str, zone: str | None, native: bool
) -> None:
    """A time reads the same in a whole block and alone, as Arrow reads it.

    Alone means parsed line by line, which a bad line in the block causes.
    Times that Arrow's reader rejects are read from their digits instead,
    but nanosecond times outside the int64 range are rejected.
    """
    dtype = pa.timestamp(unit, tz=zone)
    parser = JsonLinesParser(pa.schema([("t", dtype)]), "f", native=native)
    lines = [orjson.dumps({"t": text}) for text in TIMES]
    expected = {}
    for number, (line, text) in enumerate(zip(lines, TIMES, strict=True), start=1):
        if unit == "ns" and number in NS_OUT_OF_RANGE:
            continue
        arrow = arrow_reads(line, dtype)
        expected[number] = epoch_units(text, unit) if arrow is None else arrow
        assert expected[number] == epoch_units(text, unit)

    whole = parser.parse_block(b"\n".join(lines) + b"\n")
    # A line that is not an object makes the parser read its block line by line.
    alone = [parser.parse_block(line + b"\n[1]\n") for line in lines]

    kept = list(range(1, whole.batch.num_rows + 1))
    if whole.numbers is not None:
        kept = whole.numbers.tolist()
    values = whole.batch.column(0).cast(pa.int64()).to_pylist()
    assert dict(zip(kept, values, strict=True)) == expected
    assert [n for _, _, n in whole.rejected] == [
        n for n in range(1, len(TIMES) + 1) if n not in expected
    ]
    for number, result in enumerate(alone, start=1):
        values = result.batch.column(0).cast(pa.int64()).to_pylist()
        assert values == ([expected[number]] if number in expected else [])
        if number not in expected:
            assert "nanosecond timestamp (years 1677 to 2262" in result.rejected[0][1]


@pytest.mark.parametrize("schema", [{"id": "int", "age": "int"}, None])
def test_repeated_key_takes_last_value(
    tmp_path: Path, schema: dict[str, str] | None
) -> None:
    path = tmp_path / "in.jsonl"
    lines = ['{"id": 1, "age": 7, "age": 8}', '{"age": 3, "id": 2, "age": 4}']
    path.write_text("\n".join(lines) + "\n")
    p = Pipeline("repeated")
    config: dict[str, Any] = {"path": str(path)}
    if schema is not None:
        config["schema"] = schema
    rows = p.source("rows", "jsonl", **config)
    p.destination("out", "memory", [rows])

    table = p.run().output("out")

    expected = [json.loads(line) for line in lines]  # Python keeps the last too
    assert table.select(["id", "age"]).to_pylist() == expected

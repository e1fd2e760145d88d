"""JSON Lines source and sink: parsing, bad lines, following, writing."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson
import pytest
from conftest import RecordingContext
from pydantic import ValidationError

from dataflare import Pipeline
from dataflare.connectors.files.jsonl import (
    JsonLinesSink,
    JsonLinesSinkConfig,
    JsonLinesSource,
    JsonLinesSourceConfig,
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
    assert reason == "field 'id': value 'seven' is not a valid integer"
    assert rejected[f"{path} line 5"][1] == (
        "field 'at': value 'yesterday' is not a valid timestamp (ISO 8601)"
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
        ("field 'id': value 'bad' is not a valid integer", f"{path} line 2500"),
        ("field 'v': value 'NaN?' is not a valid number", f"{path} line 4000"),
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

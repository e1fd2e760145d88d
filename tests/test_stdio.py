"""Standard input source and standard output sink."""

from __future__ import annotations

import datetime as dt
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from conftest import RecordingContext
from pydantic import ValidationError

from dataflare import Pipeline
from dataflare.connectors.stdio import (
    StdinSource,
    StdinSourceConfig,
    StdoutSink,
    StdoutSinkConfig,
)
from dataflare.plugin.interface import Idle, SourceBatch
from dataflare.streaming.runner import PipelineRun


def set_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


@pytest.fixture
def pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Make standard input the read end of a pipe; yield the write end."""
    read_fd, write_fd = os.pipe()
    reader = io.TextIOWrapper(os.fdopen(read_fd, "rb"))
    monkeypatch.setattr(sys, "stdin", reader)
    writer = os.fdopen(write_fd, "wb", buffering=0)
    yield writer
    if not writer.closed:
        writer.close()
    reader.close()


def make_source(context: RecordingContext, **config: Any) -> StdinSource:
    return StdinSource(StdinSourceConfig.model_validate(config), context)


def read_all(source: StdinSource) -> tuple[pa.Table, list[SourceBatch]]:
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


# --- JSON lines -------------------------------------------------------------------


def test_jsonl_with_bad_lines(
    monkeypatch: pytest.MonkeyPatch, context: RecordingContext
) -> None:
    set_stdin(
        monkeypatch,
        b'\xef\xbb\xbf{"id": 1, "at": "2024-01-01T00:00:00Z"}\r\n'
        b"\r\n"
        b"{broken\r\n"
        b'{"id": "two"}\r\n'
        b'{"id": 5, "at": "2024-01-01T01:00:00+01:00"}',
    )
    source = make_source(context, schema={"id": "int", "at": "timestamp"})

    table, batches = read_all(source)

    assert table.to_pylist() == [
        {"id": 1, "at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)},
        {"id": 5, "at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)},
    ]
    assert positions(batches) == ["stdin line 1", "stdin line 5"]
    assert [(r[0], r[2]) for r in context.rejected] == [
        ("{broken", "stdin line 3"),
        ({"id": "two"}, "stdin line 4"),
    ]
    assert context.rejected[1][1] == "field 'id': value \"two\" is not a valid integer"


def test_jsonl_inferred_schema_keeps_lines(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lines = [orjson.dumps({"id": i, "name": f"n{i}"}) for i in range(1, 301)]
    set_stdin(monkeypatch, b"\n".join(lines) + b"\n")
    p = Pipeline("stdin-infer")
    events = p.source("events", "stdin", infer_rows=10)
    p.destination("out", "memory", [events])

    summary = p.run()

    table = summary.output("out")
    assert table.schema == pa.schema([("id", pa.int64()), ("name", pa.string())])
    assert table.column("id").to_pylist() == list(range(1, 301))


def test_empty_input_needs_schema(
    monkeypatch: pytest.MonkeyPatch, context: RecordingContext
) -> None:
    set_stdin(monkeypatch, b"")

    with pytest.raises(ValueError, match=r"standard input ended.*set `schema`"):
        make_source(context).schema()


# --- CSV lines --------------------------------------------------------------------


def test_csv_with_schema(
    monkeypatch: pytest.MonkeyPatch, context: RecordingContext
) -> None:
    set_stdin(
        monkeypatch,
        b"id,name,score\n"
        b"1,ann,1.5\n"
        b"2,bob\n"  # too few fields
        b"\n"
        b'3,"cat, the",NA\n'
        b"x,dan,2\n"  # id does not convert
        b"5,eve,3",
    )
    source = make_source(
        context, format="csv", schema={"id": "int", "name": "string", "score": "float"}
    )

    table, batches = read_all(source)

    assert table.to_pylist() == [
        {"id": 1, "name": "ann", "score": 1.5},
        {"id": 3, "name": "cat, the", "score": None},
        {"id": 5, "name": "eve", "score": 3.0},
    ]
    assert positions(batches) == ["stdin line 2", "stdin line 5", "stdin line 7"]
    assert context.rejected == [
        ("2,bob", "expected 3 fields, found 2", "stdin line 3"),
        (
            {"id": "x", "name": "dan", "score": "2"},
            "field 'id': value 'x' is not a valid integer",
            "stdin line 6",
        ),
    ]


def test_csv_inferred_types(
    monkeypatch: pytest.MonkeyPatch, context: RecordingContext
) -> None:
    set_stdin(monkeypatch, b"id;price;day\n1;2.5;2024-01-01\n2;3;2024-01-02\n")
    source = make_source(context, format="csv", delimiter=";")

    table, _ = read_all(source)

    assert table.schema == pa.schema(
        [("id", pa.int64()), ("price", pa.float64()), ("day", pa.date32())]
    )
    assert table.column("price").to_pylist() == [2.5, 3.0]


def test_csv_without_header(
    monkeypatch: pytest.MonkeyPatch, context: RecordingContext
) -> None:
    set_stdin(monkeypatch, b"1,a\n2,b\n")
    source = make_source(
        context,
        format="csv",
        header=False,
        columns=["id", "tag"],
        schema={"id": "int", "tag": "string"},
    )

    table, _ = read_all(source)

    assert table.to_pylist() == [{"id": 1, "tag": "a"}, {"id": 2, "tag": "b"}]


def test_csv_options_need_csv_format() -> None:
    with pytest.raises(ValidationError, match="delimiter apply only to format: csv"):
        StdinSourceConfig.model_validate({"format": "jsonl", "delimiter": ";"})


# --- reading before the end of input --------------------------------------------


def test_batches_arrive_before_eof(pipe: Any, context: RecordingContext) -> None:
    source = make_source(context, schema={"id": "int"}, poll_interval="5ms")
    source.open()
    items = source.read()

    pipe.write(b'{"id": 1}\n{"id": 2}\n{"id": 3')  # the third line is incomplete
    received = []
    for _ in range(1000):
        item = next(items)
        if isinstance(item, SourceBatch):
            received.append(item.batch.column("id").to_pylist())
            break
    assert received == [[1, 2]]
    assert isinstance(next(items), Idle)

    pipe.write(b"}\n")
    pipe.close()
    rest = [item for item in items if isinstance(item, SourceBatch)]
    assert [b.batch.column("id").to_pylist() for b in rest] == [[3]]
    assert rest[0].origin.position(0) == "stdin line 3"


def test_pipeline_reacts_before_eof(pipe: Any) -> None:
    p = Pipeline("stdin-live")
    events = p.source("events", "stdin", schema={"id": "int"}, poll_interval="5ms")
    p.destination("out", "memory", [events])
    run = PipelineRun(p.build())
    summaries = []
    runner = threading.Thread(target=lambda: summaries.append(run.run()))
    runner.start()

    pipe.write(b'{"id": 1}\n{"id": 2}\n')
    deadline = time.monotonic() + 20
    while run.snapshot().records_written < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    written_before_eof = run.snapshot().records_written
    pipe.write(b'{"id": 3}\n')
    pipe.close()
    runner.join(timeout=20)

    assert written_before_eof == 2
    assert not runner.is_alive()
    assert summaries[0].status == "completed"
    assert summaries[0].output("out").column("id").to_pylist() == [1, 2, 3]


def test_stop_while_waiting_for_input(pipe: Any) -> None:
    p = Pipeline("stdin-stop")
    events = p.source("events", "stdin", schema={"id": "int"}, poll_interval="5ms")
    p.destination("out", "memory", [events])
    run = PipelineRun(p.build())
    summaries = []
    runner = threading.Thread(target=lambda: summaries.append(run.run()))
    runner.start()

    pipe.write(b'{"id": 1}\n')
    deadline = time.monotonic() + 20
    while run.snapshot().records_written < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    run.stop()
    runner.join(timeout=20)

    assert not runner.is_alive()
    assert summaries[0].status == "stopped"
    assert summaries[0].output("out").column("id").to_pylist() == [1]


# --- standard output --------------------------------------------------------------


def test_stdout_writes_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    p = Pipeline("stdout")
    rows = p.source(
        "rows",
        "memory",
        records=pa.table(
            {
                "id": [1, 2],
                "at": pa.array(
                    [dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.UTC), None],
                    pa.timestamp("us", tz="UTC"),
                ),
                "tags": [["a", "b"], []],
            }
        ),
    )
    p.destination("out", "stdout", [rows])

    p.run()

    lines = capsys.readouterr().out.splitlines()
    assert [orjson.loads(line) for line in lines] == [
        {"id": 1, "at": "2024-03-01T12:30:00.000000Z", "tags": ["a", "b"]},
        {"id": 2, "at": None, "tags": []},
    ]


class _ClosedPipe(io.StringIO):
    """A text stream whose binary buffer fails as a closed pipe does."""

    class _Buffer:
        def write(self, data: bytes) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

    buffer = _Buffer()


def test_stdout_closed_by_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    sink = StdoutSink(StdoutSinkConfig(), RecordingContext())
    sink.open()

    with pytest.raises(OSError, match="the reading process closed it"):
        sink.write(pa.record_batch({"id": [1]}))

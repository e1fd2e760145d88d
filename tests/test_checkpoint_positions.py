"""Checkpoint positions of sources: snapshot mid-read, resume in a new source.

For each source the records read before the snapshot plus the records a
fresh source reads after `restore_position` must equal an uninterrupted read.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RecordingContext

from dataflare.connectors import stdio
from dataflare.connectors.files.arrow_ipc import ArrowIpcSource
from dataflare.connectors.files.jsonl import JsonLinesSource
from dataflare.connectors.files.parquet import ParquetSource
from dataflare.connectors.generate import GenerateSource
from dataflare.plugin.interface import Idle, Source, SourceBatch


def make(kind: type[Source[Any]], **config: Any) -> Any:
    return kind(kind.Config.model_validate(config), RecordingContext())


def batches_of(
    items: Iterator[SourceBatch | Idle], limit: int | None = None
) -> list[pa.RecordBatch]:
    """Return up to `limit` batches; stop at the end or at the first idle item."""
    out: list[pa.RecordBatch] = []
    for item in items:
        if isinstance(item, Idle):
            break
        out.append(item.batch)
        if limit is not None and len(out) == limit:
            break
    return out


def rows(batches: list[pa.RecordBatch]) -> list[dict[str, Any]]:
    return [row for batch in batches for row in batch.to_pylist()]


def resume_check(
    kind: type[Source[Any]], stop_after: int, **config: Any
) -> list[dict[str, Any]]:
    """Return the rows of a full read, checking a resumed read gives the same."""
    whole = make(kind, **config)
    whole.open()
    expected = batches_of(whole.read())
    whole.close()

    first = make(kind, **config)
    first.open()
    head = batches_of(first.read(), stop_after)
    # Checkpoints store positions as JSON.
    position = orjson.loads(orjson.dumps(first.snapshot_position()))
    first.close()
    second = make(kind, **config)
    second.open()
    second.restore_position(position)
    tail = batches_of(second.read())
    second.close()

    assert len(head) == stop_after
    assert tail
    assert rows(head) + rows(tail) == rows(expected)
    return rows(expected)


# --- jsonl ------------------------------------------------------------------------


def write_lines(path: Path, first: int, count: int) -> None:
    with path.open("a") as out:
        for i in range(first, first + count):
            out.write(json.dumps({"id": i, "text": f"line {i}"}) + "\n")


@pytest.mark.parametrize("stop_after", [1, 5, 9])
def test_jsonl_bounded_resumes_by_offset(tmp_path: Path, stop_after: int) -> None:
    write_lines(tmp_path / "a.jsonl", 0, 700)
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf")  # a BOM, then lines
    write_lines(tmp_path / "b.jsonl", 700, 500)
    # A bad line is rejected, never emitted.
    with (tmp_path / "b.jsonl").open("a") as out:
        out.write("not json\n")
    write_lines(tmp_path / "b.jsonl", 1200, 3)

    found = resume_check(
        JsonLinesSource, stop_after, path=str(tmp_path), block_size=4096
    )

    assert [row["id"] for row in found] == list(range(1203))


def test_jsonl_position_names_file_offset_and_line(tmp_path: Path) -> None:
    write_lines(tmp_path / "a.jsonl", 0, 400)
    write_lines(tmp_path / "b.jsonl", 400, 10)
    source = make(JsonLinesSource, path=str(tmp_path), block_size=4096)
    source.open()

    head = batches_of(source.read(), 1)
    position = source.snapshot_position()

    size = sum(
        len(json.dumps({"id": i, "text": f"line {i}"})) + 1
        for i in range(len(rows(head)))
    )
    entry = position["files"][str(tmp_path / "a.jsonl")]
    assert entry["offset"] == size
    assert entry["lines"] == len(rows(head))
    assert position["done"] == []


def test_jsonl_follow_resumes_with_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    write_lines(path, 0, 600)
    with path.open("a") as out:
        out.write('{"id": 600, "te')  # a line still being written
    config = {
        "path": str(path),
        "follow": True,
        "poll_interval": "1ms",
        "block_size": 4096,
        "schema": {"id": "int", "text": "string"},
    }

    first = make(JsonLinesSource, **config)
    first.open()
    head = batches_of(first.read(), 3)
    position = orjson.loads(orjson.dumps(first.snapshot_position()))
    first.close()
    with path.open("a") as out:
        out.write('xt": "line 600"}\n')
    write_lines(path, 601, 100)
    second = make(JsonLinesSource, **config)
    second.open()
    second.restore_position(position)
    tail = batches_of(second.read())

    assert [row["id"] for row in rows(head) + rows(tail)] == list(range(701))
    assert rows(tail)[-101]["text"] == "line 600"


def test_jsonl_follow_rereads_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    write_lines(path, 0, 300)
    config = {
        "path": str(path),
        "follow": True,
        "poll_interval": "1ms",
        "block_size": 4096,
        "schema": {"id": "int", "text": "string"},
    }
    first = make(JsonLinesSource, **config)
    first.open()
    batches_of(first.read(), 1)
    position = orjson.loads(orjson.dumps(first.snapshot_position()))
    first.close()
    path.unlink()  # rotated while the pipeline was down
    write_lines(path, 1000, 5)

    second = make(JsonLinesSource, **config)
    second.open()
    second.restore_position(position)

    assert [row["id"] for row in rows(batches_of(second.read()))] == list(
        range(1000, 1005)
    )


# --- parquet and arrow ------------------------------------------------------------


def table(first: int, count: int) -> pa.Table:
    ids = list(range(first, first + count))
    return pa.table({"id": ids, "name": [f"n{i}" for i in ids]})


@pytest.mark.parametrize("stop_after", [1, 4, 5])
def test_parquet_resumes_by_record(tmp_path: Path, stop_after: int) -> None:
    pq.write_table(table(0, 1000), tmp_path / "a.parquet", row_group_size=300)
    pq.write_table(table(1000, 450), tmp_path / "b.parquet", row_group_size=200)

    found = resume_check(ParquetSource, stop_after, path=str(tmp_path), batch_rows=250)

    assert [row["id"] for row in found] == list(range(1450))


@pytest.mark.parametrize("stop_after", [5, 10])
def test_parquet_resumes_after_whole_row_groups(
    tmp_path: Path, stop_after: int
) -> None:
    # Batches end on row group boundaries, so a resumed read skips whole
    # row groups (all of them when the snapshot is at the end of a file).
    pq.write_table(table(0, 1000), tmp_path / "a.parquet", row_group_size=100)
    pq.write_table(table(1000, 30), tmp_path / "b.parquet", row_group_size=100)

    found = resume_check(ParquetSource, stop_after, path=str(tmp_path), batch_rows=100)

    assert [row["id"] for row in found] == list(range(1030))


def test_parquet_position_names_file_and_records(tmp_path: Path) -> None:
    pq.write_table(table(0, 100), tmp_path / "a.parquet")
    pq.write_table(table(100, 100), tmp_path / "b.parquet")
    source = make(ParquetSource, path=str(tmp_path), batch_rows=40)
    source.open()

    batches_of(source.read(), 4)  # 40 + 40 + 20 from a, 40 from b
    position = source.snapshot_position()

    assert position["done"] == [str(tmp_path / "a.parquet")]
    assert position["file"] == str(tmp_path / "b.parquet")
    assert position["rows"] == 40


def write_arrow(path: Path, data: pa.Table, layout: str) -> None:
    open_writer = pa.ipc.new_file if layout == "file" else pa.ipc.new_stream
    with open_writer(str(path), data.schema) as writer:
        for batch in data.to_batches(max_chunksize=130):
            writer.write_batch(batch)


@pytest.mark.parametrize("layout", ["file", "stream"])
def test_arrow_resumes_by_record(tmp_path: Path, layout: str) -> None:
    write_arrow(tmp_path / "a.arrow", table(0, 500), layout)
    write_arrow(tmp_path / "b.arrow", table(500, 300), layout)

    found = resume_check(ArrowIpcSource, 5, path=str(tmp_path))

    assert [row["id"] for row in found] == list(range(800))


# --- generate ---------------------------------------------------------------------

FIELDS = {
    "id": "sequence",
    "user": {"type": "int", "min": 1, "max": 50, "nulls": 0.1},
    "price": {"type": "float", "min": 1, "max": 9, "decimals": 2},
    "page": {"type": "choice", "values": ["home", "cart"], "weights": [3, 1]},
    "at": {"type": "timestamp", "step": "1s", "jitter": "5s"},
}


@pytest.mark.parametrize("seed", [7, None])
def test_generate_resumes_with_same_records(seed: int | None) -> None:
    config = {"fields": FIELDS, "count": 5000, "batch_rows": 600, "seed": seed}
    first = make(GenerateSource, **config)
    first.open()
    head = batches_of(first.read(), 3)
    position = orjson.loads(orjson.dumps(first.snapshot_position()))
    # An uninterrupted continuation of the same source is the reference: an
    # unseeded source makes other values in every run.
    rest = batches_of(first.read())
    second = make(GenerateSource, **config)
    second.open()
    second.restore_position(position)
    tail = batches_of(second.read())

    assert len(rows(head)) == 1800
    assert rows(tail) == rows(rest)
    assert [row["id"] for row in rows(head) + rows(tail)] == list(range(1, 5001))


def test_generate_seeded_resume_matches_a_full_run() -> None:
    # A fixed start: without one, times count from each run's start.
    at = {
        "type": "timestamp",
        "start": "2024-01-01T00:00:00Z",
        "step": "1s",
        "jitter": "5s",
    }

    found = resume_check(
        GenerateSource,
        4,
        fields={**FIELDS, "at": at},
        count=3000,
        batch_rows=500,
        seed=11,
    )

    assert len(found) == 3000


# --- stdin ------------------------------------------------------------------------


def test_stdin_has_no_position(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stdio, "_stdin", lambda: io.BytesIO(b'{"id": 1}\n'))
    source = make(stdio.StdinSource, schema={"id": "int"})
    source.open()

    batches_of(source.read())

    assert source.snapshot_position() is None
    # The engine tells replaying sources by the method they do not override.
    assert stdio.StdinSource.snapshot_position is Source.snapshot_position


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        (JsonLinesSource, {"path": "x.jsonl", "schema": {"id": "int"}}),
        (ParquetSource, {"path": "x.parquet", "schema": {"id": "int"}}),
        (GenerateSource, {"count": 1}),
    ],
)
def test_restore_of_no_position_reads_from_start(
    kind: type[Source[Any]], config: dict[str, Any]
) -> None:
    source = make(kind, **config)

    source.restore_position(None)  # what the engine passes for "no position"

"""Parquet source: files, globs, directories, schema changes and following."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RecordingContext
from pydantic import ValidationError

from dataflare import Pipeline
from dataflare.connectors.files.parquet import ParquetSource, ParquetSourceConfig
from dataflare.plugin.interface import Idle, SourceBatch
from dataflare.streaming.runner import PipelineRun


def make_source(
    context: RecordingContext, path: Path | str, **config: Any
) -> ParquetSource:
    return ParquetSource(
        ParquetSourceConfig.model_validate({"path": str(path), **config}), context
    )


def read_all(source: ParquetSource) -> tuple[pa.Table, list[SourceBatch]]:
    source.open()
    batches = [item for item in source.read() if isinstance(item, SourceBatch)]
    table = pa.Table.from_batches([b.batch for b in batches], schema=source.schema())
    return table, batches


def trips(first: int, count: int) -> pa.Table:
    ids = list(range(first, first + count))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "fare": pa.array([i * 1.25 for i in ids], pa.float64()),
            "zone": pa.array([f"z{i % 7}" for i in ids], pa.string()),
        }
    )


def test_file_matches_duckdb(tmp_path: Path, context: RecordingContext) -> None:
    path = tmp_path / "trips.parquet"
    pq.write_table(trips(1, 10_000), path, row_group_size=3000)
    source = make_source(context, path, batch_rows=1000)

    table, batches = read_all(source)

    expected = duckdb.sql(f"SELECT * FROM read_parquet('{path}')").arrow()
    if not isinstance(expected, pa.Table):  # duckdb 2.0 returns a batch reader
        expected = expected.read_all()
    assert table.equals(expected)
    assert max(b.batch.num_rows for b in batches) <= 1000
    assert batches[3].origin.position(0) == f"{path} row 3001"
    progress = source.progress()
    assert (progress.done, progress.total, progress.unit) == (10_000, 10_000, "records")


def test_directory_in_name_order(tmp_path: Path, context: RecordingContext) -> None:
    pq.write_table(trips(101, 50), tmp_path / "part-2.parquet")
    pq.write_table(trips(1, 100), tmp_path / "part-1.parquet")
    (tmp_path / "readme.txt").write_text("not parquet")

    table, _ = read_all(make_source(context, tmp_path))

    assert table.column("id").to_pylist() == list(range(1, 151))
    total = duckdb.sql(f"SELECT sum(fare) FROM read_parquet('{tmp_path}/*.parquet')")
    assert sum(table.column("fare").to_pylist()) == pytest.approx(
        total.fetchall()[0][0]
    )


def test_glob_and_columns(tmp_path: Path, context: RecordingContext) -> None:
    pq.write_table(trips(1, 5), tmp_path / "a.parquet")
    pq.write_table(trips(6, 5), tmp_path / "b.parquet")

    source = make_source(context, tmp_path / "b*.parquet", columns=["zone", "id"])
    table, _ = read_all(source)

    assert table.schema.names == ["zone", "id"]
    assert table.column("id").to_pylist() == [6, 7, 8, 9, 10]


def test_unknown_column_error(tmp_path: Path, context: RecordingContext) -> None:
    pq.write_table(trips(1, 5), tmp_path / "a.parquet")
    source = make_source(context, tmp_path, columns=["id", "fair"])

    with pytest.raises(ValueError, match="no field 'fair'; fields are: id, fare, zone"):
        source.schema()


def test_schema_and_columns_exclusive() -> None:
    with pytest.raises(ValidationError, match="set either `schema`"):
        ParquetSourceConfig.model_validate(
            {"path": "x", "schema": {"id": "int"}, "columns": ["id"]}
        )


def test_later_file_converted_to_first_schema(
    tmp_path: Path, context: RecordingContext
) -> None:
    pq.write_table(trips(1, 3), tmp_path / "a.parquet")
    later = pa.table(
        {"id": ["4", "five", "6"], "fare": pa.array([4, 5, 6], pa.int32())}
    )
    pq.write_table(later, tmp_path / "b.parquet")

    table, batches = read_all(make_source(context, tmp_path))

    assert table.column("id").to_pylist() == [1, 2, 3, 4, 6]
    assert table.column("fare").to_pylist() == [1.25, 2.5, 3.75, 4.0, 6.0]
    assert table.column("zone").to_pylist() == ["z1", "z2", "z3", None, None]
    assert len(context.rejected) == 1
    record, reason, position = context.rejected[0]
    assert record == {"id": "five", "fare": 5}
    assert reason.startswith("field 'id': value 'five' does not convert to int64")
    assert position == f"{tmp_path / 'b.parquet'} row 2"
    assert batches[-1].origin.position(0) == f"{tmp_path / 'b.parquet'} row 1"


def test_declared_schema_casts(tmp_path: Path, context: RecordingContext) -> None:
    pq.write_table(trips(1, 4), tmp_path / "a.parquet")
    source = make_source(context, tmp_path, schema={"id": "string", "fare": "float32"})

    table, _ = read_all(source)

    assert table.schema == pa.schema([("id", pa.string()), ("fare", pa.float32())])
    assert table.column("id").to_pylist() == ["1", "2", "3", "4"]


def test_incompatible_type_error(tmp_path: Path, context: RecordingContext) -> None:
    pq.write_table(trips(1, 2), tmp_path / "a.parquet")
    nested = pa.table({"id": pa.array([{"x": 1}])})
    pq.write_table(nested, tmp_path / "b.parquet")

    with pytest.raises(ValueError, match=r"b\.parquet: field 'id' has type struct"):
        read_all(make_source(context, tmp_path))


def test_incomplete_file_error(tmp_path: Path, context: RecordingContext) -> None:
    pq.write_table(trips(1, 2), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 still being written")

    with pytest.raises(ValueError, match=r"b\.parquet: cannot read as Parquet"):
        read_all(make_source(context, tmp_path))


def test_empty_directory_needs_schema(
    tmp_path: Path, context: RecordingContext
) -> None:
    with pytest.raises(ValueError, match="set `schema`"):
        make_source(context, tmp_path, follow=True).schema()


def test_follow_waits_for_complete_files(
    tmp_path: Path, context: RecordingContext
) -> None:
    pq.write_table(trips(1, 2), tmp_path / "a.parquet")
    source = make_source(context, tmp_path, follow=True, poll_interval="1ms")
    source.open()
    items = source.read()

    first = next(items)
    assert isinstance(first, SourceBatch)
    assert first.batch.column("id").to_pylist() == [1, 2]
    assert isinstance(next(items), Idle)

    partial = tmp_path / "b.parquet"
    partial.write_bytes(b"PAR1 half")
    assert isinstance(next(items), Idle)
    pq.write_table(trips(3, 2), tmp_path / "b.tmp")
    os.replace(tmp_path / "b.tmp", partial)
    second = next(items)
    assert isinstance(second, SourceBatch)
    assert second.batch.column("id").to_pylist() == [3, 4]

    context.stopping = True
    assert list(items) in ([], [Idle()])


def test_follow_pipeline_with_writer_thread(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    p = Pipeline("parquet-follow")
    files = p.source(
        "files",
        "parquet",
        path=str(incoming),
        follow=True,
        poll_interval="5ms",
        schema={"id": "int", "fare": "float", "zone": "string"},
    )
    p.destination("out", "memory", [files])
    run = PipelineRun(p.build())
    summaries = []
    runner = threading.Thread(target=lambda: summaries.append(run.run()))
    runner.start()

    def write_files() -> None:
        for index in range(5):
            temporary = incoming / f"part-{index}.parquet.tmp"
            pq.write_table(trips(index * 10 + 1, 10), temporary)
            os.replace(temporary, incoming / f"part-{index}.parquet")

    writer = threading.Thread(target=write_files)
    writer.start()
    writer.join()
    deadline = time.monotonic() + 20
    while run.snapshot().records_written < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    run.stop()
    runner.join(timeout=20)

    assert not runner.is_alive()
    summary = summaries[0]
    assert summary.status == "stopped"
    assert sorted(summary.output("out").column("id").to_pylist()) == list(range(1, 51))

"""Arrow IPC source and sink: file and stream formats, globs, directories."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather
import pytest
from conftest import RecordingContext

from dataflare import Pipeline
from dataflare.connectors.files.arrow_ipc import (
    ArrowIpcSink,
    ArrowIpcSinkConfig,
    ArrowIpcSource,
    ArrowIpcSourceConfig,
)
from dataflare.plugin.interface import SourceBatch
from dataflare.plugin.registry import PluginRegistry


def make_source(
    context: RecordingContext, path: Path | str, **config: Any
) -> ArrowIpcSource:
    return ArrowIpcSource(
        ArrowIpcSourceConfig.model_validate({"path": str(path), **config}), context
    )


def read_all(source: ArrowIpcSource) -> tuple[pa.Table, list[SourceBatch]]:
    source.open()
    batches = [item for item in source.read() if isinstance(item, SourceBatch)]
    table = pa.Table.from_batches([b.batch for b in batches], schema=source.schema())
    return table, batches


def ticks(first: int, count: int) -> pa.Table:
    ids = list(range(first, first + count))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "price": pa.array([i / 4 for i in ids], pa.float64()),
            "at": pa.array(
                [
                    dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i)
                    for i in ids
                ],
                pa.timestamp("us", tz="UTC"),
            ),
        }
    )


def write_file_format(path: Path, table: pa.Table, chunk: int) -> None:
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)


def write_stream_format(path: Path, table: pa.Table, chunk: int) -> None:
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)


@pytest.mark.parametrize("write", [write_file_format, write_stream_format])
def test_both_formats_read(write: Any, tmp_path: Path) -> None:
    path = tmp_path / "ticks.arrow"
    table = ticks(1, 1000)
    write(path, table, 300)
    context = RecordingContext()
    source = make_source(context, path)

    read_back, batches = read_all(source)

    assert read_back.equals(table)
    assert [b.batch.num_rows for b in batches] == [300, 300, 300, 100]
    assert batches[1].origin.position(0) == f"{path} row 301"
    progress = source.progress()
    assert (progress.done, progress.total) == (path.stat().st_size,) * 2
    assert context.rejected == []


def test_compressed_feather(tmp_path: Path, context: RecordingContext) -> None:
    path = tmp_path / "ticks.feather"
    table = ticks(1, 500)
    feather.write_feather(table, path, compression="zstd")

    read_back, _ = read_all(make_source(context, path))

    assert read_back.equals(feather.read_table(path))


def test_directory_mixes_formats(tmp_path: Path, context: RecordingContext) -> None:
    write_stream_format(tmp_path / "b.arrows", ticks(11, 10), 4)
    write_file_format(tmp_path / "a.arrow", ticks(1, 10), 4)
    (tmp_path / "c.csv").write_text("id\n99\n")

    table, _ = read_all(make_source(context, tmp_path))

    assert table.column("id").to_pylist() == list(range(1, 21))


def test_forced_format_mismatch_error(
    tmp_path: Path, context: RecordingContext
) -> None:
    path = tmp_path / "ticks.arrow"
    write_file_format(path, ticks(1, 3), 3)
    source = make_source(context, path, format="stream")

    with pytest.raises(ValueError, match=r"ticks\.arrow: cannot read as Arrow IPC"):
        source.schema()


def test_columns_and_missing_fields(tmp_path: Path, context: RecordingContext) -> None:
    write_file_format(tmp_path / "a.arrow", ticks(1, 2), 2)
    write_file_format(tmp_path / "b.arrow", ticks(3, 2).drop_columns(["price"]), 2)

    table, _ = read_all(make_source(context, tmp_path, columns=["price", "id"]))

    assert table.to_pylist() == [
        {"price": 0.25, "id": 1},
        {"price": 0.5, "id": 2},
        {"price": None, "id": 3},
        {"price": None, "id": 4},
    ]


def test_value_that_does_not_convert(tmp_path: Path, context: RecordingContext) -> None:
    write_file_format(
        tmp_path / "a.arrow", pa.table({"n": pa.array([1], pa.int8())}), 1
    )
    later = pa.table({"n": pa.array([5, 300, 7], pa.int64())})
    write_file_format(tmp_path / "b.arrow", later, 3)

    table, _ = read_all(make_source(context, tmp_path))

    assert table.column("n").to_pylist() == [1, 5, 7]
    assert len(context.rejected) == 1
    record, reason, position = context.rejected[0]
    assert record == {"n": 300}
    assert reason.startswith("field 'n': value 300 does not convert to int8")
    assert position == f"{tmp_path / 'b.arrow'} row 2"


def test_pipeline_reads_arrow(tmp_path: Path) -> None:
    write_stream_format(tmp_path / "ticks.arrows", ticks(1, 50), 7)
    p = Pipeline("arrow-read")
    source = p.source("ticks", "arrow", path=str(tmp_path / "*.arrows"))
    p.destination("out", "memory", [source])

    summary = p.run()

    assert summary.output("out").equals(ticks(1, 50))


# --- the sink ---------------------------------------------------------------------


def run_sink(config: dict[str, Any], batches: list[pa.RecordBatch]) -> ArrowIpcSink:
    sink = ArrowIpcSink(ArrowIpcSinkConfig.model_validate(config), RecordingContext())
    sink.open()
    for batch in batches:
        sink.write(batch)
    sink.flush()
    sink.close()
    return sink


@pytest.mark.parametrize("layout", ["file", "stream"])
def test_sink_formats(layout: str, tmp_path: Path) -> None:
    path = tmp_path / "out.arrow"
    table = ticks(1, 100)

    run_sink(
        {"path": str(path), "format": layout, "compression": "lz4"},
        table.to_batches(max_chunksize=30),
    )

    with pa.memory_map(str(path)) as source:
        if layout == "file":
            read_back = pa.ipc.open_file(source).read_all()
        else:
            read_back = pa.ipc.open_stream(source).read_all()
    assert read_back.equals(table)


def test_sink_rolls_and_source_reads_parts(tmp_path: Path) -> None:
    table = ticks(1, 1000)
    out = tmp_path / "parts"

    sink = run_sink(
        {"path": str(out), "roll_bytes": 4096}, table.to_batches(max_chunksize=100)
    )

    parts = sorted(out.glob("part-*.arrow"))
    assert len(parts) > 1
    assert sink.info().paths == [str(part) for part in parts]
    read_back, _ = read_all(make_source(RecordingContext(), out))
    assert read_back.equals(table)


def test_sink_in_pipeline(tmp_path: Path) -> None:
    registry = PluginRegistry.from_entry_points()
    registry.register("arrow", ArrowIpcSink)
    out = tmp_path / "out.arrow"
    p = Pipeline("arrow-write").use_registry(registry)
    rows = p.source("rows", "memory", records=ticks(1, 20))
    p.destination("file", "arrow", [rows], path=str(out), compression="zstd")

    p.run()

    assert feather.read_table(out).equals(ticks(1, 20))

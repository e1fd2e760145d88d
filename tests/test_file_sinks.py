"""File sinks: single files, rolling, atomic renames, empty output, overwrite.

Written files are read back with pandas or pyarrow and compared with the
records sent.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RecordingContext

from dataflare import api
from dataflare.connectors.files import writeback
from dataflare.connectors.files.csv import CsvSink, CsvSinkConfig
from dataflare.connectors.files.parquet import ParquetSink, ParquetSinkConfig
from dataflare.streaming.errors import PipelineRunError, PipelineValidationError
from dataflare.streaming.runner import PipelineRun

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string()), ("score", pa.float64())])


def batch(start: int, rows: int) -> pa.RecordBatch:
    ids = list(range(start, start + rows))
    return pa.RecordBatch.from_pydict(
        {"id": ids, "name": [f"n{i}" for i in ids], "score": [i / 4 for i in ids]},
        schema=SCHEMA,
    )


def csv_sink(path: Path, **config: Any) -> CsvSink:
    sink = CsvSink(
        CsvSinkConfig.model_validate({"path": str(path), **config}),
        RecordingContext("out"),
    )
    sink.input_schema = SCHEMA
    sink.open()
    return sink


def expected_frame(*batches: pa.RecordBatch) -> pd.DataFrame:
    return pa.Table.from_batches(batches).to_pandas()


def test_single_file_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "out" / "result.csv"
    sink = csv_sink(path)
    sink.write(batch(0, 5))
    assert not path.exists()
    assert (tmp_path / "out" / "result.csv.inprogress").exists()
    sink.write(batch(5, 5))
    sink.flush()
    sink.close()
    assert pd.read_csv(path).equals(expected_frame(batch(0, 5), batch(5, 5)))
    assert list((tmp_path / "out").iterdir()) == [path]
    assert sink.info().paths == [str(path)]


def test_no_records_gives_valid_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    sink = csv_sink(path)
    sink.flush()
    sink.close()
    frame = pd.read_csv(path)
    assert list(frame.columns) == SCHEMA.names
    assert len(frame) == 0


def test_no_records_parquet_has_schema(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    sink = ParquetSink(ParquetSinkConfig(path=str(path)), RecordingContext("out"))
    sink.input_schema = SCHEMA
    sink.open()
    sink.flush()
    table = pq.read_table(path)
    assert table.num_rows == 0
    assert table.schema.equals(SCHEMA)


def test_close_without_flush_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "failed.csv"
    sink = csv_sink(path)
    sink.write(batch(0, 3))
    sink.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["", "   "])
def test_empty_path_rejected(path: str) -> None:
    with pytest.raises(ValueError, match="is empty; name the output file"):
        CsvSinkConfig.model_validate({"path": path})


def test_failed_close_removes_new_folders(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.txt").write_text("x\n")
    new_folders = [tmp_path / "new" / "deeper", tmp_path / "kept" / "inner"]
    sinks = [csv_sink(folder / "failed.csv") for folder in new_folders]
    sinks.append(csv_sink(tmp_path / "rolled" / "parts", roll_bytes=1 << 20))
    for sink in sinks:
        sink.write(batch(0, 3))
        sink.close()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["other.txt"]


def test_overwrite_false_rejects_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "exists.csv"
    path.write_text("keep me\n")
    with pytest.raises(FileExistsError, match="exists and overwrite is false"):
        csv_sink(path, overwrite=False)
    assert path.read_text() == "keep me\n"


def test_overwrite_false_when_file_appears_during_run(tmp_path: Path) -> None:
    path = tmp_path / "late.csv"
    sink = csv_sink(path, overwrite=False)
    sink.write(batch(0, 2))
    path.write_text("written by someone else\n")
    with pytest.raises(FileExistsError, match="appeared while the run wrote it"):
        sink.flush()
    assert path.read_text() == "written by someone else\n"
    assert not (tmp_path / "late.csv.inprogress").exists()


def test_overwrite_true_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "replace.csv"
    path.write_text("old\n")
    sink = csv_sink(path)
    sink.write(batch(0, 2))
    sink.flush()
    assert pd.read_csv(path).equals(expected_frame(batch(0, 2)))


def test_roll_by_bytes(tmp_path: Path) -> None:
    directory = tmp_path / "parts"
    sink = csv_sink(directory, roll_bytes=300)
    batches = [batch(i * 10, 10) for i in range(10)]
    for item in batches:
        sink.write(item)
    sink.flush()
    parts = sorted(directory.iterdir())
    assert [p.name for p in parts] == [f"part-{i:05d}.csv" for i in range(len(parts))]
    assert len(parts) > 1
    assert sink.info().paths == [str(p) for p in parts]
    whole = pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)
    assert whole.equals(expected_frame(*batches))
    # Each file is rolled once it reaches the size, so only its last batch
    # may take it past the limit.
    largest_batch = max(
        len(pa.Table.from_batches([b]).to_pandas().to_csv()) for b in batches
    )
    assert all(p.stat().st_size < 300 + largest_batch for p in parts)


def test_roll_by_interval(tmp_path: Path) -> None:
    directory = tmp_path / "parts"
    # An interval shorter than any write: every batch ends its file.
    sink = csv_sink(directory, roll_interval="1us")
    for index in range(3):
        sink.write(batch(index * 2, 2))
    sink.flush()
    parts = sorted(directory.iterdir())
    assert len(parts) == 3
    assert [pd.read_csv(p)["id"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]


ROLL_INTERVAL_ERROR = (
    "roll_interval must be longer than zero; set the age at which a new part file "
    "starts, for example 1h or 30s, or remove roll_interval to write one file"
)
ROLL_BYTES_ERROR = (
    "roll_bytes must be a positive number of bytes; set the size at which a new "
    "part file starts, for example 100000000 for about 100 MB, or remove "
    "roll_bytes to write one file"
)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"roll_interval": "0s"}, ROLL_INTERVAL_ERROR),
        ({"roll_interval": 0}, ROLL_INTERVAL_ERROR),
        ({"roll_interval": "0.0ms"}, ROLL_INTERVAL_ERROR),
        ({"roll_interval": "-1s"}, ROLL_INTERVAL_ERROR),
        ({"roll_interval": " -5m"}, ROLL_INTERVAL_ERROR),
        ({"roll_interval": -2.5}, ROLL_INTERVAL_ERROR),
        ({"roll_bytes": 0}, ROLL_BYTES_ERROR),
        ({"roll_bytes": -5}, ROLL_BYTES_ERROR),
    ],
)
def test_roll_limits_must_be_positive(
    tmp_path: Path, setting: dict[str, Any], message: str
) -> None:
    pipeline = api.Pipeline("rolls")
    source = pipeline.source("src", "memory", records=[{"id": 1}])
    pipeline.destination("out", "csv", [source], path=str(tmp_path), **setting)

    with pytest.raises(PipelineValidationError) as caught:
        pipeline.build()

    [issue] = caught.value.issues
    [key] = setting
    assert issue.path == ("destinations", "out", "config", key)
    assert issue.message == message


def test_smallest_positive_roll_limits_accepted() -> None:
    config = CsvSinkConfig.model_validate(
        {"path": "out", "roll_interval": "1us", "roll_bytes": 1}
    )

    assert config.roll_interval is not None
    assert config.roll_interval.total_seconds() == 1e-6
    assert config.roll_bytes == 1


def test_rolling_with_no_records_writes_one_empty_part(tmp_path: Path) -> None:
    directory = tmp_path / "parts"
    sink = csv_sink(directory, roll_bytes=100)
    sink.flush()
    assert [p.name for p in directory.iterdir()] == ["part-00000.csv"]
    assert list(pd.read_csv(directory / "part-00000.csv").columns) == SCHEMA.names


def test_rolling_overwrite(tmp_path: Path) -> None:
    directory = tmp_path / "parts"
    directory.mkdir()
    (directory / "part-00007.csv").write_text("old\n")
    (directory / "part-00008.csv.inprogress").write_text("half\n")
    (directory / "other.txt").write_text("not a part\n")
    with pytest.raises(FileExistsError, match="already has part files"):
        csv_sink(directory, roll_bytes=100, overwrite=False)
    sink = csv_sink(directory, roll_bytes=10_000)
    sink.write(batch(0, 3))
    sink.flush()
    assert sorted(p.name for p in directory.iterdir()) == [
        "other.txt",
        "part-00000.csv",
    ]


def test_rolling_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file.csv"
    path.write_text("x\n")
    with pytest.raises(NotADirectoryError, match="needs a directory"):
        csv_sink(path, roll_bytes=100)


@pytest.mark.parametrize("rolling", [{}, {"roll_bytes": 100}])
def test_path_under_a_file_names_the_file(
    tmp_path: Path, rolling: dict[str, Any]
) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x\n")
    message = f"cannot be created: {blocker} is a file, not a folder"
    with pytest.raises(NotADirectoryError, match=message):
        csv_sink(blocker / "sub" / "out.csv", **rolling)


def test_batches_cast_to_first_schema(tmp_path: Path) -> None:
    path = tmp_path / "cast.csv"
    sink = csv_sink(path)
    sink.write(batch(0, 1))
    narrow = pa.RecordBatch.from_pydict(
        {
            "id": pa.array([7], pa.int32()),
            "name": ["x"],
            "score": pa.array([1.5], pa.float32()),
        }
    )
    sink.write(narrow)
    renamed = pa.RecordBatch.from_pydict({"key": [1], "name": ["x"], "score": [1.0]})
    with pytest.raises(ValueError, match="must have the same fields"):
        sink.write(renamed)
    sink.flush()
    assert pd.read_csv(path)["id"].tolist() == [0, 7]


def test_csv_sink_rejects_nested_fields(tmp_path: Path) -> None:
    sink = CsvSink(CsvSinkConfig(path=str(tmp_path / "x.csv")), RecordingContext())
    sink.input_schema = pa.schema([("tags", pa.list_(pa.string()))])
    with pytest.raises(ValueError, match="nested field\\(s\\) tags"):
        sink.open()


def test_csv_round_trip_through_engine(tmp_path: Path) -> None:
    source_path = tmp_path / "in.csv"
    frame = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "text": ["plain", 'with "quotes"', "two\nlines"],
            "when": pd.to_datetime(
                ["2013-01-01 05:00", "2013-01-02 06:30", None], utc=True
            ),
        }
    )
    frame.to_csv(source_path, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
    out = tmp_path / "out.csv"
    p = api.Pipeline("round-trip")
    rows = p.source("rows", "csv", path=str(source_path))
    p.destination("out", "csv", [rows], path=str(out))
    summary = p.run()
    assert summary.records_written == 3
    back = pd.read_csv(out, parse_dates=["when"])
    assert back["id"].tolist() == [1, 2, 3]
    assert back["text"].tolist() == frame["text"].tolist()
    assert back["when"].dt.tz_convert("UTC").tolist()[:2] == frame["when"].tolist()[:2]
    assert summary.outputs["out"] == [str(out)]


def test_overwrite_false_fails_run_naming_step(tmp_path: Path) -> None:
    out = tmp_path / "taken.csv"
    out.write_text("x\n")
    p = api.Pipeline("taken")
    rows = p.source("rows", "memory", records=[{"a": 1}])
    p.destination("write", "csv", [rows], path=str(out), overwrite=False)
    with pytest.raises(
        PipelineRunError, match=r"step 'write' failed: output file .* exists"
    ):
        p.run()
    assert out.read_text() == "x\n"


def test_filter_removing_all_records_writes_header(tmp_path: Path) -> None:
    out = tmp_path / "none.csv"
    p = api.Pipeline("none")
    rows = p.source("rows", "memory", records=[{"a": 1, "b": "x"}])
    kept = p.transform("kept", "filter", [rows], condition="a > 5")
    p.destination("out", "csv", [kept], path=str(out))
    summary = p.run()
    assert summary.records_written == 0
    assert out.read_text() == '"a","b"\n'


def wait_for(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_roll_interval_closes_idle_file(tmp_path: Path) -> None:
    directory = tmp_path / "parts"
    sink = csv_sink(directory, roll_interval="100ms")
    sink.write(batch(0, 3))

    # No further write: the timer closes the file once it is 100 ms old.
    first = directory / "part-00000.csv"
    assert wait_for(first.exists)
    assert not list(directory.glob(".*inprogress"))
    assert pd.read_csv(first).equals(expected_frame(batch(0, 3)))
    assert sink.info().paths == [str(first)]

    sink.write(batch(3, 2))
    sink.flush()
    sink.close()
    parts = sorted(directory.iterdir())
    assert [p.name for p in parts] == ["part-00000.csv", "part-00001.csv"]
    assert pd.read_csv(parts[1]).equals(expected_frame(batch(3, 2)))


def test_roll_interval_idle_file_in_pipeline(tmp_path: Path) -> None:
    source = tmp_path / "live.jsonl"
    source.write_bytes(b'{"id": 1}\n{"id": 2}\n')
    out = tmp_path / "parts"
    p = api.Pipeline("idle-roll")
    live = p.source(
        "live",
        "jsonl",
        path=str(source),
        follow=True,
        poll_interval="5ms",
        schema={"id": "int"},
    )
    p.destination("out", "jsonl", [live], path=str(out), roll_interval="200ms")
    run = PipelineRun(p.build())
    runner = threading.Thread(target=run.run)
    runner.start()
    try:
        # The input stays idle after two lines, yet the part file is published.
        published = out / "part-00000.jsonl"
        assert wait_for(published.exists)
        assert pl.read_ndjson(published)["id"].to_list() == [1, 2]
    finally:
        run.stop()
        runner.join(timeout=20)
    assert not runner.is_alive()


def test_roll_timer_error_fails_next_write(tmp_path: Path) -> None:
    directory = tmp_path / "parts"
    sink = csv_sink(directory, roll_interval="50ms", overwrite=False)
    sink.write(batch(0, 2))
    (directory / "part-00000.csv").write_text("written by someone else\n")

    # The timer's rename finds the file, and the next write raises the error.
    assert wait_for(lambda: not list(directory.glob(".*inprogress")))
    with pytest.raises(FileExistsError, match="appeared while the run wrote it"):
        sink.write(batch(2, 2))
    sink.close()
    assert (directory / "part-00000.csv").read_text() == "written by someone else\n"


class _RecordedCalls:
    """Wraps the C library's sync_file_range and records each call."""

    def __init__(self, real: Any, result: int | None = None) -> None:
        self.real = real
        self.result = result
        self.calls: list[tuple[int, int]] = []

    def __call__(self, fd: int, offset: int, length: int, flags: int) -> int:
        self.calls.append((offset, length))
        if self.result is not None:
            return self.result
        return int(self.real(fd, offset, length, flags))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> _RecordedCalls:
    real = writeback._sync_file_range()
    if real is None:
        pytest.skip("sync_file_range exists on Linux only")
    calls = _RecordedCalls(real)
    monkeypatch.setattr(writeback, "_sync_file_range", lambda: calls)
    monkeypatch.setattr(writeback, "STEP_BYTES", 64 << 10)
    return calls


def _write_batches(path: Path) -> list[pa.RecordBatch]:
    """Write 20 batches of 2,000 rows through a CSV sink; return them."""
    sink = csv_sink(path)
    batches = [batch(i * 2000, 2000) for i in range(20)]
    for item in batches:
        sink.write(item)
    sink.flush()
    sink.close()
    return batches


def test_writeback_starts_in_steps(tmp_path: Path, recorded: _RecordedCalls) -> None:
    path = tmp_path / "result.csv"
    batches = _write_batches(path)

    size = path.stat().st_size
    assert pd.read_csv(path).equals(expected_frame(*batches))
    assert len(recorded.calls) >= size // (128 << 10)
    ends = [offset + length for offset, length in recorded.calls]
    assert [offset for offset, _ in recorded.calls] == [0, *ends[:-1]]
    assert all(length >= 64 << 10 for _, length in recorded.calls)
    assert ends[-1] <= size


def test_writeback_failure_stops_calls(
    tmp_path: Path, recorded: _RecordedCalls
) -> None:
    recorded.result = -1
    path = tmp_path / "result.csv"
    batches = _write_batches(path)

    assert len(recorded.calls) == 1
    assert pd.read_csv(path).equals(expected_frame(*batches))

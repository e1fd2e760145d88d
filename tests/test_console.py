"""Console sink: tables on standard output, row limits, column widths."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import pytest
from conftest import RecordingContext

from dataflare import Pipeline
from dataflare.connectors.console import ConsoleSink, ConsoleSinkConfig


def run_sink(batches: list[pa.RecordBatch], **config: Any) -> ConsoleSink:
    sink = ConsoleSink(
        ConsoleSinkConfig.model_validate(config), RecordingContext("peek")
    )
    sink.open()
    for batch in batches:
        sink.write(batch)
    sink.flush()
    return sink


def numbered(first: int, count: int) -> pa.RecordBatch:
    ids = list(range(first, first + count))
    return pa.record_batch({"id": ids, "name": [f"name-{i}" for i in ids]})


def test_table_shows_values(capsys: pytest.CaptureFixture[str]) -> None:
    batch = pa.record_batch(
        {
            "id": [1, 2],
            "city": ["Oslo", None],
            "at": pa.array(
                [dt.datetime(2024, 1, 1, 8, 30, tzinfo=dt.UTC), None],
                pa.timestamp("us", tz="UTC"),
            ),
            "tags": [["a", "b"], []],
        }
    )

    run_sink([batch], width=100)

    out = capsys.readouterr().out
    assert "peek: batch 1" in out
    for text in (
        "id",
        "city",
        "at",
        "tags",
        "Oslo",
        "2024-01-01T08:30:00Z",
        '["a","b"]',
    ):
        assert text in out
    assert "null" in out
    assert "2 rows" in out
    assert "peek: 2 records in 1 batches, 2 printed" in out


def test_rows_per_batch_limit(capsys: pytest.CaptureFixture[str]) -> None:
    run_sink([numbered(1, 10)], rows_per_batch=3, width=100)

    out = capsys.readouterr().out
    assert "name-3" in out
    assert "name-4" not in out
    assert "3 of 10 rows" in out


def test_total_row_limit(capsys: pytest.CaptureFixture[str]) -> None:
    sink = run_sink(
        [numbered(1, 4), numbered(5, 4), numbered(9, 4), numbered(13, 4)],
        rows_per_batch=4,
        max_rows=6,
        width=100,
    )

    out = capsys.readouterr().out
    assert "name-6" in out
    assert "name-7" not in out
    assert "2 of 4 rows" in out
    assert out.count("printed 6 rows, the max_rows limit") == 1
    assert "peek: 16 records in 4 batches, 6 printed" in out
    assert sink.info().paths == ["<stdout>"]


def test_long_values_cut(capsys: pytest.CaptureFixture[str]) -> None:
    long_text = "x" * 200
    run_sink([pa.record_batch({"text": [long_text]})], max_column_width=12, width=100)

    out = capsys.readouterr().out
    assert long_text not in out
    assert "x" * 11 + "…" in out


def test_markup_in_values_printed_as_is(capsys: pytest.CaptureFixture[str]) -> None:
    run_sink([pa.record_batch({"text": ["[bold]not bold[/bold]"]})], width=100)

    assert "[bold]not bold[/bold]" in capsys.readouterr().out


def test_console_in_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    p = Pipeline("console")
    rows = p.source("rows", "memory", records=[{"id": 7, "name": "seven"}])
    p.destination("peek", "console", [rows], width=80)

    summary = p.run()

    out = capsys.readouterr().out
    assert "seven" in out
    assert "peek: 1 records in 1 batches, 1 printed" in out
    assert summary.records_written == 1

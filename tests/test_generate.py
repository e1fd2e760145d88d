"""Generate source: field generators, seeds, batch sizes, rates, stopping."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pytest
from conftest import RecordingContext
from pydantic import ValidationError

from dataflare import Pipeline
from dataflare.connectors.generate import (
    UNLIMITED_BATCH_ROWS,
    GenerateSource,
    GenerateSourceConfig,
)
from dataflare.plugin.interface import Idle, SourceBatch
from dataflare.streaming.runner import PipelineRun

UTC = dt.UTC


def make_source(
    context: RecordingContext | None = None, **config: Any
) -> GenerateSource:
    return GenerateSource(
        GenerateSourceConfig.model_validate(config), context or RecordingContext()
    )


def generate(**config: Any) -> tuple[pa.Table, list[SourceBatch | Idle]]:
    source = make_source(**config)
    source.open()
    items = list(source.read())
    batches = [item.batch for item in items if isinstance(item, SourceBatch)]
    return pa.Table.from_batches(batches, schema=source.schema()), items


FIELDS = {
    "id": "sequence",
    "user": {"type": "int", "min": 1, "max": 6},
    "price": {"type": "float", "min": 10, "max": 20, "decimals": 2},
    "page": {"type": "choice", "values": ["home", "cart", "pay"], "weights": [6, 4, 0]},
    "mobile": {"type": "bool", "probability": 0.25},
    "source": {"type": "constant", "value": "web"},
    "note": {"type": "int", "nulls": 0.5},
}


def test_schema_types() -> None:
    schema = make_source(fields={**FIELDS, "at": "timestamp"}).schema()

    assert schema == pa.schema(
        [
            ("id", pa.int64()),
            ("user", pa.int64()),
            ("price", pa.float64()),
            ("page", pa.string()),
            ("mobile", pa.bool_()),
            ("source", pa.string()),
            ("note", pa.int64()),
            ("at", pa.timestamp("us", tz="UTC")),
        ]
    )


def test_default_fields() -> None:
    assert make_source().schema().names == ["id", "timestamp"]


def test_values_follow_specs() -> None:
    table, _ = generate(fields=FIELDS, count=10_000, seed=1)

    assert table.num_rows == 10_000
    assert table.column("id").to_pylist() == list(range(1, 10_001))
    users = table.column("user").to_pylist()
    assert set(users) == {1, 2, 3, 4, 5, 6}  # both ends are included
    prices = table.column("price").to_pylist()
    assert all(10 <= p <= 20 for p in prices)
    assert all(round(p, 2) == p for p in prices)
    pages = Counter(table.column("page").to_pylist())
    assert set(pages) == {"home", "cart"}  # weight 0 is never picked
    assert 0.55 < pages["home"] / 10_000 < 0.65
    mobile_share = sum(table.column("mobile").to_pylist()) / 10_000
    assert 0.2 < mobile_share < 0.3
    assert set(table.column("source").to_pylist()) == {"web"}
    null_share = table.column("note").null_count / 10_000
    assert 0.45 < null_share < 0.55


def test_seed_reproduces_values() -> None:
    first, _ = generate(fields=FIELDS, count=500, seed=42)
    again, _ = generate(fields=FIELDS, count=500, seed=42, batch_rows=7)
    other, _ = generate(fields=FIELDS, count=500, seed=43)

    assert first.equals(again)
    assert first.column("user") != other.column("user")


def test_field_values_independent_of_other_fields() -> None:
    alone, _ = generate(fields={"user": FIELDS["user"]}, count=100, seed=5)
    together, _ = generate(fields=FIELDS, count=100, seed=5)

    assert alone.column("user").equals(together.column("user"))


def test_timestamps_with_start_step_jitter() -> None:
    fields = {
        "at": {"type": "timestamp", "start": "2024-01-01T00:00:00Z", "step": "250ms"},
        "late": {
            "type": "timestamp",
            "start": "2024-01-01T00:00:00",
            "step": "1s",
            "jitter": "2s",
        },
    }

    table, _ = generate(fields=fields, count=100, seed=3)

    start = dt.datetime(2024, 1, 1, tzinfo=UTC)
    expected = [start + dt.timedelta(milliseconds=250 * i) for i in range(100)]
    assert table.column("at").to_pylist() == expected
    for i, value in enumerate(table.column("late").to_pylist()):
        scheduled = start + dt.timedelta(seconds=i)
        assert scheduled - dt.timedelta(seconds=2) <= value <= scheduled
    late = table.column("late").to_pylist()
    assert any(b < a for a, b in itertools.pairwise(late))  # out of order


def test_wall_clock_timestamps() -> None:
    before = dt.datetime.now(UTC)
    table, _ = generate(fields={"now": "timestamp"}, count=10)
    after = dt.datetime.now(UTC)

    for value in table.column("now").to_pylist():
        assert before - dt.timedelta(milliseconds=1) <= value <= after


def test_batch_sizes() -> None:
    _, unlimited = generate(count=100_000)
    _, limited = generate(count=40, rate=1000)

    sizes = [b.batch.num_rows for b in unlimited if isinstance(b, SourceBatch)]
    assert sizes == [UNLIMITED_BATCH_ROWS, 100_000 - UNLIMITED_BATCH_ROWS]
    sizes = [b.batch.num_rows for b in limited if isinstance(b, SourceBatch)]
    assert sizes == [10, 10, 10, 10]  # 10 ms of records at 1000 per second
    assert any(isinstance(item, Idle) for item in limited)


def test_progress_in_records() -> None:
    bounded = make_source(count=25, batch_rows=10)
    bounded.open()
    items = bounded.read()

    next(items)

    assert bounded.bounded
    assert bounded.progress() is not None
    assert (bounded.progress().done, bounded.progress().total) == (10, 25)
    assert bounded.progress().unit == "records"
    unbounded = make_source(rate=10)
    unbounded.open()
    assert not unbounded.bounded
    assert unbounded.progress() is None


def test_count_zero_makes_no_records() -> None:
    table, items = generate(count=0)

    assert table.num_rows == 0
    assert items == []


def test_stops_when_asked() -> None:
    context = RecordingContext()
    source = make_source(context, batch_rows=5)
    source.open()
    items = source.read()

    next(items)
    next(items)
    context.stopping = True

    assert list(items) == []


def test_unbounded_pipeline_stopped() -> None:
    p = Pipeline("generate-stop")
    clicks = p.source(
        "clicks", "generate", rate=2000, seed=1, fields={"id": "sequence"}
    )
    p.destination("out", "memory", [clicks])
    run = PipelineRun(p.build())
    summaries = []
    runner = threading.Thread(target=lambda: summaries.append(run.run()))
    runner.start()

    deadline = time.monotonic() + 20
    while run.snapshot().records_written < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    run.stop()
    runner.join(timeout=20)

    assert not runner.is_alive()
    summary = summaries[0]
    assert summary.status == "stopped"
    ids = summary.output("out").column("id").to_pylist()
    assert len(ids) >= 50
    assert ids == list(range(1, len(ids) + 1))


def test_event_time_from_generated_field() -> None:
    p = Pipeline("generate-event-time")
    clicks = p.source(
        "clicks",
        "generate",
        count=5,
        fields={"at": {"type": "timestamp", "start": "2024-05-01T12:00:00Z"}},
        event_time={"field": "at"},
    )
    p.destination("out", "memory", [clicks], include_metadata=True)

    table = p.run().output("out")

    assert table.column("_event_time").to_pylist() == table.column("at").to_pylist()
    assert table.column("at").to_pylist()[-1] == dt.datetime(
        2024, 5, 1, 12, 0, 4, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": {"type": "int", "min": 5, "max": 1}}, "min \\(5\\) is greater than max"),
        (
            {"c": {"type": "choice", "values": ["a", "b"], "weights": [1]}},
            "weights has 1 entries but values has 2",
        ),
        ({"c": {"type": "choice", "values": ["a", 1]}}, "must all have one type"),
        ({"x": "uuid"}, "does not match any of the expected tags"),
        ({"n": {"type": "int", "maximum": 3}}, "maximum"),
    ],
)
def test_invalid_field_specs(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GenerateSourceConfig.model_validate({"fields": fields})

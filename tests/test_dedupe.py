"""Tests of the `dedupe` transformation."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pyarrow as pa
import pytest
from pydantic import ValidationError

from dataflare import Pipeline, PipelineValidationError
from dataflare.transforms.dedupe import DedupeTransform

UTC = dt.UTC
START = dt.datetime(2024, 1, 1, tzinfo=UTC)
SCHEMA = pa.schema(
    [
        ("sensor", pa.string()),
        ("value", pa.int64()),
        ("_event_time", pa.timestamp("us", "UTC")),
    ]
)


def at(seconds: float) -> dt.datetime:
    return START + dt.timedelta(seconds=seconds)


def micros(seconds: float) -> int:
    return int(
        (at(seconds) - dt.datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1e6
    )


def batch(*rows: tuple[str | None, int, float | None]) -> pa.RecordBatch:
    records = [
        {"sensor": s, "value": v, "_event_time": None if t is None else at(t)}
        for s, v, t in rows
    ]
    return pa.RecordBatch.from_pylist(records, schema=SCHEMA)


def make(context: Any, within: str = "10s", key: Any = "sensor") -> DedupeTransform:
    transform = DedupeTransform(DedupeTransform.Config(key=key, within=within), context)
    transform.output_schema([SCHEMA])
    transform.open()
    return transform


def values(batches: list[pa.RecordBatch]) -> list[int]:
    return [row["value"] for b in batches for row in b.to_pylist()]


def reference_dedupe(
    rows: list[tuple[str | None, int, float]], within: float
) -> list[int]:
    """Keep a record unless a kept record of its key is less than `within` away."""
    kept: dict[str | None, list[float]] = {}
    out = []
    for sensor, value, time in rows:
        times = kept.setdefault(sensor, [])
        if all(abs(time - other) >= within for other in times):
            times.append(time)
            out.append(value)
    return out


def test_dedupe_drops_within_span(context: Any) -> None:
    transform = make(context)
    out = transform.process(
        batch(("a", 1, 0), ("a", 2, 6), ("a", 3, 12), ("b", 4, 1), ("a", 5, 9.999))
    )
    # 6 is 6 s after the kept 0; 12 is 12 s after 0 (6 was dropped, so it does
    # not count); 9.999 is within 10 s of both 0 and 12.
    assert values(out) == [1, 3, 4]
    assert context.counters["duplicates"] == 2


def test_dedupe_across_batches_and_out_of_order(context: Any) -> None:
    transform = make(context)
    assert values(transform.process(batch(("a", 1, 100), ("b", 2, 100)))) == [1, 2]
    assert values(transform.process(batch(("a", 3, 91)))) == []  # 9 s before
    assert values(transform.process(batch(("a", 4, 90)))) == [4]  # exactly 10 s
    assert values(transform.process(batch(("b", 5, 109.5), ("c", 6, 0)))) == [6]
    assert context.counters["duplicates"] == 2


def test_dedupe_null_keys_equal(context: Any) -> None:
    transform = make(context, key=["sensor", "value"])
    out = transform.process(
        batch((None, 1, 0), (None, 1, 1), (None, None, 2), ("a", 1, 3))
    )
    rows = [(r["sensor"], r["value"]) for b in out for r in b.to_pylist()]
    assert rows == [(None, 1), (None, None), ("a", 1)]


def test_dedupe_watermark_evicts_state(context: Any) -> None:
    transform = make(context)
    transform.process(batch(("a", 1, 0), ("b", 2, 30)))
    transform.on_watermark(micros(5))
    assert values(transform.process(batch(("a", 3, 8)))) == []  # state still held
    transform.on_watermark(micros(20))
    # The kept time 0 s is evicted: 20 - 10 has passed it. A late record at
    # 8 s is compared only with what is left, so it passes.
    assert values(transform.process(batch(("a", 4, 8)))) == [4]
    assert values(transform.process(batch(("b", 5, 35)))) == []


def test_dedupe_rejects_missing_event_time(context: Any) -> None:
    transform = make(context)
    out = transform.process(batch(("a", 1, None), ("a", 2, 0)))
    assert values(out) == [2]
    [(record, reason, _)] = context.rejected
    assert record["value"] == 1
    assert reason.startswith("missing event time")


def test_dedupe_empty_batch(context: Any) -> None:
    assert make(context).process(batch()) == []
    assert context.counters == {}


def test_dedupe_matches_reference(context: Any) -> None:
    rng = random.Random(5)
    rows = [(rng.choice("abcde"), i, rng.uniform(0, 120)) for i in range(400)]
    transform = make(context, within="15s")
    out = []
    for start in range(0, len(rows), 33):
        out.extend(transform.process(batch(*rows[start : start + 33])))
    assert values(out) == reference_dedupe(rows, 15)
    assert context.counters["duplicates"] == len(rows) - len(values(out))


def test_dedupe_config_and_schema_errors(context: Any) -> None:
    with pytest.raises(ValidationError, match="invalid duration"):
        DedupeTransform.Config(key=["a"], within="ten minutes")
    with pytest.raises(ValidationError, match="within must be more than 0"):
        DedupeTransform.Config(key=["a"], within=0)
    no_time = pa.schema([("sensor", pa.string())])
    transform = DedupeTransform(
        DedupeTransform.Config(key="sensor", within="1m"), context
    )
    with pytest.raises(ValueError, match="set `event_time` on the source"):
        transform.output_schema([no_time])
    assert transform.partition_key() == ["sensor"]


def test_dedupe_without_event_time_fails_build() -> None:
    p = Pipeline("dedupe-no-time")
    rows = p.source("rows", "memory", records=[{"sensor": "a"}])
    unique = p.transform("unique", "dedupe", [rows], key=["sensor"], within="1m")
    p.destination("out", "memory", [unique])
    with pytest.raises(PipelineValidationError, match="set `event_time` on the source"):
        p.build()


def test_dedupe_misspelt_key_fails_build() -> None:
    p = Pipeline("dedupe-misspelt")
    rows = p.source(
        "rows", "memory", records=[{"sensor": "a", "t": 0}], event_time={"field": "t"}
    )
    unique = p.transform("unique", "dedupe", [rows], key=["senser"], within="1m")
    p.destination("out", "memory", [unique])
    with pytest.raises(PipelineValidationError) as error:
        p.build()
    message = str(error.value)
    assert "transformations.unique.config.key" in message
    assert "'senser'" in message
    assert "'sensor'" in message  # the suggested field


def test_dedupe_pipeline_matches_reference() -> None:
    rng = random.Random(9)
    rows = [
        (rng.choice("abcdef"), i, float(i * 2 + rng.choice([0, 1]))) for i in range(300)
    ]
    records = [{"sensor": s, "value": v, "t": t} for s, v, t in rows]
    p = Pipeline("dedupe-e2e")
    source = p.source(
        "rows",
        "memory",
        records=records,
        batch_rows=25,
        event_time={"field": "t", "format": "unix_s"},
        watermark={"max_out_of_orderness": "30s"},
    )
    unique = p.transform(
        "unique", "dedupe", [source], key=["sensor"], within="20s", parallelism=2
    )
    p.destination("out", "memory", [unique])
    summary = p.run()
    out = summary.output("out").sort_by("value")
    assert out.column("value").to_pylist() == reference_dedupe(rows, 20)
    assert summary.step("unique").counters["duplicates"] == len(rows) - out.num_rows

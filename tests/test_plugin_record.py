"""PluginRecord views: values, stream metadata, the mapping API and zero copy."""

from __future__ import annotations

import datetime as dt
import decimal
import gc
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from dataflare.plugin.record import (
    PluginRecord,
    RecordBatchView,
    UnknownFieldError,
    column_getter,
)

UTC = dt.UTC


def typed_batch() -> pa.RecordBatch:
    """A batch with one column of each kind of type, with nulls."""
    return pa.record_batch(
        {
            "i8": pa.array([1, None, -3, 4], pa.int8()),
            "u32": pa.array([1, 2, None, 4_000_000_000], pa.uint32()),
            "i64": pa.array([10, 20, 30, -(2**62)], pa.int64()),
            "f32": pa.array([1.5, None, -2.25, 0.0], pa.float32()),
            "f64": pa.array([0.1, 2.5, None, 1e300], pa.float64()),
            "flag": pa.array([True, False, None, True]),
            "name": pa.array(["JFK", None, "", "Zürich"]),
            "large": pa.array(["a", "bb", None, "dddd"], pa.large_string()),
            "blob": pa.array([b"\x00\x01", None, b"", b"xyz"], pa.binary()),
            "day": pa.array(
                [dt.date(2013, 1, 1), None, dt.date(1969, 12, 31), dt.date(2100, 2, 28)]
            ),
            "naive": pa.array(
                [dt.datetime(2013, 1, 1, 5, 15), None, dt.datetime(1960, 1, 1), None],
                pa.timestamp("us"),
            ),
            "seconds": pa.array(
                [dt.datetime(2013, 1, 1, tzinfo=UTC), None, None, None],
                pa.timestamp("s", tz="UTC"),
            ),
            "millis": pa.array(
                [None, dt.datetime(2013, 6, 1, 12, 0, 0, 5000, tzinfo=UTC), None, None],
                pa.timestamp("ms", tz="UTC"),
            ),
            "tags": pa.array([["a"], None, [], ["b", "c"]]),
            "price": pa.array(
                [decimal.Decimal("1.50"), None, decimal.Decimal("-2.00"), None],
                pa.decimal128(5, 2),
            ),
            "point": pa.array(
                [{"x": 1}, None, {"x": 3}, {"x": None}], pa.struct([("x", pa.int64())])
            ),
            "empty": pa.array([None, None, None, None], pa.int64()),
        }
    )


def test_values_match_arrow_for_every_type() -> None:
    batch = typed_batch()
    expected = batch.to_pylist()
    view = RecordBatchView(batch)
    for record in view:
        for name in batch.schema.names:
            assert record[name] == expected[record.row][name], (name, record.row)


def test_values_match_arrow_in_sliced_batch() -> None:
    # A slice shares its parent's buffers with an offset; bitmaps then start
    # in the middle of a byte.
    rows = 40
    rng = np.random.default_rng(7)
    values = rng.normal(size=rows)
    batch = pa.record_batch(
        {
            "x": pa.array(values, mask=values < -0.5),
            "n": pa.array(np.arange(rows)),
            "s": pa.array([None if i % 3 == 0 else f"v{i}" for i in range(rows)]),
            "b": pa.array([None if i % 5 == 0 else i % 2 == 0 for i in range(rows)]),
        }
    )
    part = batch.slice(11, 17)
    expected = part.to_pylist()
    records = list(RecordBatchView(part))
    assert len(records) == 17
    assert [r.to_dict() for r in records] == expected


def test_types_keep_python_types() -> None:
    record = RecordBatchView(typed_batch())[0]
    assert type(record["i64"]) is int
    assert type(record["f64"]) is float
    assert type(record["flag"]) is bool
    assert type(record["name"]) is str
    assert type(record["blob"]) is bytes
    assert record["seconds"] == dt.datetime(2013, 1, 1, tzinfo=UTC)
    assert record["seconds"].utcoffset() == dt.timedelta(0)
    assert record["naive"].tzinfo is None


def test_null_column_reads_none() -> None:
    view = RecordBatchView(typed_batch())
    assert [r["empty"] for r in view] == [None, None, None, None]


def test_mapping_api_covers_value_fields() -> None:
    batch = pa.record_batch(
        {
            "dep_delay": [3, None],
            "origin": ["JFK", "LGA"],
            "_event_time": pa.array([0, 1], pa.timestamp("us", tz="UTC")),
        }
    )
    record = RecordBatchView(batch)[1]
    assert list(record) == ["dep_delay", "origin"]
    assert len(record) == 2
    assert "origin" in record
    assert "_event_time" not in record
    assert record.get("dep_delay", 0) is None  # present but null
    assert record.get("missing", "default") == "default"
    assert dict(record.items()) == {"dep_delay": None, "origin": "LGA"}
    assert record.to_dict() == {"dep_delay": None, "origin": "LGA"}
    assert record.batch is batch
    assert record.row == 1


def test_unknown_field_names_close_match() -> None:
    record = RecordBatchView(pa.record_batch({"dep_delay": [1]}))[0]
    with pytest.raises(UnknownFieldError) as caught:
        record["dep_dealy"]
    message = str(caught.value)
    assert "'dep_dealy' not found" in message
    assert "Did you mean 'dep_delay'?" in message
    assert isinstance(caught.value, KeyError)


def test_reserved_column_access_points_to_property() -> None:
    batch = pa.record_batch({"x": [1], "_key": ["k"]})
    record = RecordBatchView(batch)[0]
    with pytest.raises(UnknownFieldError, match=r"record\.key"):
        record["_key"]
    assert record.key == "k"


def test_metadata_from_reserved_columns() -> None:
    times = [dt.datetime(2013, 1, 1, 5, tzinfo=UTC), None]
    batch = pa.record_batch(
        {
            "value": [1.0, 2.0],
            "_event_time": pa.array(times, pa.timestamp("us", tz="UTC")),
            "_key": pa.array([b"user-1", None], pa.binary()),
            "_partition": pa.array([3, 4], pa.int32()),
            "_offset": pa.array([1000, 1001], pa.int64()),
            "_headers": pa.array(
                [[("trace", b"abc")], []], pa.map_(pa.string(), pa.binary())
            ),
        }
    )
    first, second = RecordBatchView(batch)
    assert first.event_time == times[0]
    assert first.event_time_us == 1_357_016_400_000_000
    assert first.key == b"user-1"
    assert first.partition == 3
    assert first.offset == 1000
    assert first.headers == {"trace": b"abc"}
    assert second.event_time is None
    assert second.event_time_us is None
    assert second.key is None
    assert second.headers == {}


def test_event_time_in_milliseconds() -> None:
    batch = pa.record_batch(
        {"_event_time": pa.array([1_500], pa.timestamp("ms", tz="UTC"))}
    )
    record = RecordBatchView(batch)[0]
    assert record.event_time_us == 1_500_000
    assert record.event_time == dt.datetime(1970, 1, 1, 0, 0, 1, 500_000, tzinfo=UTC)


def test_metadata_absent_is_none() -> None:
    record = RecordBatchView(pa.record_batch({"x": [1]}))[0]
    assert record.key is None
    assert record.event_time is None
    assert record.event_time_us is None
    assert record.partition is None
    assert record.offset is None
    assert record.headers is None


def test_view_indexing_and_slices() -> None:
    view = RecordBatchView(pa.record_batch({"n": [10, 20, 30]}))
    assert len(view) == 3
    assert view[-1]["n"] == 30
    assert [r["n"] for r in view[1:]] == [20, 30]
    with pytest.raises(IndexError, match="out of range; the batch has 3 rows"):
        view[3]


def test_kept_records_stay_valid() -> None:
    # Each record is its own object, so keeping records is safe.
    view = RecordBatchView(pa.record_batch({"n": [1, 2, 3]}))
    kept = list(view)
    assert [r["n"] for r in kept] == [1, 2, 3]
    assert kept[0] is not kept[1]
    assert isinstance(kept[0], PluginRecord)


def test_record_has_no_instance_dict() -> None:
    record = RecordBatchView(pa.record_batch({"n": [1]}))[0]
    assert not hasattr(record, "__dict__")


# --- zero copy ----------------------------------------------------------------


def _buffer_addresses(batch: pa.RecordBatch) -> list[int]:
    return [
        buffer.address
        for column in batch.columns
        for buffer in column.buffers()
        if buffer is not None
    ]


def test_views_do_not_copy_buffers() -> None:
    rows = 100_000
    batch = pa.record_batch(
        {
            "x": pa.array(np.arange(rows, dtype=np.float64)),
            "n": pa.array(np.arange(rows, dtype=np.int64)),
            "s": pa.array([f"row{i}" for i in range(rows)]),
        }
    )
    addresses = _buffer_addresses(batch)
    gc.collect()  # free arrays of earlier tests, which would lower the count
    allocated = pa.total_allocated_bytes()

    view = RecordBatchView(batch)
    total = 0.0
    count = 0
    for record in view:
        total += record["x"] + record["n"]
        count += len(record["s"])

    assert pa.total_allocated_bytes() <= allocated
    assert _buffer_addresses(view.batch) == addresses
    assert view.batch is batch
    assert total == float(2 * np.arange(rows).sum())
    assert count == sum(len(f"row{i}") for i in range(rows))


def test_pool_does_not_grow_with_view_count() -> None:
    batch = pa.record_batch({"x": pa.array(np.arange(1000, dtype=np.int64))})
    gc.collect()
    allocated = pa.total_allocated_bytes()
    views = [RecordBatchView(batch) for _ in range(1000)]
    records = [view[500] for view in views]
    assert sum(r["x"] for r in records) == 500 * 1000
    assert pa.total_allocated_bytes() <= allocated


def test_numeric_getter_reads_arrow_memory() -> None:
    # The getter is a memoryview over the Arrow buffer, so reading values
    # through it must see the very bytes Arrow holds.
    array = pa.array(np.arange(10, dtype=np.int64))
    getter = column_getter(array)
    assert getattr(getter, "__self__", None) is not None
    view = getter.__self__  # type: ignore[attr-defined]
    assert isinstance(view, memoryview)
    assert view.obj is not None
    assert np.frombuffer(view, dtype=np.int64).ctypes.data == array.buffers()[1].address


def test_dense_reads_convert_column_once() -> None:
    rows = 1000
    names = [None if i % 7 == 0 else f"name-{i}" for i in range(rows)]
    view = RecordBatchView(pa.record_batch({"s": names}))
    early = view.getter("s")
    assert [r["s"] for r in view] == names
    # After enough reads the field's getter indexes a converted list ...
    assert isinstance(getattr(view.getter("s"), "__self__", None), list)
    # ... and a getter taken before the conversion still reads right.
    assert [early(i) for i in range(rows)] == names


def test_values_are_read_lazily() -> None:
    # Reading one value of a large string column must not convert the column:
    # converting it would allocate about 60 MB of Python strings.
    rows = 1_000_000
    batch = pa.record_batch({"s": pa.array([f"value-{i}" for i in range(rows)])})
    view = RecordBatchView(batch)
    tracemalloc.start()
    try:
        value = view[rows - 1]["s"]
        records = sum(1 for _ in view)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value == f"value-{rows - 1}"
    assert records == rows
    assert peak < 1_000_000

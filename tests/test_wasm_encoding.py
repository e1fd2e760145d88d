"""The v1 batch encoding: byte layout, conversions and malformed output.

The layout tests build the expected bytes by hand from the spec
(`docs/plugin-batch-encoding.md`) with `struct`, independently of the
encoder.
"""

from __future__ import annotations

import datetime as dt
import struct

import numpy as np
import pyarrow as pa
import pytest

from dataflare.plugin.wasm.encoding import (
    MalformedOutputError,
    UnsupportedTypeError,
    WireType,
    decode_batch,
    decode_selection,
    encode_arrays,
    encode_batch,
    encode_selection,
    plan_columns,
)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


def test_layout_matches_the_spec_byte_for_byte() -> None:
    batch = pa.record_batch(
        {
            "n": pa.array([7, None, -1], pa.int64()),
            "s": pa.array(["ab", "", "cde"]),
        }
    )
    rows = 3
    # Header and descriptors: 16 + (12 + 1) + (12 + 1) = 42, padded to 48.
    n_block = pad(bytes([0b101])) + struct.pack("<3q", 7, 0, -1)
    offsets = struct.pack("<4I", 0, 2, 2, 5)
    s_block = pad(offsets) + b"abcde"
    n_start = 48
    s_start = n_start + len(n_block)
    header = struct.pack("<4sHHII", b"DFB1", 1, 0, rows, 2)
    descriptors = struct.pack("<BBHII", 1, 1, 1, n_start, len(n_block)) + b"n"
    descriptors += struct.pack("<BBHII", 4, 0, 1, s_start, len(s_block)) + b"s"
    expected = pad(header + descriptors) + n_block + pad(s_block)

    encoded = encode_batch(batch).tobytes()

    # The value slot of a null is unspecified: compare with it masked out.
    got = bytearray(encoded)
    got[n_start + 8 + 8 : n_start + 8 + 16] = bytes(8)
    assert bytes(got) == expected


def test_round_trip_of_every_type_with_nulls() -> None:
    when = dt.datetime(2013, 1, 1, 5, 15, tzinfo=dt.UTC)
    batch = pa.record_batch(
        {
            "i": pa.array([1, None, -(2**62)], pa.int64()),
            "f": pa.array([1.5, float("nan"), None], pa.float64()),
            "b": pa.array([True, None, False]),
            "s": pa.array(["é", None, "x" * 100]),
            "t": pa.array([when, None, when], pa.timestamp("us", tz="UTC")),
        }
    )
    decoded = decode_batch(encode_batch(batch))
    assert decoded.rows == 3
    for name in batch.schema.names:
        got = decoded.columns[name]
        want = batch.column(name)
        assert got.type == want.type
        assert got.to_pylist()[0] == want.to_pylist()[0]
        assert got.is_null().to_pylist() == want.is_null().to_pylist()
    assert decoded.columns["s"].to_pylist() == ["é", None, "x" * 100]


@pytest.mark.parametrize("offset", [0, 3, 8, 13])
def test_sliced_arrays_are_realigned(offset: int) -> None:
    rng = np.random.default_rng(offset)
    size = 100
    ints = pa.array(rng.integers(-50, 50, size), mask=rng.random(size) < 0.3)
    texts = pa.array(
        [f"v{i}" * (i % 4) for i in range(size)], mask=rng.random(size) < 0.2
    )
    bools = pa.array(rng.random(size) < 0.5, mask=rng.random(size) < 0.1)
    full = pa.record_batch({"i": ints, "s": texts, "b": bools})
    batch = full.slice(offset, 40)

    decoded = decode_batch(encode_batch(batch))

    for name in ("i", "s", "b"):
        assert decoded.columns[name].to_pylist() == batch.column(name).to_pylist()


def test_conversions_to_wire_types() -> None:
    batch = pa.record_batch(
        {
            "i8": pa.array([1, None], pa.int8()),
            "u32": pa.array([4_000_000_000, 1], pa.uint32()),
            "f32": pa.array([0.5, None], pa.float32()),
            "big": pa.array(["a", "bb"], pa.large_string()),
            "view": pa.array(["c", None], pa.string_view()),
            "dict": pa.array(["x", "y"]).dictionary_encode(),
            "ms": pa.array([1_000, None], pa.timestamp("ms")),
            "day": pa.array([1, None], pa.date32()),
        }
    )
    decoded = decode_batch(encode_batch(batch)).columns
    assert decoded["i8"].to_pylist() == [1, None]
    assert decoded["u32"].to_pylist() == [4_000_000_000, 1]
    assert decoded["f32"].to_pylist() == [0.5, None]
    assert decoded["big"].to_pylist() == ["a", "bb"]
    assert decoded["view"].to_pylist() == ["c", None]
    assert decoded["dict"].to_pylist() == ["x", "y"]
    assert decoded["ms"].cast(pa.int64()).to_pylist() == [1_000_000, None]
    assert decoded["day"].cast(pa.int64()).to_pylist() == [86_400_000_000, None]


@pytest.mark.parametrize(
    "type_",
    [pa.uint64(), pa.timestamp("ns"), pa.decimal128(10, 2), pa.list_(pa.int64())],
)
def test_types_without_a_lossless_form_are_named(type_: pa.DataType) -> None:
    schema = pa.schema([("amount", type_)])
    with pytest.raises(UnsupportedTypeError, match="field 'amount' has type"):
        plan_columns(schema, [("amount", "amount")])
    # Without named fields, such columns are simply not sent.
    assert plan_columns(schema, None) == []


def test_fields_are_sent_under_their_wire_names() -> None:
    batch = pa.record_batch({"tailnum": ["N1"], "other": [1]})
    decoded = decode_batch(encode_batch(batch, [("value", "tailnum")]))
    assert list(decoded.columns) == ["value"]
    assert decoded.columns["value"].to_pylist() == ["N1"]


def test_selection_round_trip_and_null_drops() -> None:
    mask = [True, False, None, True] * 5 + [True]
    selection = decode_selection(encode_selection(mask), len(mask))
    assert selection.to_pylist() == [m is True for m in mask]


def test_selection_wrong_length_rejected() -> None:
    good = encode_selection([True] * 10)
    with pytest.raises(MalformedOutputError, match="for 10 rows but the batch has 9"):
        decode_selection(good, 9)
    with pytest.raises(MalformedOutputError, match="10 rows need 10 bytes"):
        decode_selection(good[:9], 10)
    with pytest.raises(MalformedOutputError, match="does not start with 'DFS1'"):
        decode_selection(b"XXXX" + good[4:], 10)
    with pytest.raises(MalformedOutputError, match="encoding version '2'"):
        decode_selection(b"DFS2" + good[4:], 10)


def corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


def test_malformed_batches_are_rejected_with_the_column_named() -> None:
    good = encode_arrays({"name": pa.array(["ab", "cd"])})
    # Descriptor of column 0 at 16: type, validity, name length, start, length.
    start = struct.unpack_from("<I", good, 20)[0]
    with pytest.raises(MalformedOutputError, match="unknown type code 9"):
        decode_batch(corrupt(good, 16, b"\x09"))
    with pytest.raises(MalformedOutputError, match="outside the"):
        decode_batch(corrupt(good, 24, struct.pack("<I", 10_000)))
    with pytest.raises(MalformedOutputError, match="never decrease"):
        decode_batch(corrupt(good, start + 4, struct.pack("<I", 5)))
    bad_utf8 = corrupt(good, start + 16, b"\xff")
    with pytest.raises(MalformedOutputError, match="'name' is not a valid utf8"):
        decode_batch(bad_utf8)
    with pytest.raises(MalformedOutputError, match="too short for a batch header"):
        decode_batch(good[:10])
    with pytest.raises(MalformedOutputError, match="ends inside the descriptor"):
        decode_batch(good[:20])


def test_decoded_arrays_survive_the_source_bytes() -> None:
    data = bytearray(encode_arrays({"x": pa.array([1, 2, 3])}))
    decoded = decode_batch(memoryview(data))
    data[:] = bytes(len(data))  # the plugin's output buffer is reused
    assert decoded.columns["x"].to_pylist() == [1, 2, 3]


def test_bool_output_bytes_are_packed() -> None:
    decoded = decode_batch(encode_arrays({"b": pa.array([True, False, True] * 7)}))
    assert decoded.columns["b"].type == WireType.BOOL.arrow_type()
    assert decoded.columns["b"].to_pylist() == [True, False, True] * 7


def test_empty_batch_round_trip() -> None:
    batch = pa.record_batch(
        {"s": pa.array([], pa.string()), "i": pa.array([], pa.int64())}
    )
    decoded = decode_batch(encode_batch(batch))
    assert decoded.rows == 0
    assert decoded.columns["s"].to_pylist() == []
    assert decode_batch(encode_arrays({}, rows=4)).rows == 4

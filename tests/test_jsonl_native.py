"""The native JSON lines reader (simdjson) against Arrow's reader and pandas.

The native reader must give exactly the batch that Arrow's path gives, or
hand the block to Arrow. These tests parse each block both ways and
compare, and check that the native reader takes the blocks it should.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

import dataflare.connectors.files.jsonl as jsonl_module
from dataflare.connectors.files.jsonl import (
    BlockResult,
    JsonLinesParser,
    native_fields,
)

SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("ratio", pa.float64()),
        ("count", pa.int64()),
        ("ok", pa.bool_()),
    ]
)

native_only = pytest.mark.skipif(
    jsonl_module._jsonl_reader is None and not os.environ.get("CI"),
    reason="built without libsimdjson-dev",
)


def test_native_built_in_ci() -> None:
    if os.environ.get("CI"):
        assert jsonl_module._jsonl_reader is not None, (
            "the native jsonl reader was not built: install libsimdjson-dev "
            "and run `make install` again"
        )


def line_numbers(result: BlockResult) -> list[int]:
    if result.numbers is None:
        return list(range(1, result.batch.num_rows + 1))
    return [int(n) for n in result.numbers]


def both_ways(block: bytes, schema: pa.Schema = SCHEMA) -> tuple[bool, BlockResult]:
    """Parse `block` natively and with Arrow; assert the same outcome.

    Returns whether the native reader took the block, and the result.
    """
    native = JsonLinesParser(schema, "f")
    arrow = JsonLinesParser(schema, "f", native=False)
    fields = native_fields(schema)
    assert fields is not None
    assert jsonl_module._jsonl_reader is not None
    taken = jsonl_module._jsonl_reader.read_block(block, fields) is not None
    got, expected = native.parse_block(block), arrow.parse_block(block)
    assert got.batch.equals(expected.batch), (block, got.batch, expected.batch)
    assert got.lines == expected.lines
    assert got.rejected == expected.rejected
    assert line_numbers(got) == line_numbers(expected)
    return taken, got


@native_only
@pytest.mark.parametrize(
    "block",
    [
        b'{"name":"a","ratio":1.5,"count":3,"ok":true}\n',
        b'{"name":"\\u00e9\\ud83d\\ude00","ratio":-0.0,"count":0,"ok":false}\n',
        b'{"name":null,"ratio":null,"count":null,"ok":null}\n',
        b'{"other":{"deep":[1,2,{"x":null}]},"count":1}\n',
        b'{"ratio":18446744073709551615,"count":9223372036854775807}\n',
        b'{"count":-9223372036854775808}\n{"count":1}',
        b'{"name":"a"}\r\n{"name":"b"}\r\n',
        b'{"name":"a"}   \n',
        b'{"n\\u0061me":"escaped key"}\n',
        b'{"x":1,"x":2,"count":1}\n',
        b"",
    ],
)
def test_native_takes_clean_blocks(block: bytes) -> None:
    taken, _ = both_ways(block)
    assert taken


@native_only
@pytest.mark.parametrize(
    "block",
    [
        b'{"ratio":-0}\n',  # simdjson reads the integer 0; Arrow gives -0.0
        b'{"ratio":1.5,"count":-0}\n',  # any `-0` where a field is a float
        b'{"count":1.0}\n',
        b'{"count":1e2}\n',
        b'{"count":9223372036854775808}\n',
        b'{"count":true}\n',
        b'{"ok":1}\n',
        b'{"name":1}\n',
        b'{"ratio":1e400}\n',
        b'{"ratio":123456789012345678901234567890}\n',
        b'{"name":"\\ud800"}\n',
        b'{"name":"\xff"}\n',
        b'{"other":"\xff"}\n',
        b'{"count":1,"count":2}\n',
        b'{"other":[tru],"count":1}\n',
        b'{"name":"a"} {"name":"b"}\n',
        b'{"name":"a"}{"name":"b"}\n',
        b'{"name":\n"a"}\n',
        b'{"name":"a"}\n\n{"name":"b"}\n',
        b'  {"name":"a"}\n',
        b"[1]\n",
        b'"text"\n',
        b'{"name":"a"}\n{"name":',
        b"\n",
    ],
)
def test_native_hands_doubtful_to_arrow(block: bytes) -> None:
    taken, _ = both_ways(block)
    assert not taken


def random_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            rng.randint(-(2**63), 2**63 - 1),
            rng.randint(-5, 5),
            rng.uniform(-1e6, 1e6),
            rng.choice([True, False]),
            "".join(rng.choice('aé😀"\\\n\t\x00z') for _ in range(rng.randint(0, 6))),
            [rng.randint(0, 3)],
            {"k": rng.randint(0, 3)},
        ]
    )


def random_line(rng: random.Random, *, shuffle: bool = False) -> bytes:
    """One line: mostly well-typed records, sometimes a value of another type.

    With `shuffle`, the fields come in a random order.
    """
    record: dict[str, Any] = {}
    for field, make in (
        ("name", lambda: "".join(rng.choice('abc é😀"\\') for _ in range(5))),
        ("ratio", lambda: rng.choice([rng.uniform(-1e9, 1e9), rng.randint(-99, 99)])),
        ("count", lambda: rng.randint(-(2**63), 2**63 - 1)),
        ("ok", lambda: rng.choice([True, False])),
        ("extra", lambda: random_value(rng)),
    ):
        roll = rng.random()
        if roll < 0.1:
            continue  # absent
        if roll < 0.15:
            record[field] = None
        elif roll < 0.17:
            record[field] = random_value(rng)  # often the wrong type
        else:
            record[field] = make()
    if shuffle:
        items = list(record.items())
        rng.shuffle(items)
        record = dict(items)
    text = json.dumps(record, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.01:
        text = text[: len(text) // 2]  # not JSON
    return text.encode()


@native_only
def test_native_random_blocks_match_arrow() -> None:
    rng = random.Random(20261205)
    taken = 0
    for _ in range(300):
        lines = [random_line(rng) for _ in range(rng.randint(1, 40))]
        block = b"\n".join(lines) + (b"\n" if rng.random() < 0.8 else b"")
        took, _ = both_ways(block)
        taken += took
    # About half of the blocks have no doubtful line and must be taken.
    assert taken > 50


@native_only
def test_native_random_field_orders_match_arrow() -> None:
    rng = random.Random(5122026)
    native_blocks = 0
    for _ in range(200):
        lines = [random_line(rng, shuffle=True) for _ in range(rng.randint(1, 40))]
        native, _ = both_ways(b"\n".join(lines) + b"\n")
        native_blocks += native
    # Blocks without a doubtful line must be parsed natively.
    assert native_blocks > 30


@native_only
def test_native_field_order_changes() -> None:
    schema = pa.schema(
        [
            ("departure_delay", pa.int64()),
            ("count", pa.int64()),
            ("name", pa.string()),
        ]
    )
    lines = [
        b'{"departure_delay":1,"count":2,"name":"a"}',
        b'{"name":"b","departure_delay":3,"count":4}',
        b'{"departure_delax":5,"count":6,"name":"c"}',
        b'{"count":7,"coun":8,"counts":9,"name":"d"}',
        b'{"departure_delay":10}',
        b'{"departure_delay":11,"count":12,"name":"e"}',
    ]
    taken, result = both_ways(b"\n".join(lines) + b"\n", schema)
    assert taken
    assert result.batch.column("departure_delay").to_pylist() == [
        1,
        3,
        None,
        None,
        10,
        11,
    ]
    assert result.batch.column("count").to_pylist() == [2, 4, 6, 7, None, 12]
    assert result.batch.column("name").to_pylist() == ["a", "b", "c", "d", None, "e"]


@native_only
@pytest.mark.parametrize(
    "text",
    [
        b'{"name":"a","ratio":1.5,"count":3,"ok":true}\n' * 40,
        b'{"name":"a","count":3}\n' * 40 + b'{"name":"b"}',
        b'{"name":"a","count":3}\n' * 40 + b'{"name":',
    ],
)
def test_native_bytearray_spare_bytes_unread(text: bytes) -> None:
    # A bytearray that shrinks by less than half keeps its memory, so the
    # text that stood after the end is still there. The reader parses such
    # a block where it is, and must not read on past its end.
    block = bytearray(text + b'"x"}\n{"count":5}\n' * 20)
    del block[len(text) :]
    reader = jsonl_module._jsonl_reader
    assert reader is not None
    fields = native_fields(SCHEMA)
    assert fields is not None
    assert reader.read_block(block, fields) == reader.read_block(bytes(text), fields)


@native_only
def test_native_values_match_pandas() -> None:
    rng = random.Random(7)
    rows = []
    for i in range(5000):
        rows.append(
            {
                "name": None if i % 97 == 0 else f"n{rng.randint(0, 50)}é",
                "ratio": rng.uniform(-1e3, 1e3),
                "count": None if i % 89 == 0 else rng.randint(-(2**40), 2**40),
                "ok": rng.random() < 0.3,
            }
        )
    block = "".join(json.dumps(r) + "\n" for r in rows).encode()

    taken, result = both_ways(block)
    expected = pd.read_json(io.BytesIO(block), lines=True, dtype=False)
    got = result.batch.to_pandas()

    assert taken
    assert result.batch.column("name").to_pylist() == [
        None if pd.isna(v) else v for v in expected["name"].tolist()
    ]
    # pandas' float parser may be one unit in the last place off; Python's
    # is correctly rounded, as Arrow's and simdjson's are.
    assert got["ratio"].tolist() == [
        json.loads(line)["ratio"] for line in block.splitlines()
    ]
    assert (
        got["count"].astype("Int64").tolist()
        == expected["count"].astype("Int64").tolist()
    )
    assert got["ok"].tolist() == expected["ok"].tolist()
    assert result.batch.column("count").null_count == sum(
        r["count"] is None for r in rows
    )


def test_native_fields_supported_schemas() -> None:
    if jsonl_module._jsonl_reader is None:
        assert native_fields(SCHEMA) is None
        return
    assert native_fields(SCHEMA) == (
        ("name", 3),
        ("ratio", 1),
        ("count", 0),
        ("ok", 2),
    )
    for other in (
        pa.schema([("at", pa.timestamp("ns"))]),
        pa.schema([("small", pa.int32())]),
        pa.schema([("day", pa.date32())]),
        pa.schema([pa.field("name", pa.string(), nullable=False)]),
    ):
        assert native_fields(other) is None


@native_only
def test_native_long_line() -> None:
    long_line = json.dumps({"name": "x" * 600_000, "count": 1}).encode()
    block = b'{"name":"a","count":0}\n' + long_line + b'\n{"name":"b"}\n'
    taken, result = both_ways(block)
    assert taken
    assert result.batch.column("count").to_pylist() == [0, 1, None]
    assert len(result.batch.column("name")[1].as_py()) == 600_000


# --- cases found by differential fuzzing ------------------------------------


def float_bits(batch: pa.RecordBatch) -> list[list[Any]]:
    """Column values, with floats as their bit patterns.

    `RecordBatch.equals` counts -0.0 and 0.0 as equal (pyarrow 26), so it
    cannot tell whether the sign of a zero was kept.
    """
    columns = []
    for column in batch.columns:
        values = column.to_pylist()
        if pa.types.is_floating(column.type):
            values = [None if v is None else struct.pack("<d", v) for v in values]
        columns.append(values)
    return columns


def test_batch_equals_ignores_zero_sign() -> None:
    # `both_ways` compares with `equals`, so it misses a lost sign.
    zero = pa.record_batch([pa.array([0.0])], names=["ratio"])
    negative = pa.record_batch([pa.array([-0.0])], names=["ratio"])
    assert zero.equals(negative)
    assert float_bits(zero) != float_bits(negative)


@native_only
@pytest.mark.parametrize(
    "block",
    [
        b'{"ratio":-0.0}\n',
        b'{"ratio":-0e0}\n',
        b'{"ratio":-0E-0}\n',
        b'{"ratio":-1e-400}\n',
        b'{"ratio":-0e99999999999999999999}\n',
        b'{"ratio":-4.9e-324}\n',
    ],
)
def test_native_keeps_zero_sign(block: bytes) -> None:
    _, got = both_ways(block)
    expected = JsonLinesParser(SCHEMA, "f", native=False).parse_block(block)
    assert float_bits(got.batch) == float_bits(expected.batch)


def run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )


def block_with_null_at_line_51() -> bytes:
    """Return 100 lines where line 10 is bad and line 51 is `null`.

    Arrow rejects the whole block, so the parser halves it, and the second
    half starts with the `null` line.
    """
    lines = [b'{"count":1}\n'] * 100
    lines[9] = b'{"count":"x"}\n'
    lines[50] = b"null\n"
    return b"".join(lines)


@pytest.mark.parametrize(
    "block",
    [
        b"null\n",
        b'null\n{"name":"a"}\n',
        b"  null\n",
        block_with_null_at_line_51(),
    ],
)
@pytest.mark.parametrize("native", [True, False])
def test_parse_block_null_line_no_crash(block: bytes, native: bool) -> None:
    # pyarrow 26.0.1's `read_json` fails with SIGSEGV when the text starts
    # with `null`. So a jsonl file whose first line is `null` ends
    # `dataflare run` with exit code 139.
    code = (
        "import pyarrow as pa\n"
        "from dataflare.connectors.files.jsonl import JsonLinesParser\n"
        "schema = pa.schema([('name', pa.string()), ('count', pa.int64())])\n"
        f"parser = JsonLinesParser(schema, 'f', native={native})\n"
        f"result = parser.parse_block({block!r})\n"
        "print(result.batch.num_rows, len(result.rejected))\n"
    )
    done = run_isolated(code)
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])


@pytest.mark.parametrize(
    "line",
    [
        # Arrow's reader gives -0.0, the line-by-line parse 0.0.
        b'{"ratio":-0}',
        # Arrow's reader gives inf, the line-by-line parse rejects the line.
        b'{"ratio":1' + b"0" * 400 + b"}",
        # Arrow's reader gives a record of nulls; the line is rejected.
        b"null",
    ],
)
@pytest.mark.parametrize("native", [True, False])
def test_parse_block_line_beside_bad_line(line: bytes, native: bool) -> None:
    # A line must read the same whether or not a bad line in its block sends
    # the block to the line-by-line parse.
    parser = JsonLinesParser(SCHEMA, "f", native=native)
    alone = parser.parse_block(b'{"count":1}\n' + line + b"\n")
    beside_bad = parser.parse_block(b'{"count":1}\n' + line + b"\ngarbage\n")
    rejected_alone = [number for *_, number in alone.rejected]
    assert [number for *_, number in beside_bad.rejected] == [*rejected_alone, 3]
    assert float_bits(beside_bad.batch) == float_bits(alone.batch)


@native_only
def test_native_wide_schema() -> None:
    # Many fields and keys: the reader looks fields up by name in a table.
    schema = pa.schema([(f"field_{i:05d}", pa.int64()) for i in range(500)])
    record = {f"other_{k:05d}": k for k in range(2000)}
    record |= {f"field_{i:05d}": i for i in range(0, 500, 7)}
    block = (json.dumps(record).encode() + b"\n") * 20

    taken, result = both_ways(block, schema)

    assert taken
    assert result.batch.column("field_00007").to_pylist() == [7] * 20
    assert result.batch.column("field_00001").null_count == 20


TIMES = [
    "2013-01-01T10:00:00Z",
    "2013-01-01T10:00:00+01:00",
    "2013-01-01T10:00:00.123456Z",
    "2013-01-01T10:00:00.1234567Z",
    "2013-01-01 10:00:00",
    "2013-01-01",
    "20130101T100000Z",
    "2013-02-30T10:00:00Z",
    "1969-12-31T23:59:59.999-0130",
    "not a time",
]


@native_only
@pytest.mark.parametrize("zone", ["UTC", None])
@pytest.mark.parametrize("text", TIMES)
def test_native_timestamps_match_arrow(zone: str | None, text: str) -> None:
    schema = pa.schema([("at", pa.timestamp("us", tz=zone)), ("count", pa.int64())])
    block = f'{{"at": "{text}", "count": 1}}\n{{"at": null}}\n'.encode()

    _, result = both_ways(block, schema)

    assert result.batch.column("at").null_count >= 1


@native_only
def test_native_timestamps_taken_and_exact() -> None:
    schema = pa.schema([("at", pa.timestamp("us", tz="UTC"))])
    block = b'{"at":"2013-01-01T10:15:00Z"}\n{"at":"2013-01-01T11:00:00+01:00"}\n'

    taken, result = both_ways(block, schema)

    assert taken
    assert result.batch.column("at").cast(pa.int64()).to_pylist() == [
        1357035300000000,
        1357034400000000,
    ]


def test_native_fields_other_time_units() -> None:
    for dtype in (pa.timestamp("ns", tz="UTC"), pa.timestamp("ms")):
        assert native_fields(pa.schema([("at", dtype)])) is None

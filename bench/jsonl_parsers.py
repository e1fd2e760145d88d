"""Compare JSON lines parsers on the benchmark input, per core.

Parses the first `--limit` bytes of the input in blocks of `--block` bytes,
extracting W1's five fields, and prints one `RESULT` line with the CPU
seconds per million records of each parser:

- `arrow`: Arrow's JSON reader on one thread, as the `jsonl` source calls it.
- `source_parser`: `JsonLinesParser.parse_block`, the reader plus the
  source's checks for blank lines and line numbers.
- `polars`: `polars.read_ndjson` with the schema.
- `duckdb`: DuckDB's `read_json` on one thread, reading each block from
  memory.

Polars and DuckDB give the same records on this input, but not on others.
Polars reads a JSON number into a string field as text and keeps the first
of two repeated keys, and DuckDB rounds `9.5` read into an integer field.
Arrow rejects all three, so the source uses Arrow's reader.

Run pinned to one core: `taskset -c 0 python bench/jsonl_parsers.py INPUT`.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.json as pajson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataflare.connectors.files.jsonl import JsonLinesParser

import common

SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("carrier", pa.string()),
        ("origin", pa.string()),
        ("dep_delay", pa.int64()),
        ("arr_delay", pa.int64()),
    ]
)
DUCKDB_COLUMNS = {
    "id": "BIGINT",
    "carrier": "VARCHAR",
    "origin": "VARCHAR",
    "dep_delay": "BIGINT",
    "arr_delay": "BIGINT",
}


def read_blocks(path: str, limit: int, size: int) -> list[bytes]:
    """Return the first `limit` bytes of `path` as blocks of whole lines."""
    with open(path, "rb") as file:
        data = file.read(limit)
    blocks = []
    start = 0
    while start < len(data):
        stop = data.rfind(b"\n", start, start + size) + 1
        if stop <= start:
            break  # the last line is cut by `limit`
        blocks.append(data[start:stop])
        start = stop
    return blocks


def cpu_seconds(parse: Callable[[bytes], int], blocks: list[bytes]) -> float:
    """Return the least CPU time of three passes of `parse` over `blocks`."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for block in blocks:
            parse(block)
        best = min(best, time.process_time() - started)
    return best


def parsers() -> dict[str, Callable[[bytes], int]]:
    """Return a function per parser that parses one block and counts rows."""
    options = pajson.ParseOptions(
        explicit_schema=SCHEMA, unexpected_field_behavior="ignore"
    )
    source_parser = JsonLinesParser(SCHEMA, "input")
    polars_schema = pl.Schema(
        {
            "id": pl.Int64,
            "carrier": pl.String,
            "origin": pl.String,
            "dep_delay": pl.Int64,
            "arr_delay": pl.Int64,
        }
    )
    connection = duckdb.connect()
    connection.execute("SET threads = 1")

    def arrow(block: bytes) -> int:
        read_options = pajson.ReadOptions(use_threads=False, block_size=len(block) + 2)
        table = pajson.read_json(
            pa.py_buffer(block), read_options=read_options, parse_options=options
        )
        return table.num_rows

    def source(block: bytes) -> int:
        return int(source_parser.parse_block(block).batch.num_rows)

    def polars(block: bytes) -> int:
        return pl.read_ndjson(block, schema=polars_schema).height

    def duck(block: bytes) -> int:
        relation = connection.read_json(
            io.BytesIO(block), columns=DUCKDB_COLUMNS, format="newline_delimited"
        )
        return int(relation.to_arrow_table().num_rows)

    return {"arrow": arrow, "source_parser": source, "polars": polars, "duckdb": duck}


def main() -> None:
    """Parse the input with each parser and report CPU seconds per M records."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument(
        "--limit", type=int, default=100 << 20, help="bytes of the input read"
    )
    parser.add_argument(
        "--block", type=int, default=4 << 20, help="bytes parsed per call"
    )
    args = parser.parse_args()
    blocks = read_blocks(args.input, args.limit, args.block)
    result: dict[str, float] = {}
    records = 0
    for name, parse in parsers().items():
        records = sum(parse(block) for block in blocks)  # also a warm-up pass
        seconds = cpu_seconds(parse, blocks)
        result[f"{name}_cpu_s_per_m_records"] = round(seconds / records * 1e6, 3)
    common.report({"records": records, **result})


if __name__ == "__main__":
    main()

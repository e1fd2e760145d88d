"""Batches of edge values shared by the filter and sql tests."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

# Integer extremes, NaN, -0.0 and infinities, empty and non-ASCII text, and a
# null in every column. Row 6 contains the NaN of both float columns.
EDGES = pa.RecordBatch.from_pydict(
    {
        "id": pa.array(range(9), pa.int64()),
        "i": pa.array([2**63 - 1, -(2**63), 5, None, 0, 16, -1, 15, 7], pa.int64()),
        "j": pa.array([1, -1, 5, 2, None, 15, -1, 16, 7], pa.int64()),
        "small": pa.array([127, -128, None, 3, 0, 1, -1, 100, 16], pa.int8()),
        "u": pa.array([0, 255, 3, None, 1, 2, 128, 7, 16], pa.uint8()),
        "f": pa.array([1.5, None, -0.0, 3.0, math.inf, -2.0, math.nan, 1e300, 16.0]),
        "g": pa.array([1.5, 2.0, 0.0, None, math.inf, -3.0, math.nan, -1e300, 2.0]),
        "s": pa.array(["b", "a", None, "é", "", "JFK", "JFK", "jfk", "LGA"]),
        "ls": pa.array(
            ["b", "a", None, "é", "", "JFK", "JFK", "jfk", "LGA"], pa.large_string()
        ),
        "b": pa.array([True, None, False, True, False, None, True, False, True]),
        "c": pa.array([None, True, None, False, False, True, True, False, False]),
        "_event_time": pa.array(
            [dt.datetime(2024, 1, 1, h, tzinfo=dt.UTC) for h in range(9)],
            pa.timestamp("us", tz="UTC"),
        ),
    }
)
NO_NAN = EDGES.filter(pa.array([i != 6 for i in range(9)]))


def rows(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> list[dict[str, Any]]:
    """Return the rows of `batches`, with NaN as the text "NaN" so rows compare."""
    table = pa.Table.from_batches(list(batches), schema=schema)
    return [
        {name: "NaN" if value != value else value for name, value in row.items()}
        for row in table.to_pylist()
    ]

"""`group_by`: grouping with Arrow and NumPy, checked against DuckDB."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from dataflare.batch.group_by import group_by


def random_table(rows: int, seed: int) -> pa.Table:
    rng = random.Random(seed)

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.15 else value

    return pa.table(
        {
            "k": pa.array([maybe(rng.choice("abcd")) for _ in range(rows)]),
            "w": pa.array([rng.randrange(3) for _ in range(rows)], pa.int64()),
            "i": pa.array([maybe(rng.randrange(-50, 50)) for _ in range(rows)]),
            "f": pa.array([maybe(rng.uniform(-1, 1)) for _ in range(rows)]),
            "s": pa.array(
                [maybe(rng.choice(["x", "yy", "é", ""])) for _ in range(rows)]
            ),
            "seq": pa.array(range(rows), pa.int64()),
        }
    )


AGGREGATIONS = {
    "n": (None, "count_all"),
    "n_i": ("i", "count"),
    "sum_i": ("i", "sum"),
    "sum_f": ("f", "sum"),
    "min_i": ("i", "min"),
    "max_i": ("i", "max"),
    "min_s": ("s", "min"),
    "max_s": ("s", "max"),
    "min_f": ("f", "min"),
    "max_f": ("f", "max"),
    "first_i": ("i", "first"),
    "last_s": ("s", "last"),
}

DUCKDB_QUERY = """
SELECT k, w,
    count(*) AS n, count(i) AS n_i, sum(i) AS sum_i, sum(f) AS sum_f,
    min(i) AS min_i, max(i) AS max_i, min(s) AS min_s, max(s) AS max_s,
    min(f) AS min_f, max(f) AS max_f, min(seq) AS first_seq, max(seq) AS last_seq
FROM rows GROUP BY k, w ORDER BY min(seq)
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_duckdb(seed: int) -> None:
    rows = random_table(500, seed)

    out = group_by(rows, ["k", "w"], AGGREGATIONS).to_pylist()

    relation = duckdb.sql(DUCKDB_QUERY)  # reads `rows` by name
    assert relation is not None
    expected = relation.fetchall()
    by_seq = rows.to_pylist()
    assert len(out) == len(expected)
    for got, want in zip(out, expected, strict=True):
        (k, w, n, n_i, sum_i, sum_f, min_i, max_i, min_s, max_s, min_f, max_f) = want[
            :12
        ]
        first_seq, last_seq = want[12:]
        assert (got["k"], got["w"]) == (k, w)  # groups in order of first record
        assert (got["n"], got["n_i"], got["sum_i"]) == (n, n_i, sum_i)
        assert (got["min_i"], got["max_i"]) == (min_i, max_i)
        assert (got["min_s"], got["max_s"]) == (min_s, max_s)
        assert (got["min_f"], got["max_f"]) == (min_f, max_f)
        if sum_f is None:
            assert got["sum_f"] is None
        else:
            assert got["sum_f"] == pytest.approx(sum_f, abs=1e-9)
        # `first` and `last` keep nulls: the value of the first or last record.
        assert got["first_i"] == by_seq[first_seq]["i"]
        assert got["last_s"] == by_seq[last_seq]["s"]


def test_sum_null_and_exact() -> None:
    big = 2**62
    rows = pa.table(
        {
            "k": ["a", "a", "b", "b"],
            "v": pa.array([big, 1, None, None], pa.int64()),
        }
    )

    out = group_by(rows, ["k"], {"s": ("v", "sum"), "n": ("v", "count")})

    assert out.to_pylist() == [
        {"k": "a", "s": big + 1, "n": 2},
        {"k": "b", "s": None, "n": 0},
    ]


def test_nan_counts_only_when_nothing_else() -> None:
    nan = float("nan")
    rows = pa.table({"k": [1, 1, 1, 2], "v": [1.0, nan, 3.0, nan]})

    out = group_by(rows, ["k"], {"lo": ("v", "min"), "hi": ("v", "max")}).to_pylist()

    assert out[0] == {"k": 1, "lo": 1.0, "hi": 3.0}
    assert math.isnan(out[1]["lo"])
    assert math.isnan(out[1]["hi"])


ALL_OF_V = {"n": (None, "count_all"), "s": ("v", "sum"), "hi": ("v", "max")}


def test_no_keys_make_one_group() -> None:
    rows = pa.table({"v": pa.array([3, 1, 2], pa.int64())})

    out = group_by(rows, [], ALL_OF_V)

    assert out.to_pylist() == [{"n": 3, "s": 6, "hi": 3}]


def test_empty_table_has_no_groups() -> None:
    empty = pa.table({"v": pa.array([], pa.int64())})

    out = group_by(empty, [], ALL_OF_V)

    assert out.num_rows == 0
    assert out.schema.field("s").type == pa.int64()


def test_null_keys_form_their_own_group_across_chunks() -> None:
    first = pa.table({"k": ["a", None], "v": [1, 2]})
    second = pa.table({"k": [None, "a"], "v": [3, 4]})

    out = group_by(pa.concat_tables([first, second]), ["k"], {"s": ("v", "sum")})

    assert out.to_pylist() == [{"k": "a", "s": 5}, {"k": None, "s": 5}]


def test_unknown_function_is_named() -> None:
    rows = pa.table({"v": [1]})

    with pytest.raises(ValueError, match="unknown aggregate function 'median'"):
        group_by(rows, [], {"m": ("v", "median")})


def test_grouping_loads_neither_acero_nor_pandas() -> None:
    code = (
        "import sys, pyarrow as pa\n"
        "from dataflare.batch.group_by import group_by\n"
        "t = pa.Table.from_arrays([pa.nulls(2, pa.string()), pa.nulls(2, pa.int64())],"
        " names=['k', 'v'])\n"
        "group_by(t, ['k'], {'s': ('v', 'sum'), 'm': ('k', 'min')})\n"
        "print(sorted(m for m in ('pandas', 'pyarrow.acero', 'polars')"
        " if m in sys.modules))\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert done.stdout.strip() == "[]"


def test_float_keys_zeros_and_nans() -> None:
    nan = float("nan")
    rows = pa.table({"f": [0.0, -0.0, nan, None, -nan, 1.5, None]})

    out = group_by(rows, ["f"], {"n": (None, "count_all")}).to_pylist()

    assert [row["n"] for row in out] == [2, 2, 2, 1]
    assert out[0]["f"] == 0.0
    assert math.isnan(out[1]["f"])
    assert [row["f"] for row in out[2:]] == [None, 1.5]

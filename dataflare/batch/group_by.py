"""Group the records of a table by key fields and aggregate each group.

`group_by(table, keys, aggregations)` returns one row per distinct key,
in the order of each key's first record, with the key fields and one
column per aggregation. Nulls in key fields form groups of their own.

Arrow's own grouping (`pyarrow.Table.group_by`) runs on Acero, and
importing Acero loads `pyarrow.dataset` and pandas, about 50 MB of
resident memory in every process that groups. Here the keys are numbered
with Arrow's `dictionary_encode` and the groups are reduced with NumPy
(`bincount`, `add.reduceat`) and Arrow's `sort_indices` and `take`, which
a run has loaded anyway.

Functions, over a column (`count_all` over none):

- `count_all`: records in the group. `count`: its non-null values.
- `sum`: sum of the non-null values, null if there are none. Integers
  sum in their own type, so pass `int64` or `uint64` values for exact
  sums (wrapping around on overflow, as NumPy does).
- `min`, `max`: smallest and largest non-null value, null if there are
  none. NaN counts only when the group contains nothing else.
- `first`, `last`: the value of the group's first or last record, even
  when it is null.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataflare.batch.numpy_arrays import from_numpy, to_numpy

AggregateSpec = tuple[str | None, str]
"""The column an aggregation reads (None for `count_all`) and its function."""


class Groups:
    """The groups of a table's records by key fields.

    Attributes:
        ids: The group of each record, numbered from 0 in the order of
            each group's first record.
        count: The number of groups.
        sizes: The number of records of each group.
        first: The index of each group's first record.
        last: The index of each group's last record.
        order: Record indices sorted by group, in arrival order within one.
        offsets: Where each group starts in `order`.
    """

    def __init__(self, table: pa.Table, keys: Sequence[str]) -> None:
        rows = table.num_rows
        code = np.zeros(rows, np.int64)
        for position, key in enumerate(keys):
            indices, distinct = _key_codes(table.column(key).combine_chunks())
            code = code * distinct + indices
            if position < len(keys) - 1:
                # Renumber densely, so that the next key's product stays small.
                code = np.unique(code, return_inverse=True)[1].reshape(-1)
        _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")
        rank = np.empty(len(first), np.int64)
        rank[by_first] = np.arange(len(first))
        self.ids: np.ndarray = rank[inverse.reshape(-1)]
        self.count = len(first)
        self.first: np.ndarray = first[by_first]
        self.sizes: np.ndarray = np.bincount(self.ids, minlength=self.count)
        self.order: np.ndarray = np.argsort(self.ids, kind="stable")
        self.offsets: np.ndarray = np.cumsum(self.sizes) - self.sizes
        self.last: np.ndarray = self.order[self.offsets + self.sizes - 1]


def _key_codes(column: pa.Array) -> tuple[np.ndarray, int]:
    """Number the distinct values of a key column; return codes and count.

    Nulls form one group. In float columns `-0.0` groups with `0.0`, and
    every NaN with every other, as in SQL's GROUP BY.
    """
    if pa.types.is_floating(column.type):
        values = to_numpy(column.cast(pa.float64()), null_value=0.0) + 0.0
        values[np.isnan(values)] = np.nan
        codes = np.unique(values, return_inverse=True, equal_nan=True)[1]
        codes = codes.reshape(-1).astype(np.int64)
        if column.null_count:
            codes[to_numpy(column.is_null())] = -1
        return codes + 1, int(codes.max(initial=-1)) + 2
    encoded = pc.dictionary_encode(column, null_encoding="encode")
    return to_numpy(encoded.indices).astype(np.int64), len(encoded.dictionary)


def group_by(
    table: pa.Table, keys: Sequence[str], aggregations: Mapping[str, AggregateSpec]
) -> pa.Table:
    """Return one row per group of `table` by `keys`, with its aggregations.

    Args:
        table: The records.
        keys: The fields that make a group; none for one group of all.
        aggregations: Name of each result column to (column, function).

    Raises:
        ValueError: an unknown function.
    """
    groups = Groups(table, keys)
    first = from_numpy(groups.first)
    names = list(keys)
    columns: list[pa.Array | pa.ChunkedArray] = [
        table.column(key).take(first) for key in keys
    ]
    for name, (column, function) in aggregations.items():
        aggregate = _FUNCTIONS.get(function)
        if aggregate is None:
            raise ValueError(
                f"unknown aggregate function {function!r}; use one of "
                f"{', '.join(_FUNCTIONS)}"
            )
        values = None if column is None else table.column(column).combine_chunks()
        names.append(name)
        columns.append(aggregate(groups, values))
    return pa.Table.from_arrays(columns, names=names)


def _count_all(groups: Groups, values: pa.Array | None) -> pa.Array:
    return from_numpy(groups.sizes.astype(np.int64))


def _count(groups: Groups, values: pa.Array | None) -> pa.Array:
    assert values is not None
    return from_numpy(_valid_counts(groups, values))


def _valid_counts(groups: Groups, values: pa.Array) -> np.ndarray:
    if not values.null_count:
        return groups.sizes.astype(np.int64)
    valid = to_numpy(values.is_valid())
    return np.bincount(groups.ids[valid], minlength=groups.count).astype(np.int64)


def _sum(groups: Groups, values: pa.Array | None) -> pa.Array:
    assert values is not None
    numbers = to_numpy(values, null_value=0)
    if not groups.count:
        return values.slice(0, 0)
    sums = from_numpy(np.add.reduceat(numbers[groups.order], groups.offsets))
    some = from_numpy(_valid_counts(groups, values) > 0)
    result: pa.Array = pc.if_else(some, sums, pa.nulls(groups.count, sums.type))
    return result


def _extreme(order: str) -> Callable[[Groups, pa.Array | None], pa.Array]:
    def extreme(groups: Groups, values: pa.Array | None) -> pa.Array:
        assert values is not None
        # Sorted by group, then by value with nulls last: each group's first
        # row is its extreme, or null when the group has no values.
        ranked = pa.Table.from_arrays(
            [from_numpy(groups.ids), values], names=["group", "value"]
        )
        indices = pc.sort_indices(
            ranked,
            sort_keys=[("group", "ascending", "at_end"), ("value", order, "at_end")],
        )
        picked = to_numpy(indices)[groups.offsets]
        result: pa.Array = values.take(from_numpy(picked))
        return result

    return extreme


def _first(groups: Groups, values: pa.Array | None) -> pa.Array:
    assert values is not None
    result: pa.Array = values.take(from_numpy(groups.first))
    return result


def _last(groups: Groups, values: pa.Array | None) -> pa.Array:
    assert values is not None
    result: pa.Array = values.take(from_numpy(groups.last))
    return result


_FUNCTIONS: dict[str, Callable[[Groups, pa.Array | None], pa.Array]] = {
    "count_all": _count_all,
    "count": _count,
    "sum": _sum,
    "min": _extreme("ascending"),
    "max": _extreme("descending"),
    "first": _first,
    "last": _last,
}

"""Tests of the pandas-free conversions between Arrow and NumPy arrays."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from dataflare.batch.numpy_arrays import from_numpy, to_numpy

NUMBER_TYPES = [
    pa.int8(),
    pa.int16(),
    pa.int32(),
    pa.int64(),
    pa.uint8(),
    pa.uint16(),
    pa.uint32(),
    pa.uint64(),
    pa.float32(),
    pa.float64(),
]


def sample(dtype: pa.DataType, count: int = 21) -> list[Any]:
    if pa.types.is_boolean(dtype):
        return [i % 3 == 0 for i in range(count)]
    if pa.types.is_floating(dtype):
        return [i * 1.5 - 7 for i in range(count)]
    if pa.types.is_unsigned_integer(dtype):
        return [i * 3 for i in range(count)]
    return [i * 3 - 30 for i in range(count)]


@pytest.mark.parametrize("dtype", [*NUMBER_TYPES, pa.bool_()], ids=str)
def test_to_numpy_matches_pyarrow(dtype: pa.DataType) -> None:
    values = pa.array(sample(dtype), dtype)

    for part in (values, values.slice(3), values.slice(5, 9), values.slice(21)):
        got = to_numpy(part)
        expected = part.to_numpy(zero_copy_only=False)
        assert got.dtype == expected.dtype
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", [pa.int64(), pa.float32(), pa.bool_()], ids=str)
def test_to_numpy_chunked(dtype: pa.DataType) -> None:
    values = sample(dtype)
    chunked = pa.chunked_array(
        [pa.array(values[:7], dtype), pa.array(values[7:], dtype).slice(2)]
    )

    got = to_numpy(chunked)

    assert got.tolist() == values[:7] + values[9:]
    assert to_numpy(pa.chunked_array([], dtype)).tolist() == []


def test_to_numpy_single_chunk_is_a_view() -> None:
    values = pa.array([1, 2, 3], pa.int64())

    got = to_numpy(pa.chunked_array([values]))

    assert not got.flags.writeable
    assert np.shares_memory(got, np.frombuffer(values.buffers()[1], np.int64))


def test_to_numpy_fills_nulls() -> None:
    values = pa.array([5, None, 7, None, 9], pa.int64()).slice(1)
    flags = pa.array([True, None, False, None], pa.bool_())

    assert to_numpy(values, null_value=0).tolist() == [0, 7, 0, 9]
    assert to_numpy(values.fill_null(-1)).tolist() == [-1, 7, -1, 9]
    assert to_numpy(flags, null_value=False).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="has 2 nulls; pass null_value"):
        to_numpy(values)


def test_to_numpy_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="Arrow type string is not a number"):
        to_numpy(pa.array(["a"]))


@pytest.mark.parametrize("dtype", [*NUMBER_TYPES, pa.bool_()], ids=str)
def test_from_numpy_matches_pa_array(dtype: pa.DataType) -> None:
    values = np.array(sample(dtype), dtype=dtype.to_pandas_dtype())

    for part in (values, values[3:], values[::2]):
        got = from_numpy(part)
        expected = pa.array(part)
        assert got.type == expected.type
        assert got.null_count == 0
        assert got.equals(expected)


def test_from_numpy_keeps_nan_and_byte_order() -> None:
    floats = from_numpy(np.array([1.0, np.nan]))
    swapped = from_numpy(np.array([1, 258], dtype=">i4"))

    assert floats.null_count == 0
    assert np.isnan(floats.to_pylist()[1])
    assert swapped.type == pa.int32()
    assert swapped.to_pylist() == [1, 258]


def test_from_numpy_rejects_other_arrays() -> None:
    with pytest.raises(TypeError, match="one-dimensional"):
        from_numpy(np.zeros((2, 2)))
    with pytest.raises(TypeError, match="not a number or boolean type"):
        from_numpy(np.array(["a"]))


def test_conversions_do_not_import_pandas() -> None:
    script = (
        "import sys, numpy as np, pyarrow as pa\n"
        "from dataflare.batch.numpy_arrays import from_numpy, to_numpy\n"
        "values = from_numpy(np.arange(10))\n"
        "flags = from_numpy(np.arange(10) > 4)\n"
        "to_numpy(values.slice(2)); to_numpy(flags.slice(3))\n"
        "to_numpy(pa.chunked_array([values, values]))\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )

    assert done.stdout.strip() == "False"

"""Arrow arrays to NumPy and back, from their buffers, without pandas.

pyarrow 26 imports pandas, when it is installed, the first time it converts
Python or NumPy values: `Array.to_numpy`, `ChunkedArray.to_numpy`,
`np.asarray` on an Arrow array, `pa.array`, `pa.scalar`, and compute calls
with a Python number such as `pc.add(values, 1)` or `fill_null(0)`. After
pyarrow and Polars, importing pandas 3.1 takes about 0.2 s of CPU time and
35 MB of resident memory (2-core AMD EPYC). Code that runs on every batch
therefore uses these functions, which read and write the buffers of
numbers and booleans directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

_NUMPY_TYPES: dict[pa.DataType, np.dtype[Any]] = {
    pa.int8(): np.dtype(np.int8),
    pa.int16(): np.dtype(np.int16),
    pa.int32(): np.dtype(np.int32),
    pa.int64(): np.dtype(np.int64),
    pa.uint8(): np.dtype(np.uint8),
    pa.uint16(): np.dtype(np.uint16),
    pa.uint32(): np.dtype(np.uint32),
    pa.uint64(): np.dtype(np.uint64),
    pa.float32(): np.dtype(np.float32),
    pa.float64(): np.dtype(np.float64),
    pa.bool_(): np.dtype(np.bool_),
}
_ARROW_TYPES = {numpy: arrow for arrow, numpy in _NUMPY_TYPES.items()}


def to_numpy(
    values: pa.Array | pa.ChunkedArray, *, null_value: float | None = None
) -> np.ndarray:
    """Return the values of an array of numbers or booleans as a NumPy array.

    An array of one chunk of numbers without nulls is returned without a
    copy, as a read-only view. Booleans are unpacked from their bits into a
    new array.

    Args:
        values: An integer, float or boolean array.
        null_value: Value given to null slots, as `fill_null` would.

    Raises:
        TypeError: `values` has another type.
        ValueError: `values` has nulls and `null_value` is None.
    """
    dtype = _numpy_type(values.type)
    if isinstance(values, pa.ChunkedArray):
        parts = [to_numpy(chunk, null_value=null_value) for chunk in values.chunks]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype)
    if values.null_count and null_value is None:
        raise ValueError(
            f"array of {values.type} has {values.null_count} nulls; pass null_value"
        )
    result = _values(values, dtype)
    if values.null_count:
        result = result.copy()
        result[~_valid(values)] = null_value
    return result


def from_numpy(values: np.ndarray) -> pa.Array:
    """Return a one-dimensional NumPy array of numbers or booleans as Arrow.

    The result has no nulls (NaN stays a float value), as `pa.array(values)`
    gives. Numbers in native byte order and contiguous memory are not copied.

    Raises:
        TypeError: `values` has another type or more than one dimension.
    """
    if values.ndim != 1:
        raise TypeError(
            f"expected a one-dimensional array, got {values.ndim} dimensions"
        )
    arrow_type = _ARROW_TYPES.get(values.dtype.newbyteorder("="))
    if arrow_type is None:
        raise TypeError(f"NumPy type {values.dtype} is not a number or boolean type")
    if arrow_type == pa.bool_():
        data = np.packbits(values, bitorder="little")
    else:
        data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("="))
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(data)])


def _numpy_type(arrow_type: pa.DataType) -> np.dtype[Any]:
    dtype = _NUMPY_TYPES.get(arrow_type)
    if dtype is None:
        raise TypeError(f"Arrow type {arrow_type} is not a number or boolean type")
    return dtype


def _values(values: pa.Array, dtype: np.dtype[Any]) -> np.ndarray:
    """Read the data buffer of `values`, null slots included."""
    if len(values) == 0:
        return np.empty(0, dtype)
    data = values.buffers()[1]
    if dtype == np.bool_:
        bits = np.frombuffer(data, dtype=np.uint8)
        end = values.offset + len(values)
        unpacked = np.unpackbits(bits, count=end, bitorder="little")
        return unpacked[values.offset :].view(np.bool_)
    view = np.frombuffer(
        data, dtype=dtype, count=len(values), offset=values.offset * dtype.itemsize
    )
    view.flags.writeable = False  # Arrow arrays are immutable
    return view


def _valid(values: pa.Array) -> np.ndarray:
    """Return True for each slot of `values` that is not null."""
    validity = values.buffers()[0]
    if validity is None:
        return np.ones(len(values), dtype=np.bool_)
    bits = np.frombuffer(validity, dtype=np.uint8)
    end = values.offset + len(values)
    unpacked = np.unpackbits(bits, count=end, bitorder="little")
    return unpacked[values.offset :].view(np.bool_)

"""Keyed state for operators and plugins: value, list and map states per key.

A `KeyedStateStore` keeps named states in a `StateBackend` (in memory by
default, on disk for state larger than memory) and saves them all in one
checkpoint snapshot. Example, a plugin counting records per user::

    def open(self) -> None:
        self.store = KeyedStateStore.for_operator(self.context)
        self.counts = self.store.value_state("counts", INT64)

    def process(self, batch, input_index=0):
        added = collections.Counter(encode_keys(batch, ["user"]))
        keys = list(added)
        counts = self.counts.get_many(keys)
        self.counts.put_many(
            (key, (count or 0) + added[key]) for key, count in zip(keys, counts)
        )
        return [batch]

    def snapshot_state(self) -> bytes:
        return self.store.snapshot()

    def restore_state(self, state: bytes) -> None:
        self.store.restore(state)

    def close(self) -> None:
        self.store.close()

Keys are bytes: `encode_key(*values)` encodes one key and `encode_keys`
the key fields of every record of a batch, in the same encoding.

Time to live (TTL) is counted in event time. An entry written with
`time=t` expires once the watermark reaches `t + ttl`. Without `time`, `t`
is the watermark at the write, or the first watermark for entries written
before any watermark arrived. Expired entries are never returned. They are
deleted from the backend at most one `ttl` of event time after they expire,
by a sweep that `advance_watermark` starts. Event time makes expiry
deterministic, so a run resumed from a checkpoint expires the same entries
as an uninterrupted run.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import orjson
import pyarrow as pa

from dataflare.state.backends import (
    StateBackend,
    StateBackendError,
    create_backend,
    settings_of,
)

if TYPE_CHECKING:
    import polars as pl

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

MIN_TIME = -(2**63)
MAX_TIME = 2**63 - 1
_EXPIRY = struct.Struct(">q")
_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">Q")
_FORMAT = 1
_UNSET = MIN_TIME  # expiry of an entry written before the first watermark


# --- codecs ---------------------------------------------------------------------


class Codec(Generic[T]):
    """Turns values into bytes and back.

    `encode_all` and `decode_all` handle the values of a list state; values
    of a codec without a fixed width are framed with their length.
    """

    fixed_width: int | None = None

    def encode(self, value: T) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> T:
        raise NotImplementedError

    def encode_all(self, values: Iterable[T]) -> bytes:
        if self.fixed_width is not None:
            return b"".join(self.encode(value) for value in values)
        parts = []
        for value in values:
            data = self.encode(value)
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)

    def decode_all(self, data: bytes) -> list[T]:
        width = self.fixed_width
        if width is not None:
            return [
                self.decode(data[i : i + width]) for i in range(0, len(data), width)
            ]
        values = []
        offset = 0
        while offset < len(data):
            (size,) = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            values.append(self.decode(data[offset : offset + size]))
            offset += size
        return values


class JsonCodec(Codec[Any]):
    """JSON values through orjson: None, bool, int, float, str, lists, dicts.

    Tuples come back as lists, and NaN and infinite floats as None.
    """

    def encode(self, value: Any) -> bytes:
        return orjson.dumps(value)

    def decode(self, data: bytes) -> Any:
        return orjson.loads(data)


class BytesCodec(Codec[bytes]):
    """Byte strings, stored as they are."""

    def encode(self, value: bytes) -> bytes:
        return value

    def decode(self, data: bytes) -> bytes:
        return data


class StringCodec(Codec[str]):
    """Text, stored as UTF-8."""

    def encode(self, value: str) -> bytes:
        return value.encode()

    def decode(self, data: bytes) -> str:
        return data.decode()


class Int64Codec(Codec[int]):
    """64-bit signed integers, 8 bytes each."""

    fixed_width = 8

    def encode(self, value: int) -> bytes:
        return _EXPIRY.pack(value)

    def decode(self, data: bytes) -> int:
        return int(_EXPIRY.unpack(data)[0])

    def encode_all(self, values: Iterable[int]) -> bytes:
        return np.fromiter(values, dtype=">i8").tobytes()

    def decode_all(self, data: bytes) -> list[int]:
        values: list[int] = np.frombuffer(data, dtype=">i8").tolist()
        return values


class Float64Codec(Codec[float]):
    """64-bit floats, 8 bytes each; NaN and infinities are kept."""

    fixed_width = 8

    def encode(self, value: float) -> bytes:
        return struct.pack(">d", value)

    def decode(self, data: bytes) -> float:
        return float(struct.unpack(">d", data)[0])

    def encode_all(self, values: Iterable[float]) -> bytes:
        return np.fromiter(values, dtype=">f8").tobytes()

    def decode_all(self, data: bytes) -> list[float]:
        values: list[float] = np.frombuffer(data, dtype=">f8").tolist()
        return values


JSON = JsonCodec()
BYTES = BytesCodec()
STRING = StringCodec()
INT64 = Int64Codec()
FLOAT64 = Float64Codec()


class RowCodec(Codec[tuple[Any, ...]]):
    """Tuples of typed values, exact for every value (NaN included).

    A row is a bit mask of its None positions, the fixed-width values in one
    struct, then each variable-width value with its length.

    Args:
        kinds: Kind of each position: `int` (signed 64-bit), `uint`
            (unsigned 64-bit), `float`, `bool`, `str`, `bytes`, `decimal`
            or `json` (any JSON value). Every position may be None.
    """

    _CODES = {"int": "q", "uint": "Q", "float": "d", "bool": "?"}
    _ZEROS = {"int": 0, "uint": 0, "float": 0.0, "bool": False}

    def __init__(self, kinds: Sequence[str]) -> None:
        unknown = [k for k in kinds if k not in (*self._CODES, *_VARIABLE)]
        if unknown:
            raise ValueError(
                f"unknown row codec kinds {unknown}; use int, uint, float, bool, "
                "str, bytes, decimal or json"
            )
        self.kinds = list(kinds)
        self._width = len(kinds)
        mask_bytes = (len(kinds) + 7) // 8
        self._fixed_at = [i for i, k in enumerate(kinds) if k in self._CODES]
        self._zeros = [self._ZEROS[kinds[i]] for i in self._fixed_at]
        self._variable_at = [
            (i, *_VARIABLE[k]) for i, k in enumerate(kinds) if k in _VARIABLE
        ]
        codes = "".join(self._CODES[kinds[i]] for i in self._fixed_at)
        self._fixed = struct.Struct(f">{mask_bytes}s{codes}")
        self._mask_bytes = mask_bytes
        self._all_fixed = not self._variable_at

    def encode(self, value: tuple[Any, ...]) -> bytes:
        if len(value) != self._width:
            raise ValueError(
                f"row has {len(value)} values but the codec has {self._width} kinds"
            )
        mask = 0
        if None in value:
            for index, item in enumerate(value):
                if item is None:
                    mask |= 1 << index
            fixed = [
                zero if value[i] is None else value[i]
                for i, zero in zip(self._fixed_at, self._zeros, strict=True)
            ]
        else:
            fixed = [value[i] for i in self._fixed_at]
        head = self._fixed.pack(mask.to_bytes(self._mask_bytes, "little"), *fixed)
        if self._all_fixed:
            return head
        parts = [head]
        for index, encode, _ in self._variable_at:
            item = value[index]
            if item is None:
                continue
            data = encode(item)
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)

    def decode(self, data: bytes) -> tuple[Any, ...]:
        mask_bytes, *fixed = self._fixed.unpack_from(data)
        mask = int.from_bytes(mask_bytes, "little")
        if self._all_fixed and not mask:
            return tuple(fixed)
        values: list[Any] = [None] * self._width
        for index, item in zip(self._fixed_at, fixed, strict=True):
            if not mask >> index & 1:
                values[index] = item
        offset = self._fixed.size
        for index, _, decode in self._variable_at:
            if mask >> index & 1:
                continue
            (size,) = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            values[index] = decode(data[offset : offset + size])
            offset += size
        return tuple(values)

    # --- whole frames ---

    def encode_frame(self, frame: pl.DataFrame) -> list[bytes]:
        """Encode every row of `frame` (columns in the codec's order).

        Frames of fixed-width kinds only are encoded with NumPy, in one pass.
        """
        if not self._all_fixed or self._width > 64 or frame.width != self._width:
            return [self.encode(row) for row in frame.rows()]
        records = np.zeros(frame.height, dtype=self._numpy_dtype())
        mask = np.zeros(frame.height, dtype=np.uint64)
        for index, (name, zero) in enumerate(
            zip(frame.columns, self._zeros, strict=True)
        ):
            column = frame[name]
            if column.null_count():
                mask |= column.is_null().to_numpy().astype(np.uint64) << np.uint64(
                    index
                )
                column = column.fill_null(zero)
            records[f"f{index}"] = column.to_numpy()
        records["mask"] = (
            mask.astype("<u8").view(np.uint8).reshape(-1, 8)[:, : self._mask_bytes]
        )
        data = records.tobytes()
        width = self._fixed.size
        return [data[start : start + width] for start in range(0, len(data), width)]

    def decode_frame(self, values: Sequence[bytes], schema: pl.Schema) -> pl.DataFrame:
        """Decode rows into a frame with `schema` (names and types, in order)."""
        import polars as pl

        if not self._all_fixed or self._width > 64:
            return pl.DataFrame(
                [self.decode(v) for v in values], schema=schema, orient="row"
            )
        records = np.frombuffer(b"".join(values), dtype=self._numpy_dtype())
        masks = np.zeros((len(records), 8), dtype=np.uint8)
        masks[:, : self._mask_bytes] = records["mask"]
        mask = masks.view("<u8").reshape(-1)
        columns = []
        for index, (name, dtype) in enumerate(schema.items()):
            stored = records[f"f{index}"]
            native = np.asarray(stored, dtype=stored.dtype.newbyteorder("="))
            column = pl.Series(name, native)
            nulls = (mask >> np.uint64(index)) & np.uint64(1)
            if nulls.any():
                column = column.scatter(np.flatnonzero(nulls), None)
            columns.append(column.cast(dtype))
        return pl.DataFrame(columns)

    def _numpy_dtype(self) -> np.dtype[Any]:
        codes = {"int": ">i8", "uint": ">u8", "float": ">f8", "bool": "?"}
        fields: list[Any] = [("mask", np.uint8, (self._mask_bytes,))]
        fields += [(f"f{i}", codes[k]) for i, k in enumerate(self.kinds)]
        return np.dtype(fields)


_VARIABLE: dict[str, tuple[Any, Any]] = {
    "str": (str.encode, bytes.decode),
    "bytes": (bytes, bytes),
    "decimal": (lambda value: str(value).encode(), lambda data: Decimal(data.decode())),
    "json": (orjson.dumps, orjson.loads),
}


# --- keys -----------------------------------------------------------------------


def encode_key(*values: Any) -> bytes:
    """Encode one key made of `values`, as `encode_keys` encodes a record's.

    The values' types are inferred as Polars infers a column's: a Python int
    becomes an integer, a str a string, a datetime a timestamp in
    microseconds.
    """
    import polars as pl

    frame = pl.DataFrame({f"k{i}": [value] for i, value in enumerate(values)})
    return encode_keys(frame, frame.columns)[0]


def encode_keys(
    data: pa.RecordBatch | pl.DataFrame, fields: Sequence[str]
) -> list[bytes]:
    """Encode the values of `fields` of every record as a key, vectorized.

    Each value becomes text: `~` for null, otherwise `=` and the value,
    with strings prefixed by their length in bytes, so that no two
    different keys share an encoding. Timestamps, dates, times and
    durations are written as their integer value (for example microseconds
    since the epoch), binary values as hex, nested values as JSON. Null
    values form their own key, as in SQL's GROUP BY. Equal values of
    different types may differ (the integer 1 and the float 1.0 do).
    """
    import polars as pl

    frame = data if isinstance(data, pl.DataFrame) else pl.from_arrow(data)
    assert isinstance(frame, pl.DataFrame)
    frame = frame.select(fields)
    nested = [n for n, t in frame.schema.items() if t.is_nested() or t == pl.Object]
    if nested:
        frame = frame.with_columns(
            pl.Series(n, [_json_text(v) for v in frame[n].to_list()], pl.String)
            for n in nested
        )
    texts = []
    for name, dtype in physical(frame).schema.items():
        column = pl.col(name)
        if dtype == pl.String:
            text = column.str.len_bytes().cast(pl.String) + pl.lit(":") + column
        else:
            text = column.cast(pl.String)
        texts.append(
            pl.when(column.is_null()).then(pl.lit("~")).otherwise(pl.lit("=") + text)
        )
    keys = physical(frame).select(pl.concat_str(texts, separator="|").cast(pl.Binary))
    encoded: list[bytes] = keys.to_series().to_list()
    return encoded


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    return orjson.dumps(value, default=str, option=orjson.OPT_SORT_KEYS).decode()


def physical(frame: pl.DataFrame) -> pl.DataFrame:
    """Return `frame` with values that `RowCodec` and JSON store exactly.

    Temporal fields become their integers, categorical fields text, and
    binary fields hex text.
    """
    import polars as pl

    columns = []
    for name, dtype in frame.schema.items():
        column = pl.col(name)
        if dtype.is_temporal():
            column = column.to_physical()
        elif isinstance(dtype, pl.Categorical | pl.Enum):
            column = column.cast(pl.String)
        elif dtype == pl.Binary:
            column = column.bin.encode("hex")
        columns.append(column)
    return frame.select(columns)


def from_physical(frame: pl.DataFrame, schema: pl.Schema) -> pl.DataFrame:
    """Return a frame made by `physical` with the types of `schema` again."""
    import polars as pl

    columns = []
    for name, dtype in schema.items():
        column = pl.col(name)
        if dtype == pl.Binary:
            column = column.str.decode("hex")
        elif frame.schema[name] != dtype:
            column = column.cast(dtype)
        columns.append(column)
    return frame.select(columns)


def row_kinds(schema: pl.Schema) -> list[str]:
    """Return the `RowCodec` kinds of a frame returned by `physical`."""
    import polars as pl

    kinds = []
    for dtype in schema.values():
        if dtype.is_temporal() or dtype.is_signed_integer():
            kinds.append("int")
        elif dtype.is_unsigned_integer():
            kinds.append("uint")
        elif dtype.is_float():
            kinds.append("float")
        elif dtype == pl.Boolean:
            kinds.append("bool")
        elif dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
            kinds.append("str")
        elif isinstance(dtype, pl.Decimal):
            kinds.append("decimal")
        else:
            kinds.append("json")
    return kinds


# --- states ---------------------------------------------------------------------


class _State:
    """What value, list and map states share: table, TTL and expiry checks."""

    def __init__(self, store: KeyedStateStore, name: str, ttl: int | None) -> None:
        self.store = store
        self.name = name
        self.ttl = ttl
        self._backend = store.backend

    def _wrap(
        self, payload: bytes, time: int | None, floor: int | None = None
    ) -> bytes:
        if self.ttl is None:
            return payload
        expiry = self.store.expiry(self.ttl, time)
        if floor is not None and expiry != _UNSET and floor != _UNSET:
            expiry = max(expiry, floor)
        return _EXPIRY.pack(expiry) + payload

    def _unwrap(self, stored: bytes | None) -> bytes | None:
        """Return the payload of a stored value, or None if absent or expired."""
        if stored is None or self.ttl is None:
            return stored
        (expiry,) = _EXPIRY.unpack_from(stored)
        if self.store.expired(expiry, self.ttl):
            return None
        return stored[_EXPIRY.size :]

    def _stored_expiry(self, stored: bytes) -> int:
        return int(_EXPIRY.unpack_from(stored)[0])

    def sweep(self) -> int:
        """Delete the expired entries; return how many were deleted."""
        if self.ttl is None:
            return 0
        dead = [
            (key, sub)
            for key, sub, value in self._backend.scan(self.name)
            if self.store.expired(self._stored_expiry(value), self.ttl)
        ]
        self._backend.delete_many(self.name, dead)
        return len(dead)


class ValueState(_State, Generic[T]):
    """One value per key."""

    def __init__(
        self, store: KeyedStateStore, name: str, codec: Codec[T], ttl: int | None
    ) -> None:
        super().__init__(store, name, ttl)
        self.codec = codec

    def get(self, key: bytes) -> T | None:
        payload = self._unwrap(self._backend.get(self.name, key))
        return None if payload is None else self.codec.decode(payload)

    def get_many(self, keys: Sequence[bytes]) -> list[T | None]:
        decode = self.codec.decode
        return [
            None if payload is None else decode(payload)
            for payload in map(self._unwrap, self._backend.get_many(self.name, keys))
        ]

    def put(self, key: bytes, value: T, time: int | None = None) -> None:
        payload = self._wrap(self.codec.encode(value), time)
        self._backend.put(self.name, key, payload)

    def put_many(
        self, items: Iterable[tuple[bytes, T]], time: int | None = None
    ) -> None:
        encode = self.codec.encode
        self._backend.put_many(
            self.name,
            ((key, b"", self._wrap(encode(value), time)) for key, value in items),
        )

    def put_encoded(
        self, items: Iterable[tuple[bytes, bytes]], time: int | None = None
    ) -> None:
        """Store values already encoded with this state's codec."""
        self._backend.put_many(
            self.name, ((key, b"", self._wrap(value, time)) for key, value in items)
        )

    def get_encoded(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Return the encoded values of `keys` (None where absent or expired)."""
        return [self._unwrap(v) for v in self._backend.get_many(self.name, keys)]

    def delete(self, key: bytes) -> None:
        self._backend.delete(self.name, key)

    def delete_many(self, keys: Iterable[bytes]) -> None:
        self._backend.delete_many(self.name, ((key, b"") for key in keys))

    def items(self) -> Iterator[tuple[bytes, T]]:
        """Yield every live key and value. Do not write while iterating."""
        decode = self.codec.decode
        for key, payload in self.items_encoded():
            yield key, decode(payload)

    def items_encoded(self) -> Iterator[tuple[bytes, bytes]]:
        """Yield every live key and its encoded value."""
        for key, _, stored in self._backend.scan(self.name):
            payload = self._unwrap(stored)
            if payload is not None:
                yield key, payload


class ListState(_State, Generic[T]):
    """A list of values per key, stored as one entry.

    With a TTL the whole list expires together: `add` moves its expiry
    later, never earlier, and `update` sets it anew.
    """

    def __init__(
        self, store: KeyedStateStore, name: str, codec: Codec[T], ttl: int | None
    ) -> None:
        super().__init__(store, name, ttl)
        self.codec = codec

    def get(self, key: bytes) -> list[T]:
        payload = self._unwrap(self._backend.get(self.name, key))
        return [] if payload is None else self.codec.decode_all(payload)

    def get_many(self, keys: Sequence[bytes]) -> list[list[T]]:
        decode = self.codec.decode_all
        return [
            [] if payload is None else decode(payload)
            for payload in map(self._unwrap, self._backend.get_many(self.name, keys))
        ]

    def add(self, key: bytes, value: T, time: int | None = None) -> None:
        self.add_all(key, [value], time)

    def add_all(self, key: bytes, values: Iterable[T], time: int | None = None) -> None:
        self.add_many([(key, values)], time)

    def add_many(
        self, items: Sequence[tuple[bytes, Iterable[T]]], time: int | None = None
    ) -> None:
        """Append values to the lists of several keys, with one read and write."""
        keys = [key for key, _ in items]
        stored = self._backend.get_many(self.name, keys)
        entries = []
        for (key, values), old in zip(items, stored, strict=True):
            payload = self._unwrap(old)
            floor = None
            if payload is not None and self.ttl is not None and old is not None:
                floor = self._stored_expiry(old)
            added = self.codec.encode_all(values)
            merged = added if payload is None else payload + added
            entries.append((key, b"", self._wrap(merged, time, floor)))
        self._backend.put_many(self.name, entries)

    def update(self, key: bytes, values: Iterable[T], time: int | None = None) -> None:
        self.update_many([(key, values)], time)

    def update_many(
        self,
        items: Sequence[tuple[bytes, Iterable[T]]],
        time: int | Sequence[int] | None = None,
    ) -> None:
        """Replace the lists of several keys; an empty list deletes the key.

        `time` is one event time for all items, or one per item.
        """
        times = _per_item(time, len(items))
        puts = []
        deletes = []
        for (key, values), one_time in zip(items, times, strict=True):
            payload = self.codec.encode_all(values)
            if payload:
                puts.append((key, b"", self._wrap(payload, one_time)))
            else:
                deletes.append((key, b""))
        self._backend.put_many(self.name, puts)
        self._backend.delete_many(self.name, deletes)

    def clear(self, key: bytes) -> None:
        self._backend.delete(self.name, key)

    def items(self) -> Iterator[tuple[bytes, list[T]]]:
        """Yield every live key and its list. Do not write while iterating."""
        for key, _, stored in self._backend.scan(self.name):
            payload = self._unwrap(stored)
            if payload is not None:
                yield key, self.codec.decode_all(payload)


class MapState(_State, Generic[K, V]):
    """A map from user keys to values per key; each entry expires on its own."""

    def __init__(
        self,
        store: KeyedStateStore,
        name: str,
        key_codec: Codec[K],
        value_codec: Codec[V],
        ttl: int | None,
    ) -> None:
        super().__init__(store, name, ttl)
        self.key_codec = key_codec
        self.value_codec = value_codec

    def _sub(self, user_key: K) -> bytes:
        sub = self.key_codec.encode(user_key)
        # The empty sub-key is where value states live; keep map keys apart.
        return b"\x00" + sub

    def get(self, key: bytes, user_key: K) -> V | None:
        payload = self._unwrap(self._backend.get(self.name, key, self._sub(user_key)))
        return None if payload is None else self.value_codec.decode(payload)

    def contains(self, key: bytes, user_key: K) -> bool:
        stored = self._backend.get(self.name, key, self._sub(user_key))
        return self._unwrap(stored) is not None

    def put(self, key: bytes, user_key: K, value: V, time: int | None = None) -> None:
        payload = self._wrap(self.value_codec.encode(value), time)
        self._backend.put(self.name, key, payload, self._sub(user_key))

    def put_many(
        self, entries: Iterable[tuple[bytes, K, V]], time: int | None = None
    ) -> None:
        encode = self.value_codec.encode
        self._backend.put_many(
            self.name,
            (
                (key, self._sub(user_key), self._wrap(encode(value), time))
                for key, user_key, value in entries
            ),
        )

    def remove(self, key: bytes, user_key: K) -> None:
        self._backend.delete(self.name, key, self._sub(user_key))

    def clear(self, key: bytes) -> None:
        self._backend.delete_key(self.name, key)

    def items(self, key: bytes) -> Iterator[tuple[K, V]]:
        """Yield the live entries of `key`'s map."""
        for _, sub, stored in list(self._backend.scan(self.name, key)):
            payload = self._unwrap(stored)
            if payload is not None:
                yield self.key_codec.decode(sub[1:]), self.value_codec.decode(payload)

    def keys(self, key: bytes) -> Iterator[K]:
        for user_key, _ in self.items(key):
            yield user_key

    def size(self, key: bytes) -> int:
        return sum(1 for _ in self.items(key))

    def sizes(self) -> dict[bytes, int]:
        """Return the number of live entries of every key's map."""
        counts: dict[bytes, int] = {}
        for key, _, stored in self._backend.scan(self.name):
            if self._unwrap(stored) is not None:
                counts[key] = counts.get(key, 0) + 1
        return counts


def _per_item(time: int | Sequence[int] | None, count: int) -> Sequence[int | None]:
    if time is None or isinstance(time, int):
        return [time] * count
    if len(time) != count:
        raise ValueError(f"got {len(time)} times for {count} items; give one per item")
    return time


# --- the store --------------------------------------------------------------------


def _micros(ttl: timedelta | int | None) -> int | None:
    if ttl is None or isinstance(ttl, int):
        return ttl
    return (ttl.days * 86_400 + ttl.seconds) * 1_000_000 + ttl.microseconds


class KeyedStateStore:
    """The keyed states of one operator instance, in one backend.

    Args:
        backend: Where entries are stored; a new in-memory backend if None.
    """

    def __init__(self, backend: StateBackend | None = None) -> None:
        if backend is None:
            from dataflare.state.backends import MemoryBackend

            backend = MemoryBackend()
        self.backend = backend
        self.watermark = MIN_TIME
        self.first_watermark: int | None = None
        self._last_sweep = MIN_TIME
        self._states: dict[str, _State] = {}

    @classmethod
    def for_operator(cls, context: Any) -> KeyedStateStore:
        """Open a store with the backend the pipeline configures for `context`.

        Raises:
            StateBackendError: the backend cannot be created.
        """
        label = f"{getattr(context, 'step', 'state')}-{getattr(context, 'instance', 0)}"
        return cls(create_backend(settings_of(context), label))

    # --- states ---

    def _register(self, state: Any) -> Any:
        existing = self._states.get(state.name)
        if existing is not None and type(existing) is not type(state):
            raise ValueError(
                f"keyed state {state.name!r} is already a "
                f"{type(existing).__name__}; give the {type(state).__name__} "
                "another name"
            )
        self._states[state.name] = state
        return state

    def value_state(
        self,
        name: str,
        codec: Codec[T] = JSON,
        ttl: timedelta | int | None = None,
    ) -> ValueState[T]:
        """Return the value state `name`; `ttl` is a timedelta or microseconds."""
        state: ValueState[T] = self._register(
            ValueState(self, name, codec, _micros(ttl))
        )
        return state

    def list_state(
        self,
        name: str,
        codec: Codec[T] = JSON,
        ttl: timedelta | int | None = None,
    ) -> ListState[T]:
        """Return the list state `name`; `ttl` is a timedelta or microseconds."""
        state: ListState[T] = self._register(ListState(self, name, codec, _micros(ttl)))
        return state

    def map_state(
        self,
        name: str,
        key_codec: Codec[K] = JSON,
        value_codec: Codec[V] = JSON,
        ttl: timedelta | int | None = None,
    ) -> MapState[K, V]:
        """Return the map state `name`; `ttl` is a timedelta or microseconds."""
        state: MapState[K, V] = self._register(
            MapState(self, name, key_codec, value_codec, _micros(ttl))
        )
        return state

    # --- time ---

    def expiry(self, ttl: int, time: int | None) -> int:
        """Return the expiry of an entry written now with `ttl` and `time`."""
        if time is None:
            if self.first_watermark is None:
                return _UNSET
            time = self.watermark
        return max(MIN_TIME + 1, min(MAX_TIME, time + ttl))

    def expired(self, expiry: int, ttl: int) -> bool:
        if expiry == _UNSET:
            if self.first_watermark is None:
                return False
            expiry = self.first_watermark + ttl
        return expiry <= self.watermark

    def advance_watermark(self, watermark: int) -> None:
        """Move the event-time clock; sweep expired entries when one is due."""
        if watermark <= self.watermark:
            return
        self.watermark = watermark
        if self.first_watermark is None:
            self.first_watermark = watermark
        ttls = [s.ttl for s in self._states.values() if s.ttl is not None]
        if ttls and watermark - self._last_sweep >= min(ttls):
            self.sweep()

    def sweep(self) -> int:
        """Delete every expired entry now; return how many were deleted."""
        self._last_sweep = self.watermark
        return sum(state.sweep() for state in self._states.values())

    # --- checkpoints ---

    def snapshot(self) -> bytes:
        """Return the whole store (clock and every state) for a checkpoint."""
        header = orjson.dumps(
            {
                "format": _FORMAT,
                "watermark": self.watermark,
                "first_watermark": self.first_watermark,
                "last_sweep": self._last_sweep,
            }
        )
        return _HEADER.pack(len(header)) + header + self.backend.snapshot()

    def restore(self, data: bytes) -> None:
        """Replace the store's content with a `snapshot()`.

        Raises:
            StateBackendError: `data` is not a keyed state snapshot.
        """
        try:
            (size,) = _HEADER.unpack_from(data)
            header = orjson.loads(data[_HEADER.size : _HEADER.size + size])
        except (struct.error, orjson.JSONDecodeError) as exc:
            raise StateBackendError(
                f"keyed state of {len(data)} bytes has no valid header ({exc}); "
                "the checkpoint is corrupt or was written by another operator"
            ) from exc
        if header.get("format") != _FORMAT:
            raise StateBackendError(
                f"keyed state has format {header.get('format')!r}; this version "
                f"reads {_FORMAT}. Resume with the DataFlare version that wrote "
                "the checkpoint, or run with --from-scratch"
            )
        self.watermark = int(header["watermark"])
        self.first_watermark = header["first_watermark"]
        self._last_sweep = int(header["last_sweep"])
        self.backend.restore(data[_HEADER.size + size :])

    def close(self) -> None:
        """Release the backend (a disk backend deletes its working files)."""
        self.backend.close()

"""Redis as the lookup table of the `enrichment` transformation.

Example, the airline's name for each flight from Redis::

    transformations:
      named:
        type: enrichment
        inputs: [delayed]
        config:
          table:
            redis:
              url: redis://127.0.0.1:6379/0
              key_prefix: "airline:"        # key airline:AA contains {"name": ...}
              schema: {name: string}
          on: carrier
          fields: {airline: name}

Two layouts are read:

- `key_prefix`: one Redis key per table row, the prefix followed by the
  row's key. With `value: json` (the default) the key contains a JSON object
  string; with `value: hash` it is a Redis hash of the row's fields.
- `hash`: one Redis hash for the whole table; each field is a row's key and
  its value a JSON object string.

A key of several `on` fields is their values joined with `separator`.
Values are converted to the types of `schema`, the table's fields. Keys are
looked up per batch, each distinct key once, and found rows (and misses)
are cached for `cache_ttl` up to `cache_size` keys, so a changed row is seen
within `cache_ttl`. A value that is not a JSON object of the schema counts
as a miss and is logged.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import redis

from dataflare.connectors.common import reconnecting
from dataflare.connectors.files.jsonl import converter_for
from dataflare.connectors.redis.client import CONNECTION_ERRORS, connect
from dataflare.connectors.redis.config import RedisLookupConfig
from dataflare.plugin.interface import FieldNotFoundError

logger = logging.getLogger(__name__)

_ROUND_TRIP_KEYS = 1000


class RedisLookup:
    """Look up rows in Redis for the distinct keys of each batch.

    Args:
        config: The location of the rows and their field types.
        on: The stream fields that make up the key.
        fields: Output field name to table field name.
        step: The step id, for log lines and errors.

    Raises:
        FieldNotFoundError: `fields` names a field that `schema` lacks.
    """

    def __init__(
        self,
        config: RedisLookupConfig,
        *,
        on: Sequence[str],
        fields: dict[str, str],
        step: str,
    ) -> None:
        self.config = config
        self.on = list(on)
        self.fields = dict(fields)
        self.step = step
        self.schema = config.table_schema()
        for out, source in self.fields.items():
            if source not in self.schema.names:
                raise FieldNotFoundError(
                    source, self.schema.names, where=f"fields.{out}"
                )
        self._converters = {
            name: converter_for(self.schema.field(name).type)
            for name in set(self.fields.values())
        }
        self._client: redis.Redis | None = None
        self._cache: collections.OrderedDict[str, tuple[float, dict[str, Any] | None]]
        self._cache = collections.OrderedDict()
        self.lookups = 0  # keys fetched from Redis (cache misses)

    def empty_frame(self, stream: pa.Schema) -> pl.DataFrame:
        """Return an empty lookup frame: the key fields and the output fields."""
        keys = pl.from_arrow(stream.empty_table().select(self.on))
        assert isinstance(keys, pl.DataFrame)
        return self._frame(keys, [])

    def frame(self, keys: pl.DataFrame) -> pl.DataFrame:
        """Return the rows found for the distinct keys of `keys` (its `on` columns).

        The result has the `on` columns and the output fields, one row per
        key found in Redis. Keys that Redis lacks are left out, as a file
        table lacks them.
        """
        distinct = keys.select(self.on).unique(maintain_order=True)
        texts = [self._key_text(row) for row in distinct.iter_rows()]
        rows = self._rows(texts)
        found = [i for i, row in enumerate(rows) if row is not None]
        return self._frame(distinct[found], [rows[i] for i in found])

    def _frame(
        self, keys: pl.DataFrame, rows: list[dict[str, Any] | None]
    ) -> pl.DataFrame:
        columns = {}
        for out, source in self.fields.items():
            values = [None if row is None else row.get(source) for row in rows]
            array = pa.array(values, type=self.schema.field(source).type)
            columns[out] = pl.from_arrow(array)
        added = pl.DataFrame(columns) if columns else pl.DataFrame()
        return pl.concat([keys, added], how="horizontal") if columns else keys

    def _key_text(self, values: tuple[Any, ...]) -> str | None:
        if any(v is None for v in values):
            return None
        return self.config.separator.join(_text(v) for v in values)

    # --- fetching, with the cache ---

    def _rows(self, keys: list[str | None]) -> list[dict[str, Any] | None]:
        now = time.monotonic()
        found: dict[str, dict[str, Any] | None] = {}
        missing: list[str] = []
        for key in keys:
            if key is None or key in found:
                continue
            cached = self._cache.get(key)
            if cached is not None and cached[0] > now:
                found[key] = cached[1]
                self._cache.move_to_end(key)
            else:
                missing.append(key)
        for start in range(0, len(missing), _ROUND_TRIP_KEYS):
            part = missing[start : start + _ROUND_TRIP_KEYS]
            fetched: list[Any] = reconnecting(
                lambda part=part: self._fetch(part),  # type: ignore[misc]
                step=self.step,
                what=f"look up {len(part)} keys in Redis at {self.config.address()}",
                errors=CONNECTION_ERRORS,
                give_up_after=self.config.reconnect_for.total_seconds(),
            )
            self.lookups += len(part)
            for key, raw in zip(part, fetched, strict=True):
                row = self._decode(key, raw)
                found[key] = row
                self._remember(key, row, now)
        return [None if key is None else found[key] for key in keys]

    def _remember(self, key: str, row: dict[str, Any] | None, now: float) -> None:
        size = self.config.cache_size
        if size == 0:
            return
        self._cache[key] = (now + self.config.cache_ttl.total_seconds(), row)
        self._cache.move_to_end(key)
        while len(self._cache) > size:
            self._cache.popitem(last=False)

    def _connection(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.config)
        return self._client

    def _fetch(self, keys: list[str]) -> list[Any]:
        client = self._connection()
        config = self.config
        if config.hash is not None:
            return list(client.hmget(config.hash, keys))
        prefixed = [f"{config.key_prefix}{key}" for key in keys]
        if config.value == "json":
            return list(client.mget(prefixed))
        requested = sorted(set(self.fields.values()))
        pipe = client.pipeline(transaction=False)
        for key in prefixed:
            pipe.hmget(key, requested)
        replies = pipe.execute()
        return [
            None
            if all(v is None for v in reply)
            else dict(zip(requested, reply, strict=True))
            for reply in replies
        ]

    def _decode(self, key: str, raw: Any) -> dict[str, Any] | None:
        """Convert a fetched value to a row of the schema; None for a miss."""
        if raw is None:
            return None
        if isinstance(raw, dict):
            values: Any = {
                k: None if v is None else v.decode("utf-8", "replace")
                for k, v in raw.items()
            }
        else:
            try:
                values = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                return self._bad(key, f"is not JSON ({exc.msg})")
            if not isinstance(values, dict):
                return self._bad(key, "is not a JSON object")
        row = {}
        for name, convert in self._converters.items():
            value = values.get(name)
            try:
                row[name] = convert(value)
            except (ValueError, TypeError, OverflowError) as exc:
                return self._bad(key, f"has field {name!r} = {value!r}, which {exc}")
        return row

    def _bad(self, key: str, problem: str) -> dict[str, Any] | None:
        config = self.config
        if config.hash is not None:
            where = f"field {key!r} of hash {config.hash!r}"
        else:
            where = f"key {config.key_prefix}{key!r}"
        logger.warning(
            "step %r: the Redis lookup row in %s %s; treating it as missing. "
            "Fix the value in Redis or the lookup schema",
            self.step,
            where,
            problem,
        )
        return None

    def close(self) -> None:
        client = self._client
        self._client = None
        if client is not None:
            client.close()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

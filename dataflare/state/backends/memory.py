"""`MemoryBackend`: keyed state in Python dictionaries (the default)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from dataflare.state.backends.base import (
    SNAPSHOT_ROWS,
    Columns,
    Entry,
    StateBackend,
    columns_of,
)


class MemoryBackend(StateBackend):
    """Keep every entry in memory: fastest, but bounded by the process's memory.

    Entries with an empty sub-key (value and list states) are in one flat
    dictionary per table. Entries with a sub-key (map states) are in one
    dictionary per key, so `scan(table, key)` reads only that key.
    """

    kind = "memory"

    def __init__(self) -> None:
        self._flat: dict[str, dict[bytes, bytes]] = {}
        self._nested: dict[str, dict[bytes, dict[bytes, bytes]]] = {}

    def get(self, table: str, key: bytes, sub: bytes = b"") -> bytes | None:
        if not sub:
            return self._flat.get(table, {}).get(key)
        return self._nested.get(table, {}).get(key, {}).get(sub)

    def get_many(
        self, table: str, keys: Sequence[bytes], sub: bytes = b""
    ) -> list[bytes | None]:
        if sub:
            return super().get_many(table, keys, sub)
        values = self._flat.get(table, {})
        return [values.get(key) for key in keys]

    def put(self, table: str, key: bytes, value: bytes, sub: bytes = b"") -> None:
        if not sub:
            self._flat.setdefault(table, {})[key] = value
        else:
            self._nested.setdefault(table, {}).setdefault(key, {})[sub] = value

    def put_many(self, table: str, entries: Iterable[Entry]) -> None:
        flat = self._flat.setdefault(table, {})
        nested = None
        for key, sub, value in entries:
            if not sub:
                flat[key] = value
                continue
            if nested is None:
                nested = self._nested.setdefault(table, {})
            nested.setdefault(key, {})[sub] = value

    def delete(self, table: str, key: bytes, sub: bytes = b"") -> None:
        if not sub:
            self._flat.get(table, {}).pop(key, None)
            return
        entries = self._nested.get(table, {}).get(key)
        if entries is not None:
            entries.pop(sub, None)
            if not entries:
                del self._nested[table][key]

    def delete_key(self, table: str, key: bytes) -> None:
        self._flat.get(table, {}).pop(key, None)
        self._nested.get(table, {}).pop(key, None)

    def scan(self, table: str, key: bytes | None = None) -> Iterator[Entry]:
        flat = self._flat.get(table, {})
        nested = self._nested.get(table, {})
        if key is not None:
            if key in flat:
                yield key, b"", flat[key]
            for sub, value in nested.get(key, {}).items():
                yield key, sub, value
            return
        for one_key, value in flat.items():
            yield one_key, b"", value
        for one_key, entries in nested.items():
            for sub, value in entries.items():
                yield one_key, sub, value

    def snapshot_columns(self, table: str) -> Iterator[Columns]:
        flat = self._flat.get(table, {})
        keys, values = list(flat), list(flat.values())
        for start in range(0, len(keys), SNAPSHOT_ROWS):
            part = keys[start : start + SNAPSHOT_ROWS]
            yield part, [b""] * len(part), values[start : start + SNAPSHOT_ROWS]
        nested = self._nested.get(table)
        if nested:
            yield from columns_of(self._scan_nested(nested))

    @staticmethod
    def _scan_nested(nested: dict[bytes, dict[bytes, bytes]]) -> Iterator[Entry]:
        for key, entries in nested.items():
            for sub, value in entries.items():
                yield key, sub, value

    def tables(self) -> list[str]:
        names = {name for name, values in self._flat.items() if values}
        names |= {name for name, values in self._nested.items() if values}
        return sorted(names)

    def clear(self) -> None:
        self._flat.clear()
        self._nested.clear()

    def close(self) -> None:
        self.clear()

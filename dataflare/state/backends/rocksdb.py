"""`RocksDbBackend`: keyed state in RocksDB (through `rocksdict`), on disk.

Each entry is stored under one RocksDB key: the table name, the key and the
sub-key, with the lengths of the first two in front of them. So the entries
of one table, or of one key, are adjacent and read by one seek.
The database is working storage, not the durable copy: checkpoints hold the
state, so writes skip RocksDB's write-ahead log, and the folder is deleted
when the operator closes.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dataflare.state.backends.base import Entry, StateBackend, StateBackendError

_TABLE = struct.Struct(">H")
_KEY = struct.Struct(">I")


def _require_rocksdict() -> Any:
    try:
        import rocksdict
    except ImportError as exc:
        raise StateBackendError(
            "the RocksDB state backend needs the `rocksdict` package, which is "
            "not installed; install it with `pip install rocksdict`"
        ) from exc
    return rocksdict


class RocksDbBackend(StateBackend):
    """Keep entries in a RocksDB database in a new folder.

    Args:
        directory: Folder for the working files; a new folder is made in it
            and deleted by `close()`.
        label: Prefix of that folder's name, for example the step and instance.
        cache_bytes: Block cache for reads, in bytes.
        write_buffer_bytes: Size of one memtable, in bytes. RocksDB keeps up
            to two, so the backend needs about `cache_bytes` plus twice this
            much memory at most.
    """

    kind = "rocksdb"

    def __init__(
        self,
        directory: str | None,
        label: str,
        cache_bytes: int = 128 << 20,
        write_buffer_bytes: int = 128 << 20,
    ) -> None:
        rocksdict = _require_rocksdict()
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        # A large memtable keeps recent writes out of the sorted files. With
        # bench/checkpoints.py's backend test (one million keys), 128 MiB
        # instead of 64 MiB about doubled batched random reads.
        options.set_write_buffer_size(write_buffer_bytes)
        options.set_max_background_jobs(2)
        table_options = rocksdict.BlockBasedOptions()
        table_options.set_block_cache(rocksdict.Cache(cache_bytes))
        table_options.set_bloom_filter(10, False)
        options.set_block_based_table_factory(table_options)
        try:
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=directory))
            self._db = rocksdict.Rdict(str(self.folder / "db"), options)
        except Exception as exc:
            raise StateBackendError(
                f"cannot create the RocksDB state folder in "
                f"{directory or 'the temp dir'}: {exc}; check that state_dir "
                "exists and is writable"
            ) from exc
        write_options = rocksdict.WriteOptions()
        write_options.disable_wal = True
        self._db.set_write_options(write_options)
        self._batch_type = rocksdict.WriteBatch
        self._tables: set[str] = set()

    @staticmethod
    def _table_prefix(table: str) -> bytes:
        name = table.encode()
        return _TABLE.pack(len(name)) + name

    def _key_prefix(self, table: str, key: bytes) -> bytes:
        return self._table_prefix(table) + _KEY.pack(len(key)) + key

    def get(self, table: str, key: bytes, sub: bytes = b"") -> bytes | None:
        value: bytes | None = self._db.get(self._key_prefix(table, key) + sub)
        return value

    def get_many(
        self, table: str, keys: Sequence[bytes], sub: bytes = b""
    ) -> list[bytes | None]:
        if not keys:
            return []
        prefix = self._table_prefix(table)
        stored = [prefix + _KEY.pack(len(key)) + key + sub for key in keys]
        values: list[bytes | None] = self._db.get(stored)
        return values

    def put(self, table: str, key: bytes, value: bytes, sub: bytes = b"") -> None:
        self._tables.add(table)
        self._db.put(self._key_prefix(table, key) + sub, value)

    def put_many(self, table: str, entries: Iterable[Entry]) -> None:
        self._tables.add(table)
        prefix = self._table_prefix(table)
        batch = self._batch_type(raw_mode=True)
        for key, sub, value in entries:
            batch.put(prefix + _KEY.pack(len(key)) + key + sub, value)
        self._db.write(batch)

    def delete(self, table: str, key: bytes, sub: bytes = b"") -> None:
        self._db.delete(self._key_prefix(table, key) + sub)

    def delete_many(self, table: str, entries: Iterable[tuple[bytes, bytes]]) -> None:
        prefix = self._table_prefix(table)
        batch = self._batch_type(raw_mode=True)
        for key, sub in entries:
            batch.delete(prefix + _KEY.pack(len(key)) + key + sub)
        self._db.write(batch)

    def scan(self, table: str, key: bytes | None = None) -> Iterator[Entry]:
        table_prefix = self._table_prefix(table)
        prefix = table_prefix if key is None else self._key_prefix(table, key)
        start = len(table_prefix)
        for stored, value in self._db.items(from_key=prefix):
            if not stored.startswith(prefix):
                return
            (size,) = _KEY.unpack_from(stored, start)
            key_end = start + _KEY.size + size
            yield stored[start + _KEY.size : key_end], stored[key_end:], value

    def tables(self) -> list[str]:
        return sorted(self._tables)

    def clear(self) -> None:
        for table in list(self._tables):
            prefix = self._table_prefix(table)
            end = prefix[:-1] + bytes([prefix[-1] + 1]) if prefix[-1] < 255 else None
            if end is None:
                self.delete_many(table, [(k, s) for k, s, _ in self.scan(table)])
            else:
                self._db.delete_range(prefix, end)
        self._tables.clear()

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

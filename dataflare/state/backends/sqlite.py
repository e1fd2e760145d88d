"""`SqliteBackend`: keyed state in an SQLite file, for state larger than memory.

The file is working storage, not the durable copy: checkpoints hold the
state, so the database runs without a journal and without syncs, and is
deleted when the operator closes.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from dataflare.state.backends.base import Entry, StateBackend, StateBackendError

_IN_CHUNK = 500  # keys per `IN (...)` query, below SQLite's variable limit
_COMMIT_EVERY = 100_000  # writes per transaction


class SqliteBackend(StateBackend):
    """Keep entries in one SQLite table, indexed by `(table, key, sub)`.

    Args:
        directory: Folder for the working files; a new folder is made in it
            and deleted by `close()`.
        label: Prefix of that folder's name, for example the step and instance.
        cache_bytes: Page cache of SQLite, in bytes.
    """

    kind = "sqlite"

    def __init__(
        self, directory: str | None, label: str, cache_bytes: int = 256 << 20
    ) -> None:
        try:
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=directory))
            self._db = sqlite3.connect(
                self.folder / "state.sqlite", isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise StateBackendError(
                "cannot create the SQLite state file in "
                f"{directory or 'the temp dir'}: {exc}; check that state_dir "
                "exists and is writable"
            ) from exc
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(f"PRAGMA cache_size=-{cache_bytes // 1024}")
        self._db.execute("PRAGMA temp_store=MEMORY")
        self._db.execute(
            "CREATE TABLE entries (tbl TEXT NOT NULL, key BLOB NOT NULL, "
            "sub BLOB NOT NULL, value BLOB NOT NULL, PRIMARY KEY (tbl, key, sub)) "
            "WITHOUT ROWID"
        )
        self._writes = 0
        self._tables: set[str] = set()
        self._db.execute("BEGIN")

    def _wrote(self, count: int) -> None:
        self._writes += count
        if self._writes >= _COMMIT_EVERY:
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            self._writes = 0

    def get(self, table: str, key: bytes, sub: bytes = b"") -> bytes | None:
        row = self._db.execute(
            "SELECT value FROM entries WHERE tbl = ? AND key = ? AND sub = ?",
            (table, key, sub),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(
        self, table: str, keys: Sequence[bytes], sub: bytes = b""
    ) -> list[bytes | None]:
        found: dict[bytes, bytes] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _IN_CHUNK):
            chunk = unique[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT key, value FROM entries WHERE tbl = ? AND sub = ? "
                f"AND key IN ({marks})",
                (table, sub, *chunk),
            )
            found.update((bytes(k), bytes(v)) for k, v in rows)
        return [found.get(key) for key in keys]

    def put(self, table: str, key: bytes, value: bytes, sub: bytes = b"") -> None:
        self._tables.add(table)
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)",
            (table, key, sub, value),
        )
        self._wrote(1)

    def put_many(self, table: str, entries: Iterable[Entry]) -> None:
        self._tables.add(table)
        rows = [(table, key, sub, value) for key, sub, value in entries]
        self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)", rows)
        self._wrote(len(rows))

    def delete(self, table: str, key: bytes, sub: bytes = b"") -> None:
        self._db.execute(
            "DELETE FROM entries WHERE tbl = ? AND key = ? AND sub = ?",
            (table, key, sub),
        )
        self._wrote(1)

    def delete_many(self, table: str, entries: Iterable[tuple[bytes, bytes]]) -> None:
        rows = [(table, key, sub) for key, sub in entries]
        self._db.executemany(
            "DELETE FROM entries WHERE tbl = ? AND key = ? AND sub = ?", rows
        )
        self._wrote(len(rows))

    def delete_key(self, table: str, key: bytes) -> None:
        self._db.execute("DELETE FROM entries WHERE tbl = ? AND key = ?", (table, key))
        self._wrote(1)

    def scan(self, table: str, key: bytes | None = None) -> Iterator[Entry]:
        if key is None:
            rows = self._db.execute(
                "SELECT key, sub, value FROM entries WHERE tbl = ?", (table,)
            )
        else:
            rows = self._db.execute(
                "SELECT key, sub, value FROM entries WHERE tbl = ? AND key = ?",
                (table, key),
            )
        for one_key, sub, value in rows:
            yield bytes(one_key), bytes(sub), bytes(value)

    def tables(self) -> list[str]:
        return sorted(self._tables)

    def clear(self) -> None:
        self._db.execute("DELETE FROM entries")
        self._tables.clear()

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

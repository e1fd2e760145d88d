"""Logical replication from PostgreSQL with the built-in `pgoutput` plugin.

psycopg 3 has no replication API, but since 3.3 it runs `START_REPLICATION`
on a `replication=database` connection and leaves the connection in the
COPY BOTH state. This module reads that stream through psycopg's libpq layer
(`psycopg.pq`): it decodes the replication protocol's messages (XLogData,
keepalives) and the pgoutput messages inside them (Begin, Relation, Insert,
Update, Delete, Commit), and answers with standby status updates that
acknowledge the LSN that checkpoints made durable.

Values arrive in their text form and are converted by psycopg's own loaders
for each column's type, so they equal what a SELECT returns.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import abc, pq
from psycopg.adapt import Transformer

from dataflare.connectors.postgres.types import NUMERIC, arrow_type

TEXT_OID = 25

# Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
_PG_EPOCH_US = 946_684_800_000_000


class ReplicationError(RuntimeError):
    """The replication stream broke its protocol or reported an error."""


def format_lsn(lsn: int) -> str:
    """Format an LSN as PostgreSQL prints it: `16/B374D848`."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass
class Relation:
    """A table as described by a pgoutput Relation message."""

    oid: int
    schema: str
    name: str
    columns: list[str]
    type_oids: list[int]
    key_flags: list[bool]


@dataclass
class Change:
    """One row change of a replicated table."""

    op: str  # insert, update, delete
    relation: Relation
    new: list[Any] | None  # column values after the change (text form)
    old: list[Any] | None  # key or old row (for updates with old values, deletes)
    unchanged: list[bool] = field(default_factory=list)  # TOASTed values not sent


@dataclass
class Begin:
    final_lsn: int
    commit_time_us: int
    xid: int


@dataclass
class Commit:
    commit_lsn: int
    end_lsn: int


Message = Begin | Commit | Change | Relation


class _Reader:
    """Read fields from one pgoutput message."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def byte(self) -> bytes:
        value = self.data[self.at : self.at + 1]
        self.at += 1
        return value

    def int(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return int(value)

    def string(self) -> str:
        end = self.data.index(b"\0", self.at)
        value = self.data[self.at : end].decode()
        self.at = end + 1
        return value

    def tuple(self) -> tuple[list[bytes | None], list[bool]]:
        count = self.int("!h")
        values: list[bytes | None] = []
        unchanged: list[bool] = []
        for _ in range(count):
            kind = self.byte()
            if kind == b"n":
                values.append(None)
                unchanged.append(False)
            elif kind == b"u":
                values.append(None)
                unchanged.append(True)
            elif kind in (b"t", b"b"):
                size = self.int("!i")
                values.append(self.data[self.at : self.at + size])
                self.at += size
                unchanged.append(False)
            else:
                raise ReplicationError(f"unknown tuple field kind {kind!r}")
        return values, unchanged


class PgOutputDecoder:
    """Turn pgoutput messages into `Begin`, `Change`, `Commit` and `Relation`."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.relations: dict[int, Relation] = {}
        self._connection = connection
        self._loaders: dict[int, abc.Transformer] = {}

    def decode(self, data: bytes) -> Message | None:
        reader = _Reader(data)
        kind = reader.byte()
        if kind == b"B":
            final_lsn = reader.int("!Q")
            commit_time = reader.int("!q")
            xid = reader.int("!I")
            return Begin(final_lsn, commit_time + _PG_EPOCH_US, xid)
        if kind == b"C":
            reader.int("!B")  # flags
            commit_lsn = reader.int("!Q")
            end_lsn = reader.int("!Q")
            return Commit(commit_lsn, end_lsn)
        if kind == b"R":
            return self._relation(reader)
        if kind in (b"I", b"U", b"D"):
            return self._change(kind, reader)
        # Type, Origin, Truncate and logical Message are not row changes.
        return None

    def _relation(self, reader: _Reader) -> Relation:
        oid = reader.int("!I")
        schema = reader.string() or "pg_catalog"
        name = reader.string()
        reader.byte()  # replica identity setting
        count = reader.int("!h")
        columns, types, keys, loads = [], [], [], []
        for _ in range(count):
            flags = reader.int("!B")
            columns.append(reader.string())
            type_oid = reader.int("!I")
            modifier = reader.int("!i")
            types.append(type_oid)
            keys.append(bool(flags & 1))
            precision = scale = None
            if type_oid == NUMERIC and modifier >= 4:
                precision = ((modifier - 4) >> 16) & 0xFFFF
                scale = (modifier - 4) & 0xFFFF
            # Types read as text by a SELECT are loaded as text here too.
            known = arrow_type(type_oid, precision, scale) is not None
            loads.append(type_oid if known else TEXT_OID)
        relation = Relation(oid, schema, name, columns, types, keys)
        self.relations[oid] = relation
        loader: abc.Transformer = Transformer(self._connection)
        loader.set_loader_types(loads, pq.Format.TEXT)
        self._loaders[oid] = loader
        return relation

    def _change(self, kind: bytes, reader: _Reader) -> Change:
        oid = reader.int("!I")
        relation = self.relations.get(oid)
        if relation is None:
            raise ReplicationError(
                f"change for relation {oid} arrived before its description"
            )
        loader = self._loaders[oid]
        old: list[Any] | None = None
        new: list[Any] | None = None
        unchanged: list[bool] = []
        marker = reader.byte()
        if kind == b"I":
            values, unchanged = reader.tuple()
            new = list(loader.load_sequence(values))
            return Change("insert", relation, new, None, unchanged)
        if marker in (b"K", b"O"):
            values, _ = reader.tuple()
            old = list(loader.load_sequence(values))
            if kind == b"D":
                return Change("delete", relation, None, old)
            marker = reader.byte()
        if marker != b"N":
            raise ReplicationError(f"unexpected tuple marker {marker!r}")
        values, unchanged = reader.tuple()
        new = list(loader.load_sequence(values))
        return Change("update", relation, new, old, unchanged)


class ReplicationStream:
    """A `START_REPLICATION` stream of one slot, read message by message."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection
        self.pgconn = connection.pgconn
        self.received = 0  # highest WAL end position seen
        self._last_status = 0.0

    def start(self, slot: str, publication: str, start_lsn: int = 0) -> None:
        quoted_slot = psycopg.sql.Identifier(slot).as_string(self.connection)
        quoted_pub = psycopg.sql.Literal(publication).as_string(self.connection)
        self.connection.execute(
            f"START_REPLICATION SLOT {quoted_slot} LOGICAL {format_lsn(start_lsn)} "
            f"(proto_version '1', publication_names {quoted_pub})"
        )

    def messages(self, wait: float) -> Iterator[tuple[int, bytes]]:
        """Yield (WAL start, pgoutput message) pairs available within `wait` s.

        Keepalives are answered here; the iteration ends when no message came
        for `wait` seconds.
        """
        deadline = time.monotonic() + wait
        while True:
            size, data = self.pgconn.get_copy_data(1)
            if size == 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                ready, _, _ = select.select([self.pgconn.socket], [], [], remaining)
                if ready:
                    self.pgconn.consume_input()
                continue
            if size == -1:
                result = self.pgconn.get_result()
                message = (
                    result.error_message.decode(errors="replace")
                    if result is not None
                    else "the stream ended"
                )
                raise psycopg.OperationalError(
                    f"replication stream ended: {message.strip()}"
                )
            if size < -1:
                raise psycopg.OperationalError(
                    "replication stream failed: "
                    + self.pgconn.error_message.decode(errors="replace").strip()
                )
            payload = bytes(data)
            kind = payload[:1]
            if kind == b"w":
                start, end, _ = struct.unpack_from("!QQQ", payload, 1)
                self.received = max(self.received, end)
                yield start, payload[25:]
                # Keep draining while messages follow each other closely.
                deadline = min(deadline, time.monotonic() + 0.05)
            elif kind == b"k":
                end, _, reply = struct.unpack_from("!QQB", payload, 1)
                self.received = max(self.received, end)
                if reply:
                    self._reply_requested = True
                    return

    _reply_requested = False
    _flushed = 0

    def acknowledge(self, flushed: int | None = None, *, force: bool = False) -> None:
        """Send a standby status update: the server may free WAL up to `flushed`."""
        if flushed is not None:
            self._flushed = max(self._flushed, flushed)
        now = time.monotonic()
        if not force and not self._reply_requested and now - self._last_status < 10:
            return
        self._reply_requested = False
        self._last_status = now
        clock = int(time.time() * 1_000_000) - _PG_EPOCH_US
        written = max(self.received, self._flushed)
        # A valid flush position moves the slot forward; it is sent only when
        # acknowledging. Other updates report none, so that the server, when
        # shutting down, waits only for the written position to catch up.
        flushed = self._flushed if flushed is not None else 0
        message = b"r" + struct.pack("!QQQqB", written, flushed, flushed, clock, 0)
        if self.pgconn.put_copy_data(message) != 1 or self.pgconn.flush() != 0:
            raise psycopg.OperationalError(
                "cannot send the replication status: "
                + self.pgconn.error_message.decode(errors="replace").strip()
            )

"""The PostgreSQL source (type `postgres`): full, incremental and cdc reads.

Example::

    sources:
      orders:
        type: postgres
        config:
          host: 127.0.0.1
          database: shop
          user: reader
          password: {env: PGPASSWORD}
          table: public.orders
          mode: cdc

`full` reads the table (or `query`) once, in primary-key order. `incremental`
reads rows past a `cursor` column, then polls for new ones. `cdc` takes an
initial snapshot and then streams inserts, updates and deletes through a
logical replication slot (plugin `pgoutput`), with the change type in the
`op_field` column. Positions (last key, cursor value or LSN) are saved in
checkpoints; the cdc source acknowledges an LSN to the server only once a
checkpoint that covers it is complete.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql
from pydantic import Field, model_validator

from dataflare.connectors.common import reconnecting
from dataflare.connectors.postgres.connection import (
    CONNECTION_ERRORS,
    PostgresConfig,
    connect,
)
from dataflare.connectors.postgres.relational import (
    OP_DELETE,
    OP_READ,
    KeysetSource,
    RowOrigin,
    TableSourceConfig,
    _one_line,
    rows_to_batch,
    split_name,
)
from dataflare.connectors.postgres.replication import (
    Begin,
    Change,
    Commit,
    PgOutputDecoder,
    ReplicationStream,
    format_lsn,
    parse_lsn,
)
from dataflare.connectors.postgres.types import arrow_type
from dataflare.plugin.interface import (
    IDLE,
    Idle,
    PluginKind,
    PluginMetadata,
    SourceBatch,
)

logger = logging.getLogger(__name__)


class PostgresSourceConfig(PostgresConfig, TableSourceConfig):
    """Config of the `postgres` source."""

    slot: str | None = Field(
        None,
        description="cdc: replication slot name (default: dataflare_<step>); "
        "lower-case letters, digits and underscores",
    )
    publication: str | None = Field(
        None,
        description="cdc: publication to read (default: dataflare_<slot>, created "
        "for `table` if missing)",
    )
    snapshot: bool = Field(
        True,
        description="cdc: read the table's rows first when the slot is created",
    )
    op_field: str = Field(
        "_op", description="cdc: name of the field with the change type"
    )
    drop_slot: bool = Field(
        False,
        description="cdc: drop the slot when the step closes (the next run takes "
        "a new snapshot)",
    )

    @model_validator(mode="after")
    def _check_cdc(self) -> PostgresSourceConfig:
        if self.mode == "cdc" and self.table is None:
            raise ValueError("mode 'cdc' reads a table: set 'table', not 'query'")
        if self.slot is not None and not re.fullmatch(r"[a-z0-9_]{1,63}", self.slot):
            raise ValueError(
                f"slot {self.slot!r} is not a valid replication slot name: use up to "
                "63 lower-case letters, digits and underscores"
            )
        return self


class PostgresSource(KeysetSource[PostgresSourceConfig]):
    """Read a PostgreSQL table or query: full, incremental, or change data capture."""

    metadata = PluginMetadata(
        "postgres",
        PluginKind.SOURCE,
        "PostgreSQL tables: full, incremental (cursor column) or cdc (pgoutput)",
    )
    Config = PostgresSourceConfig
    connection_errors = CONNECTION_ERRORS

    def __init__(self, config: PostgresSourceConfig, context: Any) -> None:
        super().__init__(config, context)
        self.config: PostgresSourceConfig = config
        self._conn: psycopg.Connection[Any] | None = None
        self._snapshot_name: str | None = None
        # cdc state
        self._repl: psycopg.Connection[Any] | None = None
        self._stream: ReplicationStream | None = None
        self._cdc_position: dict[str, Any] | None = None
        self._state: dict[str, Any] = {}
        self._emitted: dict[str, Any] = {}
        self._snapshot_flush = 0
        self._to_ack = 0
        self._table_ident = ("", "")

    # --- connection ---

    def connect(self) -> None:
        self._conn = connect(self.config)

    def disconnect(self) -> None:
        for attribute in ("_conn", "_repl"):
            conn = getattr(self, attribute)
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    logger.debug("closing a connection failed", exc_info=True)
                setattr(self, attribute, None)
        self._stream = None

    def quote(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self.connect()
        assert self._conn is not None
        return self._conn

    # --- schema ---

    def describe(self) -> tuple[pa.Schema, list[str]]:
        conn = self._connection()
        wanted = self.config.columns
        listed = "*" if not wanted else ", ".join(self.quote(c) for c in wanted)
        try:
            cursor = conn.execute(f"SELECT {listed} FROM {self.relation()} LIMIT 0")
        except psycopg.errors.UndefinedTable as exc:
            raise ValueError(
                f"{self.where()}: {_one_line(exc)}; check `table` (schema.table)"
            ) from None
        except psycopg.errors.UndefinedColumn as exc:
            raise ValueError(
                f"{self.where()}: {_one_line(exc)}; check `columns`"
            ) from None
        except psycopg.errors.SyntaxError as exc:
            raise ValueError(
                f"{self.where()}: {_one_line(exc)}; check `query`"
            ) from None
        assert cursor.description is not None
        fields, select = [], []
        for column in cursor.description:
            dtype = arrow_type(column.type_code, column.precision, column.scale)
            name = self.quote(column.name)
            if dtype is None:
                dtype = pa.string()
                select.append(f"{name}::text")
            else:
                select.append(name)
            fields.append(pa.field(column.name, dtype))
        return pa.schema(fields), select

    def relation(self) -> str:
        if self.config.table is None:
            return super().relation()
        schema, table = split_name(self.config.table, None)
        if schema is None:
            return self.quote(table)
        return f"{self.quote(schema)}.{self.quote(table)}"

    def primary_key(self) -> list[str]:
        if self.config.table is None:
            return []
        rows = (
            self._connection()
            .execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = %s::regclass AND i.indisprimary "
                "ORDER BY array_position(i.indkey, a.attnum)",
                [self.relation()],
            )
            .fetchall()
        )
        return [str(row[0]) for row in rows]

    def schema(self) -> pa.Schema:
        base = super().schema()
        if self.config.mode != "cdc":
            return base
        return base.append(pa.field(self.config.op_field, pa.string()))

    def _base_schema(self) -> pa.Schema:
        assert self._schema is not None
        return self._schema

    # --- reading rows ---

    def stream(
        self, sql: str, params: Sequence[Any]
    ) -> Iterator[list[tuple[Any, ...]]]:
        conn = self._connection()
        with conn.transaction():
            if self._snapshot_name is not None:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                conn.execute(
                    psycopg.sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                        psycopg.sql.Literal(self._snapshot_name)
                    )
                )
                self._snapshot_name = None  # valid for this transaction only
            with conn.cursor(name="dataflare_read", binary=True) as cursor:
                cursor.itersize = self.config.batch_rows
                cursor.execute(sql, params)
                while True:
                    rows = cursor.fetchmany(self.config.batch_rows)
                    if not rows:
                        return
                    yield rows

    def open(self) -> None:
        super().open()
        if self.config.mode == "cdc":
            self._open_cdc()

    def close(self) -> None:
        if self.config.mode == "cdc" and self.config.drop_slot:
            try:
                self._drop_slot()
            except Exception as exc:
                logger.warning(
                    "step %r: could not drop replication slot %s: %s",
                    self.context.step,
                    self._slot,
                    _one_line(exc),
                )
        super().close()

    def read(self) -> Iterator[SourceBatch | Idle]:
        if self.config.mode != "cdc":
            yield from super().read()
            return
        yield from self._read_cdc()

    # --- change data capture ---

    @property
    def _slot(self) -> str:
        if self.config.slot is not None:
            return self.config.slot
        step = re.sub(r"[^a-z0-9_]", "_", self.context.step.lower())
        return f"dataflare_{step}"[:63]

    @property
    def _publication(self) -> str:
        return self.config.publication or f"dataflare_{self._slot}"[:63]

    def _open_cdc(self) -> None:
        conn = self._connection()
        level = conn.execute("SHOW wal_level").fetchone()
        if level is None or level[0] != "logical":
            raise ValueError(
                f"PostgreSQL at {self.config.where()} has wal_level "
                f"{level[0] if level else 'unknown'!r}; change data capture needs "
                "wal_level = logical: run ALTER SYSTEM SET wal_level = logical and "
                "restart the server"
            )
        if not self._key:
            raise ValueError(
                f"{self.where()}: table has no primary key; cdc needs one to "
                "identify updated and deleted rows (or set `key` and REPLICA "
                "IDENTITY FULL on the table)"
            )
        self._ensure_publication(conn)
        row = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.oid = %s::regclass",
            [self.relation()],
        ).fetchone()
        assert row is not None
        self._table_ident = (str(row[0]), str(row[1]))

    def _ensure_publication(self, conn: psycopg.Connection[Any]) -> None:
        name = self._publication
        found = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", [name]
        ).fetchone()
        if found is None:
            if self.config.publication is not None:
                raise ValueError(
                    f"publication {name!r} does not exist in {self.config.where()}; "
                    f"create it (CREATE PUBLICATION {name} FOR TABLE ...) or leave "
                    "`publication` unset to have one created"
                )
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    sql.Identifier(name), sql.SQL(self.relation())
                )
            )
            logger.info(
                "step %r: created publication %s for %s",
                self.context.step,
                name,
                self.config.table,
            )
            return
        published = conn.execute(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND "
            "format('%%I.%%I', schemaname, tablename)::regclass = %s::regclass",
            [name, self.relation()],
        ).fetchone()
        if published is None:
            raise ValueError(
                f"publication {name!r} does not publish table {self.config.table}; "
                f"run ALTER PUBLICATION {name} ADD TABLE {self.config.table}"
            )

    def _slot_lsn(self) -> int | None:
        row = (
            self._connection()
            .execute(
                "SELECT confirmed_flush_lsn::text, plugin, database FROM "
                "pg_replication_slots WHERE slot_name = %s",
                [self._slot],
            )
            .fetchone()
        )
        if row is None:
            return None
        if row[1] != "pgoutput" or row[2] != self.config.database:
            raise ValueError(
                f"replication slot {self._slot!r} exists but uses plugin {row[1]!r} "
                f"in database {row[2]!r}; choose another `slot` name"
            )
        return parse_lsn(row[0]) if row[0] else 0

    def _drop_slot(self) -> None:
        if self._repl is not None:
            self._repl.close()
            self._repl = None
        conn = self._connection()
        deadline = time.monotonic() + 10
        while True:
            try:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM "
                    "pg_replication_slots WHERE slot_name = %s",
                    [self._slot],
                )
                return
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _replication_connection(self) -> psycopg.Connection[Any]:
        self._repl = connect(self.config, replication="database")
        return self._repl

    def snapshot_position(self) -> Any:
        if self.config.mode != "cdc":
            return super().snapshot_position()
        if self._cdc_position is None:
            return None
        position = dict(self._cdc_position)
        if position.get("phase") == "stream":
            position.update(self._emitted)
            self._snapshot_flush = int(self._emitted.get("flush", 0))
        else:
            base = super().snapshot_position()
            position["after"] = base["after"] if base else None
        return position

    def restore_position(self, position: Any) -> None:
        if self.config.mode != "cdc":
            super().restore_position(position)
            return
        if not position:
            return
        self._cdc_position = dict(position)
        if position.get("phase") == "snapshot":
            super().restore_position({"after": position.get("after")})
        else:
            self._emitted = {
                k: position[k]
                for k in ("lsn", "flush", "txn", "count")
                if k in position
            }

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        # The stream is read on this same thread; the read loop sends it.
        self._to_ack = max(self._to_ack, self._snapshot_flush)

    def _read_cdc(self) -> Iterator[SourceBatch | Idle]:
        position = self._cdc_position
        slot_lsn = self._slot_lsn()
        if position is not None and slot_lsn is None:
            raise ValueError(
                f"replication slot {self._slot!r} no longer exists, so the changes "
                "after the checkpoint are lost; run with --from-scratch to take a new "
                "snapshot"
            )
        if position is None and slot_lsn is not None:
            logger.info(
                "step %r: replication slot %s exists; continuing from its "
                "confirmed position %s without a snapshot",
                self.context.step,
                self._slot,
                format_lsn(slot_lsn),
            )
            position = {"phase": "stream", "slot_lsn": slot_lsn}
            self._emitted = {
                "lsn": slot_lsn,
                "flush": slot_lsn,
                "txn": None,
                "count": 0,
            }
        if position is None:
            position = self._create_slot()
        self._cdc_position = position
        if position["phase"] == "snapshot":
            if self._snapshot_name is None and position.get("after") is not None:
                logger.warning(
                    "step %r: resuming the initial snapshot of %s in a new "
                    "transaction; rows changed meanwhile may also arrive as changes",
                    self.context.step,
                    self.config.table,
                )
            for item in self._read_pass():
                yield self._with_op(item, OP_READ)
                if self.context.stopping:
                    return
            if self._repl is not None:
                self._repl.close()
                self._repl = None
            lsn = int(position["slot_lsn"])
            self._emitted = {"lsn": lsn, "flush": lsn, "txn": None, "count": 0}
            self._cdc_position = position = {"phase": "stream", "slot_lsn": lsn}
        yield from self._changes()

    def _create_slot(self) -> dict[str, Any]:
        repl = self._replication_connection()
        version = repl.info.server_version
        if not self.config.snapshot:
            option = (
                "(SNAPSHOT 'nothing')" if version >= 150000 else "NOEXPORT_SNAPSHOT"
            )
        else:
            option = "(SNAPSHOT 'export')" if version >= 150000 else "EXPORT_SNAPSHOT"
        row = repl.execute(
            f"CREATE_REPLICATION_SLOT {self.quote(self._slot)} LOGICAL pgoutput "
            + option
        ).fetchone()
        assert row is not None
        lsn = parse_lsn(row[1])
        logger.info(
            "step %r: created replication slot %s at %s",
            self.context.step,
            self._slot,
            row[1],
        )
        if not self.config.snapshot:
            repl.close()
            self._repl = None
            self._emitted = {"lsn": lsn, "flush": lsn, "txn": None, "count": 0}
            return {"phase": "stream", "slot_lsn": lsn}
        # The snapshot stays valid while the replication connection is idle;
        # the first read transaction imports it.
        self._snapshot_name = row[2]
        self._after = None
        return {"phase": "snapshot", "slot_lsn": lsn}

    def _with_op(self, item: SourceBatch, op: str) -> SourceBatch:
        batch = item.batch
        ops = pa.array([op] * batch.num_rows, type=pa.string())
        return SourceBatch(batch.append_column(self.config.op_field, ops), item.origin)

    def _changes(self) -> Iterator[SourceBatch | Idle]:
        """Stream changes from the slot, reconnecting when the server goes away."""
        while not self.context.stopping:
            try:
                yield from self._stream_changes()
            except CONNECTION_ERRORS as exc:
                logger.warning(
                    "step %r: replication connection to %s lost: %s; reconnecting",
                    self.context.step,
                    self.config.where(),
                    _one_line(exc),
                )
                self.disconnect()
                self._reconnect()
        self._stop_stream()

    def _stop_stream(self) -> None:
        if not self.context.checkpointing and self._stream is not None:
            # No checkpoints: acknowledge what was emitted when the run stops.
            try:
                self._stream.acknowledge(int(self._emitted.get("flush", 0)), force=True)
            except CONNECTION_ERRORS:
                logger.debug("final acknowledgement failed", exc_info=True)
        if self._repl is not None:
            self._repl.close()
            self._repl = None
            self._stream = None

    def _stream_changes(self) -> Iterator[SourceBatch | Idle]:
        stream = start_replication(self)
        self._stream = stream
        decoder = PgOutputDecoder(stream.connection)
        schema = self._base_schema()
        table_schema, table_name = self._table_ident
        skip = dict(self._emitted)  # emitted before: skip when sent again
        state = dict(self._emitted)
        skipping_txn = False
        skip_changes = 0
        rows: list[list[Any]] = []
        ops: list[str] = []
        poll = self.config.poll_interval.total_seconds()
        warned_toast = False

        def cut() -> SourceBatch:
            nonlocal rows, ops
            batch, bad = rows_to_batch(rows, schema)
            names = schema.names
            if bad:
                self.context.reject(
                    [dict(zip(names, rows[i], strict=True)) for i, _ in bad],
                    [reason for _, reason in bad],
                    None,
                )
                keep = [i for i in range(len(rows)) if i not in dict(bad)]
                ops = [ops[i] for i in keep]
            batch = batch.append_column(
                self.config.op_field, pa.array(ops, type=pa.string())
            )
            rows, ops = [], []
            self._emitted = dict(state)
            return SourceBatch(
                batch, RowOrigin(self.config.table or "", self._key, batch)
            )

        while not self.context.stopping:
            for _, data in stream.messages(poll if not rows else 0.0):
                message = decoder.decode(data)
                if isinstance(message, Begin):
                    state["txn"] = message.final_lsn
                    state["count"] = 0
                    skipping_txn = message.final_lsn <= int(skip.get("lsn") or 0)
                    skip_changes = (
                        int(skip.get("count") or 0)
                        if skip.get("txn") == message.final_lsn
                        else 0
                    )
                elif isinstance(message, Commit):
                    state.update(
                        lsn=message.commit_lsn, flush=message.end_lsn, txn=None, count=0
                    )
                    skipping_txn = False
                elif isinstance(message, Change):
                    relation = message.relation
                    if (relation.schema, relation.name) != (table_schema, table_name):
                        continue
                    state["count"] = int(state.get("count") or 0) + 1
                    if skipping_txn or state["count"] <= skip_changes:
                        continue
                    row, toast = self._row(message, schema.names)
                    if toast and not warned_toast:
                        warned_toast = True
                        logger.warning(
                            "step %r: an update of %s left large (TOASTed) values "
                            "unchanged, which the stream does not carry; they are "
                            "null in the record (set REPLICA IDENTITY FULL on the "
                            "table to receive them)",
                            self.context.step,
                            self.config.table,
                        )
                    moved = self._moved_key(message, schema.names)
                    if moved is not None:
                        # The key changed: the row under the old key is gone.
                        rows.append(moved)
                        ops.append(OP_DELETE)
                    rows.append(row)
                    ops.append(message.op)
                    if len(rows) >= self.config.batch_rows:
                        yield cut()
                if self._to_ack:
                    stream.acknowledge(self._to_ack, force=True)
                    self._to_ack = 0
            if rows:
                yield cut()
            else:
                self._emitted = dict(state)
                yield IDLE
            if self._to_ack:
                stream.acknowledge(self._to_ack, force=True)
                self._to_ack = 0
            else:
                stream.acknowledge()

    def _moved_key(self, change: Change, names: list[str]) -> list[Any] | None:
        """Return the old key's delete row when an update changed the key."""
        if change.op != "update" or change.old is None or change.new is None:
            return None
        index = {name: i for i, name in enumerate(change.relation.columns)}
        keys = [index[k] for k in self._key]
        if all(change.old[i] == change.new[i] for i in keys):
            return None
        return [change.old[index[n]] if n in self._key else None for n in names]

    def _row(self, change: Change, names: list[str]) -> tuple[list[Any], bool]:
        relation = change.relation
        index = {name: i for i, name in enumerate(relation.columns)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(
                f"table {self.config.table} no longer has column(s) "
                f"{', '.join(missing)}; the cdc source cannot follow schema changes, "
                "restart the pipeline with --from-scratch"
            )
        values = change.new if change.op != OP_DELETE else change.old
        assert values is not None
        toast = False
        row = []
        for name in names:
            i = index[name]
            value = values[i]
            if change.unchanged and change.unchanged[i]:
                if change.old is not None:
                    value = change.old[i]
                else:
                    toast = True
            row.append(value)
        return row, toast


def start_replication(source: PostgresSource) -> ReplicationStream:
    """Open the replication connection and start streaming, with backoff."""

    def attempt() -> ReplicationStream:
        source._repl = None
        try:
            stream = ReplicationStream(source._replication_connection())
            stream.start(source._slot, source._publication)
            return stream
        except BaseException:
            if source._repl is not None:
                source._repl.close()
                source._repl = None
            raise

    return reconnecting(
        attempt,
        step=source.context.step,
        what=f"open a replication connection to {source.config.where()}",
        errors=CONNECTION_ERRORS,
        give_up_after=source.config.reconnect_for.total_seconds(),
        should_stop=lambda: source.context.stopping,
    )

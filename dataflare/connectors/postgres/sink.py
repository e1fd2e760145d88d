"""The PostgreSQL sink (type `postgres`): insert or upsert, exactly once.

Example::

    destinations:
      orders_copy:
        type: postgres
        inputs: [orders]
        config:
          database: warehouse
          password: {env: PGPASSWORD}
          table: public.orders
          mode: upsert
          op_field: _op       # apply the changes of a cdc source

Rows are sent with COPY in CSV form. Upserts and change records go through
a temporary (or, with checkpoints, a staging) table and are applied with
`INSERT ... ON CONFLICT (key) DO UPDATE` and `DELETE ... USING`, keeping
the last change of each key within a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg
import pyarrow as pa

from dataflare.connectors.postgres.connection import (
    CONNECTION_ERRORS,
    PostgresConfig,
    connect,
)
from dataflare.connectors.postgres.relational import (
    OP,
    OP_DELETE,
    SEQ,
    TableSink,
    TableSinkConfig,
)
from dataflare.connectors.postgres.types import column_type, copy_csv
from dataflare.plugin.interface import PluginKind, PluginMetadata

logger = logging.getLogger(__name__)


class PostgresSinkConfig(PostgresConfig, TableSinkConfig):
    """Config of the `postgres` sink."""


class PostgresSink(TableSink[PostgresSinkConfig]):
    """Write batches to a PostgreSQL table: insert or upsert, exactly once."""

    metadata = PluginMetadata(
        "postgres",
        PluginKind.SINK,
        "PostgreSQL tables: COPY inserts, upserts, cdc changes; exactly once",
    )
    Config = PostgresSinkConfig
    connection_errors = CONNECTION_ERRORS
    default_schema = None

    def __init__(self, config: PostgresSinkConfig, context: Any) -> None:
        super().__init__(config, context)
        self.config: PostgresSinkConfig = config
        self._conn: psycopg.Connection[Any] | None = None

    # --- connection ---

    def connect(self) -> None:
        self._conn = connect(self.config, autocommit=False)

    def disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                logger.debug("closing the connection failed", exc_info=True)
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self.connect()
        assert self._conn is not None
        return self._conn

    def execute(
        self, statement: str, params: Sequence[Any] = ()
    ) -> list[tuple[Any, ...]]:
        cursor = self._connection().execute(statement, params)
        if cursor.description is None:
            return []
        return list(cursor.fetchall())

    def commit_transaction(self) -> None:
        self._connection().commit()

    def rollback_transaction(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.rollback()

    def quote(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    # --- catalog ---

    def _regclass(self, schema: str | None, table: str) -> str:
        return self.qualified(schema, table)

    def table_columns(self, schema: str | None, table: str) -> dict[str, str] | None:
        found = self.execute(
            "SELECT to_regclass(%s)::oid", [self._regclass(schema, table)]
        )
        if not found or found[0][0] is None:
            return None
        rows = self.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            [found[0][0]],
        )
        return {str(name): str(kind) for name, kind in rows}

    def primary_key(self, schema: str | None, table: str) -> list[str]:
        rows = self.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
            "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = to_regclass(%s) AND i.indisprimary "
            "ORDER BY array_position(i.indkey, a.attnum)",
            [self._regclass(schema, table)],
        )
        return [str(row[0]) for row in rows]

    def column_type(self, field: pa.Field) -> str:
        return column_type(field)

    def progress_ddl(self, table: str) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {table} (sink text NOT NULL, instance integer "
            "NOT NULL, checkpoint_id bigint, target text NOT NULL, staged_rows bigint "
            "NOT NULL, committed_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (sink, instance))"
        )

    def upsert_progress(self) -> str:
        return (
            f"INSERT INTO {self.progress} (sink, instance, checkpoint_id, target, "
            "staged_rows, committed_at) VALUES (%s, %s, %s, %s, %s, now()) "
            "ON CONFLICT (sink, instance) DO UPDATE SET checkpoint_id = "
            "EXCLUDED.checkpoint_id, target = EXCLUDED.target, staged_rows = "
            "EXCLUDED.staged_rows, committed_at = EXCLUDED.committed_at"
        )

    def _create_stage(self) -> None:
        self.execute(
            f"CREATE TABLE IF NOT EXISTS {self.stage} ({self._holding_columns()})"
        )
        index = self.quote(self.stage.rsplit(".", 1)[-1].strip('"') + "_seq")
        seq = self.quote(SEQ)
        self.execute(
            f"CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {self.stage} ({seq})"
        )

    def create_temporary(self, name: str, ddl_columns: str) -> None:
        self.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.quote(name)} ({ddl_columns}) "
            "ON COMMIT DELETE ROWS"
        )

    # --- writing ---

    def load(self, table: str, columns: list[str], batch: pa.RecordBatch) -> None:
        listed = ", ".join(self.quote(c) for c in columns)
        data = copy_csv(batch)
        conn = self._connection()
        with (
            conn.cursor() as cursor,
            cursor.copy(f"COPY {table} ({listed}) FROM STDIN (FORMAT csv)") as copy,
        ):
            copy.write(data)

    def publish_sql(
        self, source: str, target: str, columns: list[str], upto: int | None
    ) -> list[str]:
        q = self.quote
        listed = ", ".join(q(c) for c in columns)
        within = f"WHERE {q(SEQ)} <= {int(upto)}" if upto is not None else ""
        if not self.config.applies_changes:
            return [
                f"INSERT INTO {target} ({listed}) SELECT {listed} FROM {source} "
                f"{within} ORDER BY {q(SEQ)}"
            ]
        key = ", ".join(q(k) for k in self._key)
        last = (
            f"SELECT DISTINCT ON ({key}) * FROM {source} {within} "
            f"ORDER BY {key}, {q(SEQ)} DESC"
        )
        statements = []
        not_deleted = ""
        if self.config.op_field is not None:
            match = " AND ".join(f"t.{q(k)} = l.{q(k)}" for k in self._key)
            statements.append(
                f"DELETE FROM {target} AS t USING ({last}) AS l "
                f"WHERE l.{q(OP)} = '{OP_DELETE}' AND {match}"
            )
            not_deleted = f"WHERE l.{q(OP)} IS DISTINCT FROM '{OP_DELETE}'"
        others = [c for c in columns if c not in self._key]
        if others:
            updates = ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in others)
            conflict = f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
        else:
            conflict = f"ON CONFLICT ({key}) DO NOTHING"
        selected = ", ".join(f"l.{q(c)}" for c in columns)
        statements.append(
            f"INSERT INTO {target} ({listed}) SELECT {selected} FROM ({last}) AS l "
            f"{not_deleted} {conflict}"
        )
        return statements

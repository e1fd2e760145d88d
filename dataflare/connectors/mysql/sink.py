"""The MariaDB/MySQL sink (type `mysql`): insert or upsert, exactly once.

Example::

    destinations:
      orders_copy:
        type: mysql
        inputs: [orders]
        config:
          database: warehouse
          password: {env: MYSQL_PASSWORD}
          table: orders
          mode: upsert

Rows are sent as multi-row INSERT statements. Upserts and change records
go through a temporary (or, with checkpoints, a staging) table and are
applied with `INSERT ... ON DUPLICATE KEY UPDATE` and a joined DELETE,
keeping the last change of each key within a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pymysql

from dataflare.connectors.mysql.connection import (
    CONNECTION_ERRORS,
    MySqlConfig,
    connect,
)
from dataflare.connectors.mysql.types import column_type, python_columns
from dataflare.connectors.postgres.relational import (
    OP,
    OP_DELETE,
    SEQ,
    TableSink,
    TableSinkConfig,
)
from dataflare.plugin.interface import PluginKind, PluginMetadata

logger = logging.getLogger(__name__)


class MySqlSinkConfig(MySqlConfig, TableSinkConfig):
    """Config of the `mysql` sink."""


class MySqlSink(TableSink[MySqlSinkConfig]):
    """Write batches to a MariaDB/MySQL table: insert or upsert, exactly once."""

    metadata = PluginMetadata(
        "mysql",
        PluginKind.SINK,
        "MariaDB/MySQL tables: inserts, upserts, cdc changes; exactly once",
    )
    Config = MySqlSinkConfig
    connection_errors = CONNECTION_ERRORS

    def __init__(self, config: MySqlSinkConfig, context: Any) -> None:
        super().__init__(config, context)
        self.config: MySqlSinkConfig = config
        self._conn: pymysql.connections.Connection[Any] | None = None

    def connect(self) -> None:
        self._conn = connect(self.config, autocommit=False)

    def disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                logger.debug("closing the connection failed", exc_info=True)
            self._conn = None

    def _connection(self) -> pymysql.connections.Connection[Any]:
        if self._conn is None or not self._conn.open:
            self.connect()
        assert self._conn is not None
        return self._conn

    def execute(
        self, statement: str, params: Sequence[Any] = ()
    ) -> list[tuple[Any, ...]]:
        with self._connection().cursor() as cursor:
            cursor.execute(statement, list(params) if params else None)
            return list(cursor.fetchall()) if cursor.description else []

    def commit_transaction(self) -> None:
        self._connection().commit()

    def rollback_transaction(self) -> None:
        if self._conn is not None and self._conn.open:
            self._conn.rollback()

    def quote(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    # --- catalog ---

    def table_columns(self, schema: str | None, table: str) -> dict[str, str] | None:
        rows = self.execute(
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS WHERE "
            "TABLE_SCHEMA = COALESCE(%s, DATABASE()) AND TABLE_NAME = %s "
            "ORDER BY ORDINAL_POSITION",
            [schema, table],
        )
        return {str(name): str(kind) for name, kind in rows} or None

    def primary_key(self, schema: str | None, table: str) -> list[str]:
        rows = self.execute(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE "
            "CONSTRAINT_NAME = 'PRIMARY' AND TABLE_SCHEMA = COALESCE(%s, DATABASE()) "
            "AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            [schema, table],
        )
        return [str(row[0]) for row in rows]

    def column_type(self, field: pa.Field) -> str:
        return column_type(field, key=field.name in (self.config.key or []))

    def progress_ddl(self, table: str) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {table} (sink VARCHAR(255) NOT NULL, "
            "instance INT NOT NULL, checkpoint_id BIGINT NULL, target VARCHAR(255) "
            "NOT NULL, staged_rows BIGINT NOT NULL, committed_at TIMESTAMP(6) NOT "
            "NULL DEFAULT CURRENT_TIMESTAMP(6), PRIMARY KEY (sink, instance)) "
            "ENGINE=InnoDB"
        )

    def upsert_progress(self) -> str:
        return (
            f"INSERT INTO {self.progress} (sink, instance, checkpoint_id, target, "
            "staged_rows) VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE "
            "checkpoint_id = VALUES(checkpoint_id), target = VALUES(target), "
            "staged_rows = VALUES(staged_rows), committed_at = CURRENT_TIMESTAMP(6)"
        )

    def _create_stage(self) -> None:
        self.execute(
            f"CREATE TABLE IF NOT EXISTS {self.stage} ({self._holding_columns()}, "
            f"PRIMARY KEY ({self.quote(SEQ)})) ENGINE=InnoDB"
        )

    def create_temporary(self, name: str, ddl_columns: str) -> None:
        self.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.quote(name)} ({ddl_columns})"
        )
        self.execute(f"DELETE FROM {self.quote(name)}")

    # --- writing ---

    def load(self, table: str, columns: list[str], batch: pa.RecordBatch) -> None:
        listed = ", ".join(self.quote(c) for c in columns)
        marks = ", ".join(["%s"] * len(columns))
        rows = list(zip(*python_columns(batch), strict=True))
        with self._connection().cursor() as cursor:
            cursor.executemany(f"INSERT INTO {table} ({listed}) VALUES ({marks})", rows)

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
            f"SELECT * FROM (SELECT s.*, ROW_NUMBER() OVER (PARTITION BY {key} "
            f"ORDER BY {q(SEQ)} DESC) AS dataflare_rank FROM {source} s {within}) "
            "AS r WHERE r.dataflare_rank = 1"
        )
        statements = []
        not_deleted = ""
        if self.config.op_field is not None:
            match = " AND ".join(f"t.{q(k)} = l.{q(k)}" for k in self._key)
            statements.append(
                f"DELETE t FROM {target} AS t JOIN ({last}) AS l ON {match} "
                f"WHERE l.{q(OP)} = '{OP_DELETE}'"
            )
            not_deleted = f"WHERE NOT (l.{q(OP)} <=> '{OP_DELETE}')"
        others = [c for c in columns if c not in self._key]
        updates = ", ".join(f"{q(c)} = VALUES({q(c)})" for c in others or self._key)
        selected = ", ".join(f"l.{q(c)}" for c in columns)
        statements.append(
            f"INSERT INTO {target} ({listed}) SELECT {selected} FROM ({last}) AS l "
            f"{not_deleted} ON DUPLICATE KEY UPDATE {updates}"
        )
        return statements

"""The MariaDB/MySQL source (type `mysql`): full and incremental reads.

Example::

    sources:
      orders:
        type: mysql
        config:
          database: shop
          user: reader
          password: {env: MYSQL_PASSWORD}
          table: orders
          mode: incremental
          cursor: updated_at

Change data capture from the binary log is not offered: see
docs/connectors-databases.md for why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pymysql
import pymysql.cursors
from pydantic import model_validator

from dataflare.connectors.mysql.connection import (
    CONNECTION_ERRORS,
    MySqlConfig,
    connect,
)
from dataflare.connectors.mysql.types import arrow_type
from dataflare.connectors.postgres.relational import (
    KeysetSource,
    TableSourceConfig,
    split_name,
)
from dataflare.plugin.interface import PluginKind, PluginMetadata

logger = logging.getLogger(__name__)


class MySqlSourceConfig(MySqlConfig, TableSourceConfig):
    """Config of the `mysql` source."""

    @model_validator(mode="after")
    def _no_cdc(self) -> MySqlSourceConfig:
        if self.mode == "cdc":
            raise ValueError(
                "mode 'cdc' is not available for MariaDB/MySQL; use mode "
                "'incremental' with an update-time or id `cursor` column"
            )
        return self


class MySqlSource(KeysetSource[MySqlSourceConfig]):
    """Read a MariaDB/MySQL table or query, in full or incrementally."""

    metadata = PluginMetadata(
        "mysql",
        PluginKind.SOURCE,
        "MariaDB/MySQL tables: full or incremental (cursor column)",
    )
    Config = MySqlSourceConfig
    connection_errors = CONNECTION_ERRORS

    def __init__(self, config: MySqlSourceConfig, context: Any) -> None:
        super().__init__(config, context)
        self.config: MySqlSourceConfig = config
        self._conn: pymysql.connections.Connection[Any] | None = None

    def connect(self) -> None:
        self._conn = connect(self.config)

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

    def quote(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    def after_condition(self, names: list[str]) -> str:
        # (a, b) > (x, y) spelled out, which every version can use an index for.
        parts = []
        for i, name in enumerate(names):
            equal = [f"{self.quote(n)} = %s" for n in names[:i]]
            parts.append("(" + " AND ".join([*equal, f"{self.quote(name)} > %s"]) + ")")
        return "(" + " OR ".join(parts) + ")"

    def _sql(self) -> tuple[str, list[Any]]:
        sql, params = super()._sql()
        if self._after is None or len(self._order) < 2:
            return sql, params
        # The spelled-out condition takes the leading values once per term.
        count = len(self._order)
        after = params[-count:]
        expanded = [v for i in range(count) for v in after[: i + 1]]
        return sql, params[:-count] + expanded

    def describe(self) -> tuple[pa.Schema, list[str]]:
        wanted = self.config.columns
        listed = "*" if not wanted else ", ".join(self.quote(c) for c in wanted)
        with self._connection().cursor() as cursor:
            try:
                cursor.execute(f"SELECT {listed} FROM {self.relation()} LIMIT 0")
            except pymysql.err.ProgrammingError as exc:
                raise ValueError(
                    f"{self.where()}: {exc.args[-1]}; check `table`, `query` and "
                    "`columns`"
                ) from None
            fields = cursor._result.fields if cursor._result is not None else []
        schema = pa.schema(
            [
                pa.field(
                    f.name,
                    arrow_type(f.type_code, f.length, f.scale, f.flags, f.charsetnr),
                )
                for f in fields
            ]
        )
        return schema, [self.quote(f.name) for f in fields]

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
        schema, table = split_name(self.config.table, None)
        with self._connection().cursor() as cursor:
            cursor.execute(
                "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE "
                "CONSTRAINT_NAME = 'PRIMARY' AND TABLE_SCHEMA = COALESCE(%s, "
                "DATABASE()) AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
                [schema, table],
            )
            return [str(row[0]) for row in cursor.fetchall()]

    def stream(
        self, sql: str, params: Sequence[Any]
    ) -> Iterator[list[tuple[Any, ...]]]:
        conn = self._connection()
        cursor = pymysql.cursors.SSCursor(conn)
        try:
            cursor.execute(sql, list(params))
            while True:
                rows = cursor.fetchmany(self.config.batch_rows)
                if not rows:
                    return
                yield list(rows)
        finally:
            try:
                cursor.close()
            except CONNECTION_ERRORS:
                self.disconnect()

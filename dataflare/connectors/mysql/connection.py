"""Connecting to MariaDB or MySQL with PyMySQL."""

from __future__ import annotations

from typing import Any

import pymysql
from pydantic import Field

from dataflare.connectors.postgres.relational import DatabaseConfig

#: Errors after which reconnecting may help: the server is down, restarting,
#: or dropped the connection.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pymysql.err.OperationalError,
    pymysql.err.InterfaceError,
)

# Error codes that no reconnect fixes: access denied, unknown database.
_FATAL_CODES = {1044, 1045, 1049, 1698}


class MySqlConfig(DatabaseConfig):
    """Connection settings of the MariaDB/MySQL source and sink."""

    port: int = Field(3306, ge=1, le=65535, description="Server TCP port")
    user: str = Field("root", description="User name")
    database: str = Field(description="Database (schema) to connect to")


def connect(config: MySqlConfig, **options: Any) -> pymysql.connections.Connection[Any]:
    """Open a connection whose session time zone is UTC.

    Raises:
        pymysql.err.OperationalError: the server cannot be reached now (retry).
        ValueError: the server refused the login or the database; the message
            says which, never the password.
    """
    options.setdefault("autocommit", True)
    try:
        return pymysql.connect(
            host=config.host,
            port=config.port,
            user=config.user,
            password=config.secret() or "",
            database=config.database,
            connect_timeout=max(1, round(config.connect_timeout)),
            charset="utf8mb4",
            init_command="SET time_zone = '+00:00'",
            **options,
        )
    except pymysql.err.OperationalError as exc:
        code = exc.args[0] if exc.args else None
        if code in _FATAL_CODES:
            message = exc.args[1] if len(exc.args) > 1 else str(exc)
            raise ValueError(
                f"MariaDB/MySQL at {config.where()} refused user {config.user!r}: "
                f"{message}; check the user, the password reference and the "
                "database name"
            ) from None
        raise

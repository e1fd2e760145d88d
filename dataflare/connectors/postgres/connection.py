"""Connecting to PostgreSQL with psycopg 3."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from pydantic import Field

from dataflare.connectors.postgres.relational import DatabaseConfig

logger = logging.getLogger(__name__)

#: Errors after which reconnecting may help: the server is down, restarting,
#: or closed the connection.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (psycopg.OperationalError,)

# SQLSTATE classes and codes that no reconnect fixes: credentials, unknown
# database or role, missing privileges.
_FATAL_CLASSES = ("28", "3D", "42")


class PostgresConfig(DatabaseConfig):
    """Connection settings of the PostgreSQL source and sink."""

    port: int = Field(5432, ge=1, le=65535, description="Server TCP port")
    user: str = Field("postgres", description="User name")
    database: str = Field("postgres", description="Database to connect to")
    application_name: str = Field(
        "dataflare", description="Shown in pg_stat_activity for this connection"
    )


def connect(config: PostgresConfig, **options: Any) -> psycopg.Connection[Any]:
    """Open a connection in UTC, autocommit unless `options` say otherwise.

    Raises:
        psycopg.OperationalError: the server cannot be reached now (retry).
        ValueError: the server refused the login or the database; the message
            says which, never the password.
    """
    options.setdefault("autocommit", True)
    try:
        return psycopg.connect(
            host=config.host,
            port=config.port,
            user=config.user,
            password=config.secret(),
            dbname=config.database,
            connect_timeout=max(1, round(config.connect_timeout)),
            application_name=config.application_name,
            options="-c TimeZone=UTC",
            **options,
        )
    except psycopg.OperationalError as exc:
        if is_fatal(exc):
            raise ValueError(
                f"PostgreSQL at {config.where()} refused user {config.user!r}: "
                f"{_first_line(exc)}; check the user, the password reference and "
                "the database name"
            ) from None
        raise


def is_fatal(exc: psycopg.Error) -> bool:
    """Tell whether a connection error is one that no retry fixes."""
    state = exc.sqlstate or ""
    if state[:2] in _FATAL_CLASSES:
        return True
    text = str(exc)
    return "authentication failed" in text or "does not exist" in text


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1].strip() if lines else type(exc).__name__

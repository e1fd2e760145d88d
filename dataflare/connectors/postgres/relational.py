"""What the PostgreSQL and MariaDB/MySQL connectors share.

Both database families read tables the same way and write them the same
way; only the SQL dialect and the driver differ. This module holds the
driver-neutral parts:

- `DatabaseConfig`: where the server is and who connects, with the password
  given by `SecretRef`.
- `KeysetSource`: `full` and `incremental` reads ordered by key (and cursor)
  columns, resumed after the last emitted row when the connection drops or
  the run resumes from a checkpoint.
- `TableSink`: insert or upsert, applying change records (`op_field`), and
  exactly-once delivery through a staging table plus a progress table.

The MySQL package imports it from here.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import logging
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from dataflare.connectors.common import SecretRef, reconnecting
from dataflare.plugin.interface import (
    IDLE,
    ConfigT,
    Idle,
    Origin,
    PluginConfig,
    Sink,
    SinkConfig,
    SinkInfo,
    Source,
    SourceBatch,
)
from dataflare.state.checkpoint import FINAL_CHECKPOINT
from dataflare.state.faults import crash_point
from dataflare.streaming.spec import Duration

logger = logging.getLogger(__name__)

T = TypeVar("T")

OP_INSERT = "insert"
OP_UPDATE = "update"
OP_DELETE = "delete"
OP_READ = "read"  # a row of an initial snapshot

SEQ = "_df_seq"
OP = "_df_op"


# --- configuration ------------------------------------------------------------


class DatabaseConfig(PluginConfig):
    """Where the server is and who connects."""

    host: str = Field("127.0.0.1", description="Server host name or address")
    port: int = Field(ge=1, le=65535, description="Server TCP port")
    user: str = Field(description="User name")
    password: SecretRef | None = Field(
        None, description="Password by reference: {env: VAR} or {file: PATH}"
    )
    database: str = Field(description="Database to connect to")
    connect_timeout: float = Field(
        10.0, gt=0, description="Seconds to wait for one connection attempt"
    )
    reconnect_for: Duration = Field(
        timedelta(minutes=5),
        description="How long to keep reconnecting after the connection is lost "
        "before the step fails",
    )

    def secret(self) -> str | None:
        return self.password.reveal() if self.password is not None else None

    def where(self) -> str:
        """Describe the server and database, without credentials."""
        return f"{self.host}:{self.port}/{self.database}"


class TableSourceConfig(DatabaseConfig):
    """Options shared by the `full` and `incremental` reads."""

    mode: Literal["full", "incremental", "cdc"] = Field(
        "full",
        description="full: read once; incremental: read rows past a cursor column, "
        "then poll for new ones; cdc: change data capture (PostgreSQL only)",
    )
    table: str | None = Field(
        None, description="Table to read, optionally schema-qualified (schema.table)"
    )
    query: str | None = Field(
        None, description="SELECT statement to read instead of a table"
    )
    columns: list[str] | None = Field(
        None, description="Columns to read (default: all)"
    )
    key: list[str] | None = Field(
        None,
        description="Columns that identify a row, for resuming after a crash or a "
        "lost connection (default: the table's primary key)",
    )
    cursor: str | None = Field(
        None,
        description="incremental: a column that grows with every new or changed "
        "row (an id or an update time)",
    )
    start_after: Any = Field(
        None, description="incremental: read only rows whose cursor is above this"
    )
    follow: bool = Field(
        True,
        description="incremental: keep polling for new rows; false: stop at the end",
    )
    poll_interval: Duration = Field(
        timedelta(seconds=1), description="incremental, cdc: pause between polls"
    )
    batch_rows: int = Field(10_000, ge=1, description="Rows per emitted batch")

    @model_validator(mode="after")
    def _check_mode(self) -> TableSourceConfig:
        if (self.table is None) == (self.query is None):
            raise ValueError("set exactly one of 'table' or 'query'")
        if self.mode == "incremental" and self.cursor is None:
            raise ValueError(
                "mode 'incremental' needs 'cursor': a column that grows with each "
                "new row, such as an id or an update time"
            )
        if self.mode != "incremental" and self.cursor is not None:
            raise ValueError("'cursor' is only used with mode 'incremental'")
        return self


class TableSinkConfig(SinkConfig, DatabaseConfig):
    """Options shared by the table sinks."""

    table: str = Field(description="Target table, optionally schema.table")
    mode: Literal["insert", "upsert"] = Field(
        "insert",
        description="insert: append rows; upsert: insert or update by `key`",
    )
    key: list[str] | None = Field(
        None,
        description="Columns that identify a row, for upsert and change records "
        "(default: the table's primary key)",
    )
    op_field: str | None = Field(
        None,
        description="Field with the change type (insert, update, delete, read), as "
        "emitted by a cdc source: deletes remove the row, the rest are upserted",
    )
    create_table: bool = Field(
        True, description="Create the table from the records' fields if it is missing"
    )
    exactly_once: bool = Field(
        True,
        description="With checkpoints, stage rows and publish them per checkpoint "
        "together with the checkpoint id (false: write directly, at least once)",
    )
    progress_table: str = Field(
        "dataflare_progress",
        description="Table holding the last published checkpoint of each sink, in "
        "the target table's schema",
    )
    progress_key: str | None = Field(
        None,
        description="Name of this sink in the progress table (default: "
        "pipeline/step, or step when the pipeline id is unknown)",
    )

    @model_validator(mode="after")
    def _check_key(self) -> TableSinkConfig:
        if self.key is not None and not self.key:
            raise ValueError("'key' needs at least one column")
        return self

    @property
    def applies_changes(self) -> bool:
        return self.mode == "upsert" or self.op_field is not None


# --- names and values -----------------------------------------------------------


def split_name(name: str, default_schema: str | None) -> tuple[str | None, str]:
    """Split `schema.table` into its parts (names are taken as written)."""
    schema, dot, table = name.rpartition(".")
    if not dot:
        return default_schema, name
    return schema, table


def encode_value(value: Any) -> Any:
    """Turn a cursor or key value into JSON-able data for a checkpoint."""
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, timedelta):
        return {"$microseconds": value // timedelta(microseconds=1)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$hex": bytes(value).hex()}
    return value


def decode_value(value: Any) -> Any:
    """Reverse `encode_value`."""
    if not isinstance(value, dict) or len(value) != 1:
        return value
    ((tag, text),) = value.items()
    decoders: dict[str, Callable[[Any], Any]] = {
        "$datetime": dt.datetime.fromisoformat,
        "$date": dt.date.fromisoformat,
        "$time": dt.time.fromisoformat,
        "$decimal": decimal.Decimal,
        "$microseconds": lambda us: timedelta(microseconds=us),
        "$hex": bytes.fromhex,
    }
    return decoders[tag](text) if tag in decoders else value


def rows_to_batch(
    rows: Sequence[Sequence[Any]], schema: pa.Schema
) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """Build a batch from driver rows; return it and the rows that do not fit.

    A column whose values all convert is built in one call. Otherwise its
    values are converted one by one, and the rows with a value that does
    not fit the field type are listed with the reason, and left out.
    """
    columns: list[pa.Array] = []
    bad: dict[int, str] = {}
    for index, field in enumerate(schema):
        values = [row[index] for row in rows]
        if pa.types.is_boolean(field.type):
            # MariaDB/MySQL booleans are tinyint(1): 0 and 1.
            values = [
                v if v is None or isinstance(v, bool) else bool(v) for v in values
            ]
        try:
            columns.append(pa.array(values, type=field.type))
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError) as exc:
            first_error = exc
        converted: list[Any] = []
        for number, value in enumerate(values):
            try:
                pa.array([value], type=field.type)
                converted.append(value)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError):
                bad.setdefault(
                    number,
                    f"value {value!r} of column {field.name!r} does not fit Arrow "
                    f"type {field.type}",
                )
                converted.append(None)
        if not bad:
            raise ValueError(
                f"column {field.name!r} cannot be read as {field.type}: {first_error}"
            ) from first_error
        columns.append(pa.array(converted, type=field.type))
    batch = pa.RecordBatch.from_arrays(columns, schema=schema)
    if not bad:
        return batch, []
    keep = np.ones(len(rows), dtype=bool)
    keep[list(bad)] = False
    return batch.filter(pa.array(keep)), sorted(bad.items())


class RowOrigin(Origin):
    """Positions of batch rows, named by their key values."""

    def __init__(self, table: str, key: list[str], batch: pa.RecordBatch) -> None:
        self.table = table
        self.key = key
        self.batch = batch

    def position(self, row: int) -> str:
        if not self.key:
            return f"{self.table} row"
        values = ", ".join(
            f"{name}={self.batch.column(name)[row].as_py()!r}" for name in self.key
        )
        return f"{self.table} row with {values}"


# --- sources --------------------------------------------------------------------


class KeysetSource(Source[ConfigT]):
    """Read a table or query in key order, resuming after the last emitted row.

    `full` reads once, ordered by `key` when there is one. `incremental` reads
    rows whose (cursor, key) is past the last one read, ordered that way,
    then polls for more. The position after each emitted batch is the
    (cursor, key) of its last row: checkpoints store it, and a lost
    connection resumes from it, so no row is read twice or skipped.
    """

    config: TableSourceConfig  # type: ignore[assignment]

    #: Driver exceptions that mean the connection is gone.
    connection_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self._schema: pa.Schema | None = None
        self._order: list[str] = []
        self._after: list[Any] | None = None
        self._key: list[str] = []

    # --- driver-specific parts ---

    @abstractmethod
    def connect(self) -> None:
        """Open (or reopen) the connection used for reading."""

    @abstractmethod
    def disconnect(self) -> None:
        """Close the connection, ignoring errors."""

    @abstractmethod
    def describe(self) -> tuple[pa.Schema, list[str]]:
        """Return the schema and the SELECT expression of each column."""

    @abstractmethod
    def primary_key(self) -> list[str]:
        """Return the primary key columns of `table` (empty for a query)."""

    @abstractmethod
    def quote(self, name: str) -> str:
        """Quote an identifier."""

    @abstractmethod
    def stream(
        self, sql: str, params: Sequence[Any]
    ) -> Iterator[list[tuple[Any, ...]]]:
        """Run `sql` and yield its rows in chunks of at most `batch_rows`."""

    def relation(self) -> str:
        """The FROM item: the quoted table, or the query as a subquery."""
        config = self.config
        if config.table is not None:
            return ".".join(self.quote(part) for part in config.table.split("."))
        assert config.query is not None
        return f"({config.query.strip().rstrip(';')}) AS dataflare_query"

    def after_condition(self, names: list[str]) -> str:
        """SQL that is true for rows whose `names` come after the position."""
        quoted = [self.quote(n) for n in names]
        return f"({', '.join(quoted)}) > ({', '.join(['%s'] * len(names))})"

    # --- lifecycle ---

    @property
    def bounded(self) -> bool:
        return self.config.mode == "full" or not self.config.follow

    def where(self) -> str:
        name = self.config.table or "query"
        return f"{self.metadata.name} {self.config.where()} {name}"

    def retry(self, operation: Callable[[], T], what: str) -> T:
        """Run `operation`, reconnecting with backoff while the server is away."""

        def attempt() -> T:
            try:
                return operation()
            except self.connection_errors as exc:
                logger.warning(
                    "step %r: connection to %s lost during %s: %s; reconnecting",
                    self.context.step,
                    self.config.where(),
                    what,
                    _one_line(exc),
                )
                self.disconnect()
                self._reconnect()
                raise _Retry(_one_line(exc)) from exc

        return reconnecting(
            attempt,
            step=self.context.step,
            what=what,
            errors=(_Retry,),
            give_up_after=self.config.reconnect_for.total_seconds(),
            should_stop=lambda: self.context.stopping,
        )

    def _reconnect(self) -> None:
        reconnecting(
            self.connect,
            step=self.context.step,
            what=f"reconnect to {self.config.where()}",
            errors=self.connection_errors,
            give_up_after=self.config.reconnect_for.total_seconds(),
            should_stop=lambda: self.context.stopping,
        )

    def open(self) -> None:
        self._reconnect()
        self._schema, self._select = self.describe()
        key = list(self.config.key or self.primary_key())
        missing = [n for n in key if n not in self._schema.names]
        if missing:
            raise ValueError(
                f"{self.where()}: key column(s) {', '.join(missing)} are not among "
                f"the columns read ({', '.join(self._schema.names)}); add them to "
                "`columns` or fix `key`"
            )
        self._key = key
        cursor = self.config.cursor
        if cursor is not None and cursor not in self._schema.names:
            raise ValueError(
                f"{self.where()}: cursor column {cursor!r} is not among the columns "
                f"read ({', '.join(self._schema.names)})"
            )
        self._order = ([cursor] if cursor else []) + [k for k in key if k != cursor]
        if self.config.mode == "incremental" and self.config.start_after is not None:
            if len(self._order) > 1:
                # Rows with the start value itself are past it only for a
                # key below every real one; compare on the cursor alone.
                self._after = None
                self._start_after = self.config.start_after
            else:
                self._after = [self.config.start_after]
        if self.config.mode == "full" and not self._order:
            logger.info(
                "step %r: %s has no key; a lost connection or a crash restarts "
                "the read from the beginning",
                self.context.step,
                self.where(),
            )

    def close(self) -> None:
        self.disconnect()

    def schema(self) -> pa.Schema:
        if self._schema is None:
            self._reconnect()
            try:
                self._schema, self._select = self.describe()
            finally:
                self.disconnect()
        return self._schema

    # --- checkpoints ---

    def snapshot_position(self) -> Any:
        if not self._order:
            return None
        after = None if self._after is None else [encode_value(v) for v in self._after]
        return {"after": after}

    def restore_position(self, position: Any) -> None:
        if not position or not self._order:
            return
        after = position.get("after")
        self._after = None if after is None else [decode_value(v) for v in after]
        self._start_after = None

    # --- reading ---

    _start_after: Any = None
    _select: list[str] = []

    def _sql(self) -> tuple[str, list[Any]]:
        assert self._schema is not None
        select = ", ".join(
            f"{expr} AS {self.quote(name)}"
            for expr, name in zip(self._select, self._schema.names, strict=True)
        )
        conditions: list[str] = []
        params: list[Any] = []
        cursor = self.config.cursor
        if cursor is not None:
            conditions.append(f"{self.quote(cursor)} IS NOT NULL")
        if self._after is not None:
            conditions.append(self.after_condition(self._order))
            params.extend(self._after)
        elif self._start_after is not None and cursor is not None:
            conditions.append(f"{self.quote(cursor)} > %s")
            params.append(self._start_after)
        sql = f"SELECT {select} FROM {self.relation()}"
        if conditions:
            sql = f"SELECT * FROM ({sql}) AS dataflare_rows WHERE " + " AND ".join(
                conditions
            )
        if self._order:
            sql += " ORDER BY " + ", ".join(self.quote(n) for n in self._order)
        return sql, params

    def read(self) -> Iterator[SourceBatch | Idle]:
        while not self.context.stopping:
            yield from self._read_pass()
            if self.bounded or self.context.stopping:
                return
            yield IDLE
            self._pause()

    def _pause(self) -> None:
        deadline = time.monotonic() + self.config.poll_interval.total_seconds()
        while not self.context.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _read_pass(self) -> Iterator[SourceBatch]:
        """Read every row past the position, resuming after connection losses."""
        emitted_any = False
        while True:
            try:
                for item in self._read_rows():
                    emitted_any = True
                    yield item
                    if self.context.stopping:
                        return
                return
            except self.connection_errors as exc:
                if emitted_any and not self._order:
                    raise ConnectionError(
                        f"step {self.context.step!r}: connection to "
                        f"{self.config.where()} lost while reading {self.where()}, "
                        "which has no key to resume from; set `key` to columns that "
                        "identify a row"
                    ) from exc
                logger.warning(
                    "step %r: connection to %s lost while reading: %s; reconnecting",
                    self.context.step,
                    self.config.where(),
                    _one_line(exc),
                )
                self.disconnect()
                self._reconnect()
                if self.context.stopping:
                    return

    def _read_rows(self) -> Iterator[SourceBatch]:
        assert self._schema is not None
        sql, params = self._sql()
        name = self.config.table or "query"
        for rows in self.stream(sql, params):
            if not rows:
                continue
            batch, bad = rows_to_batch(rows, self._schema)
            if bad:
                self.context.reject(
                    [
                        dict(zip(self._schema.names, rows[i], strict=True))
                        for i, _ in bad
                    ],
                    [reason for _, reason in bad],
                    [f"{name} row {self._describe_row(rows[i])}" for i, _ in bad],
                )
            last = rows[-1]
            if self._order:
                index = {n: i for i, n in enumerate(self._schema.names)}
                self._after = [last[index[n]] for n in self._order]
            if batch.num_rows:
                yield SourceBatch(batch, RowOrigin(name, self._order, batch))

    def _describe_row(self, row: Sequence[Any]) -> str:
        assert self._schema is not None
        names = self._order or self._schema.names[:1]
        index = {n: i for i, n in enumerate(self._schema.names)}
        return ", ".join(f"{n}={row[index[n]]!r}" for n in names)


class _Retry(Exception):
    """Raised inside `retry` after a reconnect, to run the operation again."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- sinks ----------------------------------------------------------------------


class TableSink(Sink[ConfigT]):
    """Insert or upsert batches into a table; exactly once with checkpoints.

    Without checkpoints (or with `exactly_once: false`), each batch is written
    in one transaction: straight into the table for inserts, through a
    temporary table for upserts and change records.

    With checkpoints, each batch is appended to a staging table (with a
    sequence number per row) in its own transaction. When a checkpoint is
    complete, one transaction moves the rows it covers from the staging
    table into the target table and records the checkpoint id in the
    progress table. After a crash, `restore` publishes what the restored
    checkpoint covered, if that was not done, and deletes staged rows written
    after it: those records are produced again.
    """

    config: TableSinkConfig  # type: ignore[assignment]

    connection_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        self._seq = 0  # sequence number of the last staged row
        self._prepared: dict[int, int] = {}  # checkpoint id -> last staged seq
        self._restored = False
        self._stage_checked = False
        self._columns: list[str] = []
        self._key: list[str] = []
        self._written = 0

    # --- driver-specific parts ---

    @abstractmethod
    def connect(self) -> None:
        """Open (or reopen) the connection, in manual-commit mode."""

    @abstractmethod
    def disconnect(self) -> None:
        """Close the connection, ignoring errors."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; return its rows (empty when it returns none)."""

    @abstractmethod
    def commit_transaction(self) -> None: ...

    @abstractmethod
    def rollback_transaction(self) -> None: ...

    @abstractmethod
    def quote(self, name: str) -> str: ...

    @abstractmethod
    def table_columns(self, schema: str | None, table: str) -> dict[str, str] | None:
        """Return the table's columns and their SQL types, None if it is missing."""

    @abstractmethod
    def primary_key(self, schema: str | None, table: str) -> list[str]: ...

    @abstractmethod
    def column_type(self, field: pa.Field) -> str:
        """Return the SQL type that holds an Arrow field."""

    @abstractmethod
    def load(self, table: str, columns: list[str], batch: pa.RecordBatch) -> None:
        """Append the batch's rows to `table` (within the open transaction)."""

    @abstractmethod
    def create_temporary(self, name: str, ddl_columns: str) -> None:
        """Create an empty temporary table for one write (dropped at commit)."""

    @abstractmethod
    def publish_sql(
        self, source: str, target: str, columns: list[str], upto: int | None
    ) -> list[str]:
        """Return statements moving the rows of `source` into `target`.

        Rows of `source` have `SEQ` and, when changes are applied, `OP`; with
        `upto`, only rows whose `SEQ` is at most `upto` are moved.
        """

    @abstractmethod
    def upsert_progress(self) -> str:
        """SQL that sets (key, instance) -> (checkpoint id, target, records)."""

    @abstractmethod
    def progress_ddl(self, table: str) -> str: ...

    default_schema: str | None = None

    # --- names ---

    def qualified(self, schema: str | None, table: str) -> str:
        if schema is None:
            return self.quote(table)
        return f"{self.quote(schema)}.{self.quote(table)}"

    @property
    def target(self) -> str:
        schema, table = split_name(self.config.table, self.default_schema)
        return self.qualified(schema, table)

    @property
    def stage(self) -> str:
        schema, _ = split_name(self.config.table, self.default_schema)
        digest = hashlib.sha1(
            f"{self._progress_key()}|{self.context.instance}|{self.config.table}".encode()
        ).hexdigest()[:16]
        return self.qualified(schema, f"dataflare_stage_{digest}")

    @property
    def progress(self) -> str:
        schema, _ = split_name(self.config.table, self.default_schema)
        return self.qualified(schema, self.config.progress_table)

    def _progress_key(self) -> str:
        if self.config.progress_key is not None:
            return self.config.progress_key
        pipeline = getattr(self.context, "pipeline_id", None)
        step = self.context.step
        return f"{pipeline}/{step}" if pipeline else step

    @property
    def staged(self) -> bool:
        """True when output goes through the staging table (exactly once)."""
        return self.transactional and self.config.exactly_once

    # --- lifecycle ---

    def info(self) -> SinkInfo:
        delivery = "exactly-once" if self.staged else "at-least-once"
        return SinkInfo(
            paths=[f"{self.metadata.name}://{self.config.where()}/{self.config.table}"],
            delivery=delivery,
        )

    def retry(self, operation: Callable[[], T], what: str) -> T:
        """Run `operation` in a transaction, reconnecting while the server is away.

        The operation runs again from its start after a reconnect, so it must
        be safe to repeat once its transaction was rolled back.
        """

        def attempt() -> T:
            try:
                result = operation()
                self.commit_transaction()
                return result
            except self.connection_errors as exc:
                logger.warning(
                    "step %r: connection to %s lost during %s: %s; reconnecting",
                    self.context.step,
                    self.config.where(),
                    what,
                    _one_line(exc),
                )
                self.disconnect()
                self._reconnect()
                raise _Retry(_one_line(exc)) from exc
            except BaseException:
                self._rollback_quietly()
                raise

        return reconnecting(
            attempt,
            step=self.context.step,
            what=what,
            errors=(_Retry,),
            give_up_after=self.config.reconnect_for.total_seconds(),
        )

    def _rollback_quietly(self) -> None:
        try:
            self.rollback_transaction()
        except Exception:  # the connection may be gone; nothing to undo then
            logger.debug("rollback failed", exc_info=True)

    def _reconnect(self) -> None:
        reconnecting(
            self.connect,
            step=self.context.step,
            what=f"connect to {self.config.where()}",
            errors=self.connection_errors,
            give_up_after=self.config.reconnect_for.total_seconds(),
        )

    def open(self) -> None:
        self._reconnect()
        self.retry(self._prepare_tables, f"prepare table {self.config.table}")

    def close(self) -> None:
        self.disconnect()

    def _prepare_tables(self) -> None:
        schema_name, table = split_name(self.config.table, self.default_schema)
        fields = self._input_fields()
        existing = self.table_columns(schema_name, table)
        if existing is None:
            if not self.config.create_table:
                raise ValueError(
                    f"table {self.config.table} does not exist in "
                    f"{self.config.where()}; create it, or set create_table: true"
                )
            if not fields:
                raise ValueError(
                    f"cannot create table {self.config.table}: the input schema is "
                    "unknown; create the table first"
                )
            ddl = ", ".join(
                f"{self.quote(f.name)} {self.column_type(f)}" for f in fields
            )
            if self.config.key:
                ddl += f", PRIMARY KEY ({', '.join(map(self.quote, self.config.key))})"
            self.execute(f"CREATE TABLE {self.target} ({ddl})")
            logger.info(
                "step %r: created table %s in %s",
                self.context.step,
                self.config.table,
                self.config.where(),
            )
            existing = {f.name: self.column_type(f) for f in fields}
        names = [f.name for f in fields] if fields else list(existing)
        unknown = [n for n in names if n not in existing]
        if unknown:
            raise ValueError(
                f"table {self.config.table} has no column {', '.join(unknown)} (its "
                f"columns are {', '.join(existing)}); add the columns or leave the "
                "fields out with a `select` step"
            )
        self._columns = names
        self._key = list(self.config.key or self.primary_key(schema_name, table))
        if self.config.applies_changes and not self._key:
            raise ValueError(
                f"table {self.config.table} has no primary key, which upserts and "
                "change records need; set `key` or add a primary key"
            )
        missing_key = [k for k in self._key if k not in self._columns]
        if self.config.applies_changes and missing_key:
            raise ValueError(
                f"key column(s) {', '.join(missing_key)} are not among the fields "
                f"written ({', '.join(self._columns)})"
            )
        self._column_types = existing
        if self.staged:
            self.execute(self.progress_ddl(self.progress))
            self._create_stage()

    def _input_fields(self) -> list[pa.Field]:
        schema = self.input_schema
        if schema is None:
            return []
        return [f for f in schema if f.name != self.config.op_field]

    def _holding_columns(self) -> str:
        """Column definitions of a staging or temporary table."""
        types = self._column_types
        parts = [f"{self.quote(n)} {types[n]}" for n in self._columns]
        parts.append(f"{self.quote(SEQ)} BIGINT NOT NULL")
        if self.config.op_field is not None:
            parts.append(f"{self.quote(OP)} VARCHAR(16)")
        return ", ".join(parts)

    @abstractmethod
    def _create_stage(self) -> None:
        """Create the staging table if it is missing."""

    # --- writing ---

    def _prepare_batch(self, batch: pa.RecordBatch) -> pa.RecordBatch | None:
        """Check keys and ops, add sequence numbers; None if nothing is left."""
        op_field = self.config.op_field
        names = [n for n in batch.schema.names if n != op_field]
        unknown = [n for n in names if n not in self._columns]
        if unknown:
            raise ValueError(
                f"field(s) {', '.join(unknown)} have no column in table "
                f"{self.config.table}; leave them out with a `select` step"
            )
        keep = np.ones(batch.num_rows, dtype=bool)
        reasons: dict[int, str] = {}
        if self.config.applies_changes:
            for name in self._key:
                nulls = np.asarray(
                    pc.is_null(batch.column(name)).to_numpy(zero_copy_only=False)
                )
                for row in np.flatnonzero(nulls):
                    reasons.setdefault(int(row), f"key column {name!r} is null")
        ops: pa.Array | None = None
        if op_field is not None:
            if op_field not in batch.schema.names:
                raise ValueError(
                    f"op_field {op_field!r} is not a field of the records "
                    f"({', '.join(batch.schema.names)})"
                )
            ops = pc.utf8_lower(batch.column(op_field).cast(pa.string()))
            known = pc.is_in(ops, pa.array([OP_INSERT, OP_UPDATE, OP_DELETE, OP_READ]))
            known_np = np.asarray(
                pc.fill_null(known, False).to_numpy(zero_copy_only=False)
            )
            for row in np.flatnonzero(~known_np):
                reasons.setdefault(
                    int(row),
                    f"{op_field} is {ops[int(row)].as_py()!r}; expected insert, "
                    "update, delete or read",
                )
        if reasons:
            rows = sorted(reasons)
            keep[rows] = False
            self.context.reject(batch.take(pa.array(rows)), [reasons[r] for r in rows])
            batch = batch.filter(pa.array(keep))
            if ops is not None:
                ops = ops.filter(pa.array(keep))
        if batch.num_rows == 0:
            return None
        missing = [n for n in self._columns if n not in names]
        if missing:
            raise ValueError(
                f"the records have no field {', '.join(missing)}, written to table "
                f"{self.config.table}; add the fields or set the sink's input schema"
            )
        columns = [batch.column(n) for n in self._columns]
        fields = [batch.schema.field(n) for n in self._columns]
        seq = pa.array(
            np.arange(self._seq + 1, self._seq + 1 + batch.num_rows, dtype=np.int64)
        )
        columns.append(seq)
        fields.append(pa.field(SEQ, pa.int64()))
        if ops is not None:
            columns.append(ops)
            fields.append(pa.field(OP, pa.string()))
        return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))

    def write(self, batch: pa.RecordBatch) -> None:
        prepared = self._prepare_batch(batch)
        if prepared is None:
            return
        if self.staged:
            self._check_stage()
            first = self._seq + 1
            self.retry(lambda: self._stage(prepared, first), "write to staging table")
        else:
            self.retry(lambda: self._write_direct(prepared), "write")
        self._seq += prepared.num_rows
        self._written += prepared.num_rows

    def _holding(self) -> list[str]:
        extra = [SEQ] + ([OP] if self.config.op_field is not None else [])
        return self._columns + extra

    def _stage(self, batch: pa.RecordBatch, first: int) -> None:
        # A retry after a commit whose answer was lost must not stage twice.
        found = self.execute(
            f"SELECT 1 FROM {self.stage} WHERE {self.quote(SEQ)} = %s", [first]
        )
        if found:
            return
        self.load(self.stage, self._holding(), batch)

    def _write_direct(self, batch: pa.RecordBatch) -> None:
        if not self.config.applies_changes:
            self.load(self.target, self._columns, batch.select(self._columns))
            return
        temporary = "dataflare_incoming"
        self.create_temporary(temporary, self._holding_columns())
        self.load(self.quote(temporary), self._holding(), batch)
        for sql in self.publish_sql(
            self.quote(temporary), self.target, self._columns, None
        ):
            self.execute(sql)

    # --- checkpoints ---

    def _check_stage(self) -> None:
        """On a fresh start, drop rows staged by an abandoned earlier run."""
        if self._stage_checked or self._restored:
            self._stage_checked = True
            return
        self._stage_checked = True

        def clear() -> int:
            rows = self.execute(f"SELECT COUNT(*) FROM {self.stage}")
            self.execute(f"DELETE FROM {self.stage}")
            return int(rows[0][0])

        stale = self.retry(clear, "clear staging table")
        if stale:
            logger.warning(
                "step %r: discarded %d rows staged by an earlier run that did not "
                "resume (table %s)",
                self.context.step,
                stale,
                self.stage,
            )

    def prepare_commit(self, checkpoint_id: int) -> Any:
        if not self.staged:
            return None
        self._check_stage()
        self._prepared[checkpoint_id] = self._seq
        return {"upto": self._seq}

    def commit(self, checkpoint_id: int) -> None:
        if not self.staged or checkpoint_id not in self._prepared:
            return
        upto = self._prepared.pop(checkpoint_id)
        for older in [c for c in self._prepared if c < checkpoint_id]:
            self._prepared.pop(older)
        self.retry(
            lambda: self._publish(upto, checkpoint_id), "publish a checkpoint's rows"
        )

    def _publish(self, upto: int, checkpoint_id: int) -> None:
        statements = self.publish_sql(self.stage, self.target, self._columns, upto)
        for sql in statements:
            self.execute(sql)
        self.execute(f"DELETE FROM {self.stage} WHERE {self.quote(SEQ)} <= %s", [upto])
        recorded = None if checkpoint_id == FINAL_CHECKPOINT else checkpoint_id
        self.execute(
            self.upsert_progress(),
            [
                self._progress_key(),
                self.context.instance,
                recorded,
                self.config.table,
                upto,
            ],
        )
        crash_point("sink-commit")

    def restore(self, state: Any, checkpoint_id: int) -> None:
        if not self.staged:
            return
        self._restored = True
        upto = int(state["upto"]) if state else 0

        def finish() -> None:
            rows = self.execute(
                f"SELECT checkpoint_id FROM {self.progress} WHERE sink = %s AND "
                "instance = %s",
                [self._progress_key(), self.context.instance],
            )
            last = rows[0][0] if rows else None
            if last is not None and int(last) > checkpoint_id:
                logger.warning(
                    "step %r: table %s already holds output up to checkpoint %d, "
                    "newer than checkpoint %d the run resumes from; records after "
                    "it are written again",
                    self.context.step,
                    self.config.table,
                    int(last),
                    checkpoint_id,
                )
            self._publish(upto, checkpoint_id)
            self.execute(
                f"DELETE FROM {self.stage} WHERE {self.quote(SEQ)} > %s", [upto]
            )

        self.retry(finish, f"finish checkpoint {checkpoint_id}")
        self._seq = upto
        logger.info(
            "step %r: table %s restored to checkpoint %d",
            self.context.step,
            self.config.table,
            checkpoint_id,
        )

    def flush(self) -> None:
        """Writes are committed per batch; nothing is buffered."""


def rows_of(batch: pa.RecordBatch) -> list[tuple[Any, ...]]:
    """Return the batch as a list of row tuples of Python values."""
    columns = [column.to_pylist() for column in batch.columns]
    return list(zip(*columns, strict=True)) if columns else []

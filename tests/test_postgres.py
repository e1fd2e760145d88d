"""The `postgres` source and sink against the local PostgreSQL server.

Each test uses its own tables (and slot and publication for cdc) with a
unique name, and drops them. With CI set, an unreachable server fails the
tests; without it, they are skipped.
"""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from conftest import RecordingContext

from dataflare import Pipeline
from dataflare.connectors.postgres import PostgresSink, PostgresSource
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.runner import PipelineRun

DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
SERVER = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": "test"}


def _cluster() -> str:
    versions = (
        sorted(os.listdir("/etc/postgresql"))
        if os.path.isdir("/etc/postgresql")
        else []
    )
    return versions[0] if versions else "15"


def pg_ctl(action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", _cluster(), "main", action],
        check=True,
        capture_output=True,
        timeout=120,
    )


def connect() -> psycopg.Connection[Any]:
    return psycopg.connect(DSN, autocommit=True)


def wait_for_server() -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            connect().close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server() -> Iterator[None]:
    try:
        connect().close()
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is not reachable at 127.0.0.1:5432: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this fails instead of skipping)")
        pytest.skip(message)
    yield


@pytest.fixture
def pg(server: None) -> Iterator[psycopg.Connection[Any]]:
    conn = connect()
    yield conn
    conn.close()


@pytest.fixture
def name() -> str:
    return f"df_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def cleanup(server: None) -> Iterator[list[str]]:
    """SQL statements to run after the test, to drop what it created."""
    statements: list[str] = []
    yield statements
    wait_for_server()
    with connect() as conn:
        for statement in statements:
            for _ in range(50):
                try:
                    conn.execute(statement)
                    break
                except psycopg.errors.ObjectInUse:
                    time.sleep(0.1)


@pytest.fixture
def closing() -> Iterator[list[psycopg.Connection[Any]]]:
    """Connections a test opens itself, closed after it."""
    opened: list[psycopg.Connection[Any]] = []
    yield opened
    for conn in opened:
        conn.close()


@pytest.fixture
def logical(server: None) -> None:
    """Make sure the server can decode its WAL (wal_level = logical).

    The restart this may need ends every open connection, so tests list
    this fixture before `pg`, which pytest then opens after it.
    """
    with connect() as conn:
        row = conn.execute("SHOW wal_level").fetchone()
        if row is not None and row[0] == "logical":
            return
        logging.getLogger(__name__).warning(
            "setting wal_level = logical and restarting"
        )
        conn.execute("ALTER SYSTEM SET wal_level = logical")
    pg_ctl("restart")
    wait_for_server()


def registry() -> PluginRegistry:
    plugins = PluginRegistry.from_entry_points()
    plugins.register("postgres", PostgresSource)
    plugins.register("postgres", PostgresSink)
    return plugins


def rows(
    conn: psycopg.Connection[Any], table: str, order: str = "id"
) -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()


def wait_until(check: Callable[[], bool], what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.1)


class Background:
    """Run a pipeline on a thread; stop it and collect its summary or error."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.run = PipelineRun(pipeline.build())
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self.summary = self.run.run()
        except BaseException as exc:
            self.error = exc

    def alive(self) -> bool:
        if self.error is not None:
            raise AssertionError(f"pipeline failed: {self.error}") from self.error
        return self.thread.is_alive()

    def stop(self) -> Any:
        self.run.stop()
        self.thread.join(120)
        assert not self.thread.is_alive(), "the pipeline did not stop"
        if self.error is not None:
            raise AssertionError(f"pipeline failed: {self.error}") from self.error
        return self.summary


# --- types ------------------------------------------------------------------------

TYPED_TABLE = """
CREATE TABLE {name} (
    id bigint PRIMARY KEY, small smallint, regular integer, real_value real,
    double_value double precision, label text, flag boolean,
    at_zone timestamptz, at_local timestamp, day date, amount numeric(12, 3),
    exact numeric, payload bytea, tags integer[], clock time
)
"""
TYPED_ROWS = [
    (
        1,
        -2,
        2_000_000_000,
        1.5,
        0.1,
        'a "quoted", text',
        True,
        dt.datetime(
            2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))
        ),
        dt.datetime(2024, 1, 2, 3, 4, 5),
        dt.date(2024, 1, 2),
        decimal.Decimal("-123.456"),
        decimal.Decimal("1.000000000000000000001"),
        b"\x00\xff\n",
        [1, None, 3],
        dt.time(12, 0, 1, 5),
    ),
    (2, None, None, float("inf"), float("-inf"), "", False) + (None,) * 8,
    (3, 7, 8, 0.0, 1e300, "ünïcode ✓", None) + (None,) * 8,
]


def test_round_trip_keeps_types(
    pg: psycopg.Connection[Any], name: str, cleanup: list[str]
) -> None:
    source, target = f"{name}_src", f"{name}_dst"
    cleanup += [f"DROP TABLE IF EXISTS {source}", f"DROP TABLE IF EXISTS {target}"]
    pg.execute(TYPED_TABLE.format(name=source))
    pg.execute(TYPED_TABLE.format(name=target))
    with pg.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {source} VALUES ({', '.join(['%s'] * 15)})", TYPED_ROWS
        )

    p = Pipeline("pg-types").use_registry(registry())
    read = p.source("read", "postgres", table=source, batch_rows=2, **SERVER)
    p.destination("write", "postgres", [read], table=target, **SERVER)
    p.destination("seen", "memory", [read])
    summary = p.run()

    assert rows(pg, target) == rows(pg, source)
    schema = summary.output("seen").schema
    assert schema.field("id").type == pa.int64()
    assert schema.field("small").type == pa.int16()
    assert schema.field("regular").type == pa.int32()
    assert schema.field("real_value").type == pa.float32()
    assert schema.field("flag").type == pa.bool_()
    assert schema.field("at_zone").type == pa.timestamp("us", tz="UTC")
    assert schema.field("at_local").type == pa.timestamp("us")
    assert schema.field("amount").type == pa.decimal128(12, 3)
    assert schema.field("exact").type == pa.string()
    assert schema.field("tags").type == pa.list_(pa.int32())
    first = summary.output("seen").sort_by("id").to_pylist()[0]
    assert first["at_zone"] == dt.datetime(2024, 1, 2, 1, 4, 5, 123456, tzinfo=dt.UTC)
    assert first["amount"] == decimal.Decimal("-123.456")


def test_sink_creates_typed_table(
    pg: psycopg.Connection[Any], name: str, cleanup: list[str]
) -> None:
    cleanup.append(f"DROP TABLE IF EXISTS {name}")
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "score": pa.array([0.25, None], pa.float64()),
            "price": pa.array([decimal.Decimal("9.99"), None], pa.decimal128(8, 2)),
            "seen": pa.array(
                [dt.datetime(2024, 5, 1, tzinfo=dt.UTC), None],
                pa.timestamp("us", tz="UTC"),
            ),
            "ok": pa.array([True, None]),
            "name": pa.array(["x", None]),
        }
    )
    p = Pipeline("pg-create").use_registry(registry())
    data = p.source("data", "memory", records=table)
    p.destination("write", "postgres", [data], table=name, key=["id"], **SERVER)
    p.run()

    types = dict(
        pg.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = %s",
            [name],
        ).fetchall()
    )
    assert types == {
        "id": "bigint",
        "score": "double precision",
        "price": "numeric",
        "seen": "timestamp with time zone",
        "ok": "boolean",
        "name": "text",
    }
    assert rows(pg, name) == [
        (
            1,
            0.25,
            decimal.Decimal("9.99"),
            dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
            True,
            "x",
        ),
        (2, None, None, None, None, None),
    ]


# --- incremental ------------------------------------------------------------------


def source(config: dict[str, Any], context: RecordingContext) -> PostgresSource:
    plugin = PostgresSource(
        PostgresSource.Config.model_validate({**SERVER, **config}), context
    )
    plugin.open()
    return plugin


def test_incremental_resumes_from_position(
    pg: psycopg.Connection[Any], name: str, cleanup: list[str]
) -> None:
    cleanup.append(f"DROP TABLE IF EXISTS {name}")
    pg.execute(
        f"CREATE TABLE {name} (id serial PRIMARY KEY, changed timestamptz, v text)"
    )
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for i in range(5):
        # Two rows share each update time: the key breaks the tie.
        pg.execute(
            f"INSERT INTO {name} (changed, v) VALUES (%s, %s)",
            [base + dt.timedelta(minutes=i // 2), f"row {i}"],
        )
    config = {
        "table": name,
        "mode": "incremental",
        "cursor": "changed",
        "batch_rows": 2,
        "follow": False,
    }

    first = source(config, RecordingContext())
    reader = first.read()
    batch = next(reader)
    position = first.snapshot_position()
    first.close()
    second = source(config, RecordingContext())
    second.restore_position(position)
    rest = [item.batch for item in second.read() if hasattr(item, "batch")]
    pg.execute(
        f"INSERT INTO {name} (changed, v) VALUES (%s, 'late')",
        [base + dt.timedelta(hours=1)],
    )
    later = [item.batch for item in second.read() if hasattr(item, "batch")]
    second.close()

    assert hasattr(batch, "batch")
    assert batch.batch.column("v").to_pylist() == ["row 0", "row 1"]
    assert pa.Table.from_batches(rest).column("v").to_pylist() == [
        "row 2",
        "row 3",
        "row 4",
    ]
    assert pa.Table.from_batches(later).column("v").to_pylist() == ["late"]
    assert position["after"][0] == {"$datetime": "2024-01-01T00:00:00+00:00"}


# --- exactly-once sink ------------------------------------------------------------


def sink(name: str, context: RecordingContext, **config: Any) -> PostgresSink:
    plugin = PostgresSink(
        PostgresSink.Config.model_validate(
            {**SERVER, "table": name, "key": ["id"], **config}
        ),
        context,
    )
    plugin.input_schema = pa.schema([("id", pa.int64()), ("v", pa.string())])
    plugin.transactional = True
    plugin.open()
    return plugin


def stage_of(table: str, step: str, progress_key: str | None = None) -> str:
    """Return the staging table of a sink, to drop it after a test."""
    config = {**SERVER, "table": table, "progress_key": progress_key}
    return PostgresSink(
        PostgresSink.Config.model_validate(config), RecordingContext(step)
    ).stage


def batch(ids: range, label: str = "v") -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"id": pa.array(list(ids), pa.int64()), "v": [f"{label}{i}" for i in ids]}
    )


def test_staged_sink_publishes_once(
    pg: psycopg.Connection[Any], name: str, cleanup: list[str]
) -> None:
    cleanup += [
        f"DROP TABLE IF EXISTS {name}",
        "DELETE FROM dataflare_progress WHERE sink LIKE 'eo-%'",
    ]
    key = f"eo-{name}"
    context = RecordingContext("out")
    first = sink(name, context, progress_key=key)
    cleanup.append(f"DROP TABLE IF EXISTS {first.stage}")
    first.write(batch(range(0, 3)))
    state1 = first.prepare_commit(1)
    first.commit(1)
    first.write(batch(range(3, 6)))
    state2 = first.prepare_commit(2)
    # The process dies here: checkpoint 2 is complete, but never published,
    # and rows written after it must vanish.
    first.write(batch(range(6, 9)))
    assert [r[0] for r in rows(pg, name)] == [0, 1, 2]
    first.close()

    second = sink(name, RecordingContext("out"), progress_key=key)
    second.restore(state2, 2)
    after_restore = [r[0] for r in rows(pg, name)]
    second.restore(state2, 2)  # a crash during the restore: done again
    second.write(batch(range(6, 9)))
    second.commit(3)  # not prepared: nothing happens
    second.prepare_commit(3)
    second.commit(3)
    second.close()

    assert state1 == {"upto": 3}
    assert after_restore == [0, 1, 2, 3, 4, 5]
    assert [r[0] for r in rows(pg, name)] == list(range(9))
    progress = pg.execute(
        "SELECT checkpoint_id, target FROM dataflare_progress WHERE sink = %s", [key]
    ).fetchall()
    assert progress == [(3, name)]


def test_upsert_keeps_last_change(
    pg: psycopg.Connection[Any], name: str, cleanup: list[str]
) -> None:
    cleanup.append(f"DROP TABLE IF EXISTS {name}")
    changes = pa.table(
        {
            "id": [1, 2, 1, 3, 2, 3],
            "v": ["a", "b", "a2", "c", None, "c2"],
            "_op": ["insert", "insert", "update", "insert", "delete", "update"],
        }
    )
    p = Pipeline("pg-upsert").use_registry(registry())
    data = p.source("data", "memory", records=changes, batch_rows=4)
    p.destination(
        "write",
        "postgres",
        [data],
        table=name,
        key=["id"],
        mode="upsert",
        op_field="_op",
        **SERVER,
    )
    p.run()

    assert rows(pg, name) == [(1, "a2"), (3, "c2")]


def test_checkpointed_run_writes_once(
    pg: psycopg.Connection[Any], name: str, cleanup: list[str], tmp_path: Path
) -> None:
    cleanup += [
        f"DROP TABLE IF EXISTS {name}",
        "DELETE FROM dataflare_progress WHERE sink LIKE 'cp-%'",
    ]
    records = [{"id": i, "v": f"v{i}"} for i in range(5000)]
    p = Pipeline("pg-checkpointed").use_registry(registry())
    data = p.source("data", "memory", records=records, batch_rows=100)
    p.destination(
        "write", "postgres", [data], table=name, progress_key=f"cp-{name}", **SERVER
    )
    p._data["checkpointing"] = {"interval": "20ms", "storage": str(tmp_path / "chk")}
    summary = p.run()

    assert [r[0] for r in rows(pg, name)] == list(range(5000))
    assert summary.delivery["write"] == "exactly-once"
    cleanup.append(f"DROP TABLE IF EXISTS {stage_of(name, 'write', f'cp-{name}')}")


# --- change data capture ----------------------------------------------------------


def cdc_pipeline(name: str, slot: str, **source: Any) -> Pipeline:
    p = Pipeline(f"pg-cdc-{name}").use_registry(registry())
    changes = p.source(
        "changes",
        "postgres",
        table=f"{name}_src",
        mode="cdc",
        slot=slot,
        poll_interval="100ms",
        reconnect_for="2m",
        **SERVER,
        **source,
    )
    p.destination(
        "apply",
        "postgres",
        [changes],
        table=f"{name}_dst",
        mode="upsert",
        op_field="_op",
        key=["id"],
        **SERVER,
    )
    return p


def cdc_tables(pg: psycopg.Connection[Any], name: str, cleanup: list[str]) -> str:
    slot = f"{name}_slot"
    cleanup += [
        f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        f"WHERE slot_name = '{slot}'",
        f"DROP PUBLICATION IF EXISTS dataflare_{slot}",
        f"DROP TABLE IF EXISTS {name}_src",
        f"DROP TABLE IF EXISTS {name}_dst",
    ]
    pg.execute(
        f"CREATE TABLE {name}_src (id integer PRIMARY KEY, v text, "
        "amount numeric(10, 2), "
        "at timestamptz)"
    )
    pg.execute(
        f"INSERT INTO {name}_src SELECT i, 'initial ' || i, i * 1.5, "
        "'2024-01-01'::timestamptz + i * interval '1 hour' "
        "FROM generate_series(1, 50) i"
    )
    return slot


def same(pg: psycopg.Connection[Any], name: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return rows(pg, f"{name}_src") == rows(pg, f"{name}_dst")
        except psycopg.errors.UndefinedTable:
            return False

    return check


def modify(pg: psycopg.Connection[Any], name: str, start: int) -> None:
    table = f"{name}_src"
    pg.execute(
        f"INSERT INTO {table} SELECT i, 'new ' || i, i, now() "
        "FROM generate_series(%s::int, %s::int) i",
        [start, start + 29],
    )
    pg.execute(
        f"UPDATE {table} SET v = v || ' (changed)', amount = amount + 1 "
        "WHERE id % 3 = 0"
    )
    with pg.transaction():
        pg.execute(f"DELETE FROM {table} WHERE id % 7 = 0")
        pg.execute(f"UPDATE {table} SET id = id + 1000 WHERE id = %s", [start + 1])


def test_cdc_target_matches_source(
    logical: None, pg: psycopg.Connection[Any], name: str, cleanup: list[str]
) -> None:
    slot = cdc_tables(pg, name, cleanup)
    running = Background(cdc_pipeline(name, slot))
    try:
        wait_until(lambda: running.alive() and same(pg, name)(), "initial snapshot")
        modify(pg, name, 100)
        wait_until(lambda: running.alive() and same(pg, name)(), "changes applied")
    finally:
        running.stop()
    assert len(rows(pg, f"{name}_dst")) == len(rows(pg, f"{name}_src")) > 50


# --- server restarts --------------------------------------------------------------


def restart_server() -> None:
    pg_ctl("stop")
    time.sleep(1)
    pg_ctl("start")
    wait_for_server()


def test_cdc_survives_server_restart(
    logical: None,
    pg: psycopg.Connection[Any],
    name: str,
    cleanup: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    closing: list[psycopg.Connection[Any]],
) -> None:
    caplog.set_level(logging.WARNING)
    slot = cdc_tables(pg, name, cleanup)
    cleanup += [
        "DELETE FROM dataflare_progress WHERE sink = 'apply'",
        f"DROP TABLE IF EXISTS {stage_of(f'{name}_dst', 'apply')}",
    ]
    p = cdc_pipeline(name, slot)
    p._data["checkpointing"] = {"interval": "200ms", "storage": str(tmp_path / "chk")}
    running = Background(p)
    try:
        wait_until(lambda: running.alive() and same(pg, name)(), "initial snapshot")
        modify(pg, name, 100)
        restart_server()
        pg = connect()
        closing.append(pg)
        modify(pg, name, 200)
        wait_until(
            lambda: running.alive() and same(pg, name)(), "changes after restart"
        )
    finally:
        running.stop()
    flushed = pg.execute(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
        [slot],
    ).fetchone()
    assert rows(pg, f"{name}_dst") == rows(pg, f"{name}_src")
    assert flushed is not None and flushed[0] is not None
    assert "reconnecting" in caplog.text


def test_incremental_and_sink_survive_restart(
    pg: psycopg.Connection[Any],
    name: str,
    cleanup: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    closing: list[psycopg.Connection[Any]],
) -> None:
    caplog.set_level(logging.WARNING)
    source_table, target = f"{name}_src", f"{name}_dst"
    cleanup += [
        f"DROP TABLE IF EXISTS {source_table}",
        f"DROP TABLE IF EXISTS {target}",
        f"DELETE FROM dataflare_progress WHERE sink = 'rs-{name}'",
        f"DROP TABLE IF EXISTS {stage_of(target, 'write', f'rs-{name}')}",
    ]
    pg.execute(f"CREATE TABLE {source_table} (id bigint PRIMARY KEY, v text)")
    pg.execute(
        f"INSERT INTO {source_table} SELECT i, 'v' || i FROM generate_series(1, 2000) i"
    )
    p = Pipeline(f"pg-restart-{name}").use_registry(registry())
    read = p.source(
        "read",
        "postgres",
        table=source_table,
        mode="incremental",
        cursor="id",
        batch_rows=500,
        poll_interval="100ms",
        reconnect_for="2m",
        **SERVER,
    )
    p.destination(
        "write",
        "postgres",
        [read],
        table=target,
        progress_key=f"rs-{name}",
        reconnect_for="2m",
        **SERVER,
    )
    p._data["checkpointing"] = {"interval": "100ms", "storage": str(tmp_path / "chk")}
    running = Background(p)
    count = lambda: len(rows(pg, target)) if target_exists(pg, target) else 0  # noqa: E731
    try:
        wait_until(lambda: running.alive() and count() == 2000, "first rows")
        restart_server()
        pg = connect()
        closing.append(pg)
        pg.execute(
            f"INSERT INTO {source_table} SELECT i, 'v' || i "
            "FROM generate_series(2001, 4000) i"
        )
        wait_until(lambda: running.alive() and count() == 4000, "rows after restart")
    finally:
        summary = running.stop()
    assert rows(pg, target) == rows(pg, source_table)
    assert "reconnecting" in caplog.text
    assert summary.status == "stopped"


def target_exists(pg: psycopg.Connection[Any], table: str) -> bool:
    row = pg.execute("SELECT to_regclass(%s)", [table]).fetchone()
    return row is not None and row[0] is not None

"""The `mysql` source and sink against the local MariaDB server.

Each test uses its own tables with a unique name, and drops them. With CI
set, an unreachable server fails the tests; without it, they are skipped.
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

import pyarrow as pa
import pymysql
import pytest
from conftest import RecordingContext

from dataflare import Pipeline
from dataflare.connectors.mysql import MySqlSink, MySqlSource
from dataflare.plugin.registry import PluginRegistry
from dataflare.streaming.runner import PipelineRun

SERVER = {"host": "127.0.0.1", "port": 3306, "user": "root", "database": "test"}


def connect() -> pymysql.connections.Connection[Any]:
    return pymysql.connect(
        host="127.0.0.1",
        port=3306,
        user="root",
        password="",
        database="test",
        autocommit=True,
        connect_timeout=3,
        init_command="SET time_zone = '+00:00'",
    )


def wait_for_server() -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            connect().close()
            return
        except pymysql.err.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server() -> None:
    try:
        connect().close()
    except pymysql.err.OperationalError as exc:
        message = f"MariaDB is not reachable at 127.0.0.1:3306: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this fails instead of skipping)")
        pytest.skip(message)


@pytest.fixture
def db(server: None) -> Iterator[pymysql.connections.Connection[Any]]:
    conn = connect()
    yield conn
    conn.close()


@pytest.fixture
def name() -> str:
    return f"df_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def cleanup(server: None) -> Iterator[list[str]]:
    statements: list[str] = []
    yield statements
    wait_for_server()
    conn = connect()
    with conn.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    conn.close()


def run(
    conn: pymysql.connections.Connection[Any], statement: str, params: Any = None
) -> list[tuple[Any, ...]]:
    with conn.cursor() as cursor:
        cursor.execute(statement, params)
        return list(cursor.fetchall())


def rows(
    conn: pymysql.connections.Connection[Any], table: str
) -> list[tuple[Any, ...]]:
    return run(conn, f"SELECT * FROM {table} ORDER BY id")


def registry() -> PluginRegistry:
    plugins = PluginRegistry.from_entry_points()
    plugins.register("mysql", MySqlSource)
    plugins.register("mysql", MySqlSink)
    return plugins


TYPED_TABLE = """
CREATE TABLE {name} (
    id BIGINT PRIMARY KEY, flag BOOLEAN, tiny TINYINT, big_unsigned BIGINT UNSIGNED,
    amount DECIMAL(12, 3), real_value FLOAT, double_value DOUBLE, label VARCHAR(40),
    body TEXT, payload BLOB, at_local DATETIME(6), at_zone TIMESTAMP(6) NULL,
    day DATE, span TIME(6)
)
"""
TYPED_ROWS = [
    (
        1,
        True,
        -3,
        18446744073709551615,
        decimal.Decimal("-123.456"),
        1.5,
        0.1,
        'a "quoted", text',
        "ünïcode ✓",
        b"\x00\xff\n",
        dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
        dt.datetime(2024, 1, 2, 3, 4, 5, 654321),
        dt.date(2024, 1, 2),
        dt.timedelta(hours=-12, microseconds=5),
    ),
    (2, False, None, 0, None, None, None, "", None, b"", None, None, None, None),
    (3,) + (None,) * 13,
]


def test_round_trip_keeps_types(
    db: pymysql.connections.Connection[Any], name: str, cleanup: list[str]
) -> None:
    source, target = f"{name}_src", f"{name}_dst"
    cleanup += [f"DROP TABLE IF EXISTS {source}", f"DROP TABLE IF EXISTS {target}"]
    run(db, TYPED_TABLE.format(name=source))
    with db.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {source} VALUES ({', '.join(['%s'] * 14)})", TYPED_ROWS
        )

    p = Pipeline("mysql-types").use_registry(registry())
    read = p.source("read", "mysql", table=source, batch_rows=2, **SERVER)
    p.destination("write", "mysql", [read], table=target, key=["id"], **SERVER)
    p.destination("seen", "memory", [read])
    summary = p.run()

    assert rows(db, target) == rows(db, source)
    seen = summary.output("seen")
    assert seen.schema.field("flag").type == pa.bool_()
    assert seen.schema.field("tiny").type == pa.int8()
    assert seen.schema.field("big_unsigned").type == pa.uint64()
    assert seen.schema.field("amount").type == pa.decimal128(12, 3)
    assert seen.schema.field("real_value").type == pa.float32()
    assert seen.schema.field("at_zone").type == pa.timestamp("us", tz="UTC")
    assert seen.schema.field("at_local").type == pa.timestamp("us")
    assert seen.schema.field("span").type == pa.duration("us")
    first = seen.sort_by("id").to_pylist()[0]
    assert first["at_zone"] == dt.datetime(2024, 1, 2, 3, 4, 5, 654321, tzinfo=dt.UTC)
    columns = dict(
        run(
            db,
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = 'test' AND TABLE_NAME = %s",
            [target],
        )
    )
    assert columns["at_zone"] == "timestamp(6)"
    assert columns["amount"] == "decimal(12,3)"
    assert columns["flag"] == "tinyint(1)"


def source(config: dict[str, Any]) -> MySqlSource:
    plugin = MySqlSource(
        MySqlSource.Config.model_validate({**SERVER, **config}), RecordingContext()
    )
    plugin.open()
    return plugin


def test_incremental_resumes_from_position(
    db: pymysql.connections.Connection[Any], name: str, cleanup: list[str]
) -> None:
    cleanup.append(f"DROP TABLE IF EXISTS {name}")
    run(
        db,
        f"CREATE TABLE {name} (id INT AUTO_INCREMENT PRIMARY KEY, "
        "changed DATETIME(6), v TEXT)",
    )
    base = dt.datetime(2024, 1, 1)
    for i in range(5):
        run(
            db,
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

    first = source(config)
    item = next(first.read())
    position = first.snapshot_position()
    first.close()
    second = source(config)
    second.restore_position(position)
    rest = [i.batch for i in second.read() if hasattr(i, "batch")]
    second.close()

    assert hasattr(item, "batch") and item.batch.column("v").to_pylist() == [
        "row 0",
        "row 1",
    ]
    assert pa.Table.from_batches(rest).column("v").to_pylist() == [
        "row 2",
        "row 3",
        "row 4",
    ]


def sink(name: str, **config: Any) -> MySqlSink:
    plugin = MySqlSink(
        MySqlSink.Config.model_validate(
            {**SERVER, "table": name, "key": ["id"], **config}
        ),
        RecordingContext("out"),
    )
    plugin.input_schema = pa.schema([("id", pa.int64()), ("v", pa.string())])
    plugin.transactional = True
    plugin.open()
    return plugin


def stage_of(table: str, step: str, progress_key: str) -> str:
    """Return the staging table of a sink, to drop it after a test."""
    config = {**SERVER, "table": table, "progress_key": progress_key}
    return MySqlSink(
        MySqlSink.Config.model_validate(config), RecordingContext(step)
    ).stage


def batch(ids: range) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"id": pa.array(list(ids), pa.int64()), "v": [f"v{i}" for i in ids]}
    )


def test_staged_sink_publishes_once(
    db: pymysql.connections.Connection[Any], name: str, cleanup: list[str]
) -> None:
    key = f"eo-{name}"
    cleanup += [
        f"DROP TABLE IF EXISTS {name}",
        f"DELETE FROM dataflare_progress WHERE sink = '{key}'",
    ]
    first = sink(name, progress_key=key)
    cleanup.append(f"DROP TABLE IF EXISTS {first.stage}")
    first.write(batch(range(0, 3)))
    first.prepare_commit(1)
    first.commit(1)
    first.write(batch(range(3, 6)))
    state2 = first.prepare_commit(2)
    first.write(batch(range(6, 9)))  # after checkpoint 2: must vanish
    first.close()

    second = sink(name, progress_key=key)
    second.restore(state2, 2)
    after_restore = [r[0] for r in rows(db, name)]
    second.write(batch(range(6, 9)))
    second.prepare_commit(3)
    second.commit(3)
    second.close()

    assert after_restore == list(range(6))
    assert [r[0] for r in rows(db, name)] == list(range(9))
    assert run(
        db, "SELECT checkpoint_id FROM dataflare_progress WHERE sink = %s", [key]
    ) == [(3,)]


def test_upsert_keeps_last_change(
    db: pymysql.connections.Connection[Any], name: str, cleanup: list[str]
) -> None:
    cleanup.append(f"DROP TABLE IF EXISTS {name}")
    changes = pa.table(
        {
            "id": [1, 2, 1, 3, 2, 3],
            "v": ["a", "b", "a2", "c", None, "c2"],
            "_op": ["insert", "insert", "update", "insert", "delete", "update"],
        }
    )
    p = Pipeline("mysql-upsert").use_registry(registry())
    data = p.source("data", "memory", records=changes, batch_rows=4)
    p.destination(
        "write",
        "mysql",
        [data],
        table=name,
        key=["id"],
        mode="upsert",
        op_field="_op",
        **SERVER,
    )
    p.run()

    assert rows(db, name) == [(1, "a2"), (3, "c2")]


# --- server restart ---------------------------------------------------------------


def restart_server() -> None:
    """Kill mariadbd and start it again, as `.ci/run` does."""
    pids = subprocess.run(
        ["pidof", "mariadbd"], capture_output=True, text=True
    ).stdout.split()
    for pid in pids:
        os.kill(int(pid), 15)
    deadline = time.monotonic() + 60
    while subprocess.run(["pidof", "mariadbd"], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            raise AssertionError("mariadbd did not stop")
        time.sleep(0.2)
    subprocess.run(
        [
            "start-stop-daemon",
            "--start",
            "--oknodo",
            "--background",
            "--exec",
            "/usr/sbin/mariadbd",
        ],
        check=True,
        timeout=60,
    )
    wait_for_server()


def wait_until(check: Callable[[], bool], what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.1)


def test_incremental_and_sink_survive_restart(
    db: pymysql.connections.Connection[Any],
    name: str,
    cleanup: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    source_table, target = f"{name}_src", f"{name}_dst"
    key = f"rs-{name}"
    cleanup += [
        f"DROP TABLE IF EXISTS {source_table}",
        f"DROP TABLE IF EXISTS {target}",
        f"DELETE FROM dataflare_progress WHERE sink = '{key}'",
        f"DROP TABLE IF EXISTS {stage_of(target, 'write', key)}",
    ]
    run(db, f"CREATE TABLE {source_table} (id BIGINT PRIMARY KEY, v TEXT)")
    values = ", ".join(f"({i}, 'v{i}')" for i in range(1, 2001))
    run(db, f"INSERT INTO {source_table} VALUES {values}")
    p = Pipeline(f"mysql-restart-{name}").use_registry(registry())
    read = p.source(
        "read",
        "mysql",
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
        "mysql",
        [read],
        table=target,
        key=["id"],
        progress_key=key,
        reconnect_for="2m",
        **SERVER,
    )
    p._data["checkpointing"] = {"interval": "100ms", "storage": str(tmp_path / "chk")}
    pipeline_run = PipelineRun(p.build())
    errors: list[BaseException] = []

    def main() -> None:
        try:
            pipeline_run.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()

    def count() -> int:
        assert not errors, errors
        try:
            return int(run(connect(), f"SELECT COUNT(*) FROM {target}")[0][0])
        except pymysql.err.ProgrammingError:
            return 0

    try:
        wait_until(lambda: count() == 2000, "first rows")
        restart_server()
        values = ", ".join(f"({i}, 'v{i}')" for i in range(2001, 4001))
        run(connect(), f"INSERT INTO {source_table} VALUES {values}")
        wait_until(lambda: count() == 4000, "rows after restart")
    finally:
        pipeline_run.stop()
        thread.join(120)
    conn = connect()
    assert not errors, errors
    assert rows(conn, target) == rows(conn, source_table)
    assert "reconnecting" in caplog.text

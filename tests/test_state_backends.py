"""Tests of the state backends: memory, RocksDB (`disk`) and SQLite."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataflare.state.backends import (
    StateBackend,
    StateBackendError,
    StateBackendSettings,
    create_backend,
    settings_of,
)
from dataflare.state.backends.memory import MemoryBackend
from dataflare.state.backends.rocksdb import RocksDbBackend

KINDS = ["memory", "rocksdb", "sqlite"]


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateBackend]:
    opened = create_backend(StateBackendSettings(request.param, str(tmp_path)), "t")
    yield opened
    opened.close()


def entries(backend: StateBackend) -> dict[tuple[str, bytes, bytes], bytes]:
    return {
        (table, key, sub): value
        for table in backend.tables()
        for key, sub, value in backend.scan(table)
    }


def test_put_get_delete(backend: StateBackend) -> None:
    backend.put("t", b"a", b"1")
    backend.put("t", b"a", b"2")
    backend.put("other", b"a", b"3")

    assert backend.get("t", b"a") == b"2"
    assert backend.get("other", b"a") == b"3"
    assert backend.get("t", b"missing") is None
    backend.delete("t", b"a")
    backend.delete("t", b"never there")
    assert backend.get("t", b"a") is None
    assert backend.get("other", b"a") == b"3"


def test_get_many_keeps_order(backend: StateBackend) -> None:
    backend.put_many("t", [(b"k%d" % i, b"", b"v%d" % i) for i in range(1200)])

    keys = [b"k5", b"nope", b"k1199", b"k5", b"k0"]

    assert backend.get_many("t", keys) == [b"v5", None, b"v1199", b"v5", b"v0"]
    assert backend.get_many("t", []) == []


def test_scan_of_one_key_reads_only_its_entries(backend: StateBackend) -> None:
    backend.put("m", b"a", b"plain")
    backend.put_many("m", [(b"a", b"\x00x", b"1"), (b"a", b"\x00y", b"2")])
    # Keys that start with the same bytes must stay apart.
    backend.put_many("m", [(b"ab", b"\x00x", b"3"), (b"", b"\x00z", b"4")])

    found = sorted(backend.scan("m", b"a"))

    assert found == [
        (b"a", b"", b"plain"),
        (b"a", b"\x00x", b"1"),
        (b"a", b"\x00y", b"2"),
    ]
    assert sorted(backend.scan("m", b"")) == [(b"", b"\x00z", b"4")]
    assert len(list(backend.scan("m"))) == 5


def test_delete_key_removes_every_sub_key(backend: StateBackend) -> None:
    backend.put_many("m", [(b"a", b"\x00x", b"1"), (b"a", b"\x00y", b"2")])
    backend.put("m", b"b", b"3", b"\x00x")

    backend.delete_key("m", b"a")
    backend.delete_many("m", [(b"b", b"\x00x"), (b"b", b"\x00missing")])

    assert list(backend.scan("m")) == []


def test_clear_empties_every_table(backend: StateBackend) -> None:
    backend.put("a", b"k", b"v")
    backend.put("b", b"k", b"v", b"\x00s")

    backend.clear()

    assert entries(backend) == {}
    assert backend.get("a", b"k") is None


def test_random_operations_match_a_dict(backend: StateBackend) -> None:
    rng = random.Random(7)
    model: dict[tuple[str, bytes, bytes], bytes] = {}
    for _ in range(3000):
        table = rng.choice(["x", "y"])
        key = b"k%d" % rng.randrange(50)
        sub = rng.choice([b"", b"\x00a", b"\x00b"])
        if rng.random() < 0.7:
            value = b"%d" % rng.randrange(10**6)
            backend.put(table, key, value, sub)
            model[(table, key, sub)] = value
        else:
            backend.delete(table, key, sub)
            model.pop((table, key, sub), None)

    assert entries(backend) == model


@pytest.mark.parametrize("source", KINDS)
@pytest.mark.parametrize("target", KINDS)
def test_snapshot_restores_into_any_backend(
    source: Any, target: Any, tmp_path: Path
) -> None:
    first = create_backend(StateBackendSettings(source, str(tmp_path)), "a")
    second = create_backend(StateBackendSettings(target, str(tmp_path)), "b")
    # More entries than one snapshot chunk (65,536 rows), in two tables.
    first.put_many("big", [(b"%06d" % i, b"", b"v%d" % i) for i in range(70_000)])
    first.put_many("map", [(b"k", b"\x00%d" % i, b"%d" % i) for i in range(10)])
    second.put("stale", b"k", b"left over")

    second.restore(first.snapshot())

    assert entries(second) == entries(first)
    assert second.get("stale", b"k") is None
    first.close()
    second.close()


def test_restore_of_garbage_fails(backend: StateBackend) -> None:
    with pytest.raises(StateBackendError) as caught:
        backend.restore(b"not a snapshot")

    assert "not an Arrow IPC stream" in str(caught.value)


def test_empty_snapshot_restores_empty(backend: StateBackend) -> None:
    other = MemoryBackend()
    other.put("t", b"k", b"v")

    other.restore(backend.snapshot())

    assert entries(other) == {}


@pytest.mark.parametrize("kind", ["rocksdb", "sqlite", "disk"])
def test_disk_backend_deletes_its_folder(kind: Any, tmp_path: Path) -> None:
    backend = create_backend(StateBackendSettings(kind, str(tmp_path / "state")), "s-0")
    backend.put("t", b"k", b"v")
    folders = list((tmp_path / "state").iterdir())

    backend.close()

    assert [f.name.startswith("s-0-") for f in folders] == [True]
    assert list((tmp_path / "state").iterdir()) == []


def test_disk_means_rocksdb(tmp_path: Path) -> None:
    backend = create_backend(StateBackendSettings("disk", str(tmp_path)), "x")

    assert isinstance(backend, RocksDbBackend)
    backend.close()


def test_unknown_backend_is_an_error() -> None:
    with pytest.raises(StateBackendError) as caught:
        create_backend(StateBackendSettings("tape"), "x")  # type: ignore[arg-type]

    assert "unknown state backend 'tape'" in str(caught.value)


def test_settings_of_context_defaults_to_memory() -> None:
    class Context:
        state_backend = StateBackendSettings("disk", "/tmp/x")

    assert settings_of(object()) == StateBackendSettings("memory", None)
    assert settings_of(Context()) == StateBackendSettings("disk", "/tmp/x")

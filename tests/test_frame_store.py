"""`FrameStore`: frames per slot in keyed state, on both backends."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from dataflare.state.backends import StateBackendSettings, create_backend
from dataflare.state.frames import FrameStore
from dataflare.state.keyed import JSON, KeyedStateStore

BACKENDS = ["memory", "disk"]


def open_store(kind: str, folder: Path) -> FrameStore:
    settings = StateBackendSettings(kind, str(folder))  # type: ignore[arg-type]
    return FrameStore(KeyedStateStore(create_backend(settings, "frames-0")))


def frame(*values: int) -> pa.Table:
    return pa.table(
        {
            "v": pa.array(list(values), pa.int64()),
            "s": pa.array([str(v) for v in values], pa.string()),
        }
    )


def values(frames: list[pa.Table]) -> list[list[int]]:
    return [f["v"].to_pylist() for f in frames]


@pytest.mark.parametrize("kind", BACKENDS)
def test_pop_returns_frames_in_arrival_order(tmp_path: Path, kind: str) -> None:
    store = open_store(kind, tmp_path)

    store.add([(10, frame(1)), (20, frame(2)), (10, frame(3, 4))])
    store.add([(10, frame(5)), (30, frame())])
    counts = dict(store.slots)
    first = store.pop(10)
    again = store.pop(10)
    store.close()

    assert counts == {10: 3, 20: 1}  # the empty frame is not kept
    assert values(first) == [[1], [3, 4], [5]]
    assert first[1]["s"].to_pylist() == ["3", "4"]
    assert again == []


@pytest.mark.parametrize("saved_in", BACKENDS)
@pytest.mark.parametrize("restored_in", BACKENDS)
def test_snapshot_restores_slots_and_extra_frames(
    tmp_path: Path, saved_in: str, restored_in: str
) -> None:
    first = open_store(saved_in, tmp_path / "a")
    first.add([(1, frame(1)), (2, frame(2)), (1, frame(3))])

    data = first.snapshot({"watermark": 7}, {99: [frame(8), frame(9)], 98: []})
    kept = dict(first.slots)
    still_there = values(first.pop(1))
    first.close()
    second = open_store(restored_in, tmp_path / "b")
    meta = second.restore(data)
    slots = dict(second.slots)
    restored = {slot: values(second.pop(slot)) for slot in (1, 2, 99)}
    second.add([(2, frame(4))])
    after = values(second.pop(2))
    second.close()

    assert meta == {"watermark": 7}
    assert kept == {1: 2, 2: 1}  # the extra frames stay out of the store
    assert still_there == [[1], [3]]
    assert slots == {1: 2, 2: 1, 99: 2}
    assert restored == {1: [[1], [3]], 2: [[2]], 99: [[8], [9]]}
    assert after == [[4]]


def test_extra_frames_may_not_use_a_held_slot(tmp_path: Path) -> None:
    store = open_store("memory", tmp_path)
    store.add([(1, frame(1))])

    with pytest.raises(ValueError, match=r"slots \[1\]"):
        store.snapshot({}, {1: [frame(2)]})
    store.close()


def test_restore_rejects_other_state(tmp_path: Path) -> None:
    other = KeyedStateStore()
    other.value_state("counts", JSON).put(b"k", 1)
    data = other.snapshot()
    store = open_store("memory", tmp_path)

    with pytest.raises(ValueError, match="missing its metadata"):
        store.restore(data)
    store.close()

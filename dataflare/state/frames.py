"""Arrow tables (frames) in keyed state, in lists under 64-bit integer slots.

A `FrameStore` keeps, for each slot (a window start, for example), the
frames added to it in arrival order. With the memory backend the frames
stay in Python as they are, and `snapshot` encodes them as Arrow IPC only
for a checkpoint, so buffering costs no encoding. With an on-disk backend
each frame is written there as Arrow IPC when it is added and read back when
its slot is taken, so the frames may hold more records than fit in memory.
Either backend restores a snapshot of the other.

In the backend the map state `frames` maps each slot (the key) to its
frames: a sequence number (the map key, so frames stay in arrival order)
and the frame as an Arrow IPC stream. The value state `meta` contains the
slots, the next sequence number and the caller's own metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from dataflare.state.keyed import BYTES, INT64, JSON, KeyedStateStore


class FrameStore:
    """Frames per slot, in a keyed state store.

    Args:
        store: The operator's keyed state. The frame store owns it and
            closes it in `close`.
    """

    def __init__(self, store: KeyedStateStore) -> None:
        self.store = store
        self._spill = store.backend.kind != "memory"
        self._map = store.map_state("frames", INT64, BYTES)
        self._meta = store.value_state("meta", JSON)
        self._frames: dict[int, list[pa.Table]] = {}  # memory backend only
        self._counts: dict[int, int] = {}  # frames per slot that has any
        self._next = 0  # sequence number of the next frame on disk

    @property
    def slots(self) -> Mapping[int, int]:
        """Number of frames of each slot that has any."""
        return self._counts

    def add(self, parts: Iterable[tuple[int, pa.Table]]) -> None:
        """Append each frame to its slot."""
        parts = [(slot, frame) for slot, frame in parts if frame.num_rows]
        for slot, _ in parts:
            self._counts[slot] = self._counts.get(slot, 0) + 1
        if not self._spill:
            for slot, frame in parts:
                self._frames.setdefault(slot, []).append(frame)
            return
        self._map.put_many(
            (INT64.encode(slot), seq, _encode(frame))
            for seq, (slot, frame) in enumerate(parts, self._next)
        )
        self._next += len(parts)

    def pop(self, slot: int) -> list[pa.Table]:
        """Remove and return the frames of `slot`, in arrival order."""
        self._counts.pop(slot, None)
        if not self._spill:
            return self._frames.pop(slot, [])
        return self._read(slot)

    def _read(self, slot: int) -> list[pa.Table]:
        """Remove and return the frames of `slot` that are in the backend."""
        key = INT64.encode(slot)
        entries = sorted(self._map.items(key))
        self._map.clear(key)
        return [_decode(data) for _, data in entries]

    def snapshot(
        self, meta: dict[str, Any], extra: Mapping[int, Sequence[pa.Table]]
    ) -> bytes:
        """Return the store for a checkpoint, with `meta` and `extra` frames.

        `extra` maps slots that the store does not use to frames that the
        caller keeps elsewhere. They are in the snapshot only, and `restore`
        brings them back as ordinary slots.
        """
        clash = sorted(set(extra) & set(self._counts))
        if clash:
            raise ValueError(
                f"extra frames use slots {clash}, which the store already uses; "
                "pass them under other slots"
            )
        saved = {slot: list(frames) for slot, frames in extra.items() if frames}
        if not self._spill:
            saved = {**self._frames, **saved}
        entries: list[tuple[bytes, int, bytes]] = []
        for slot, frames in saved.items():
            key = INT64.encode(slot)
            for frame in frames:
                entries.append((key, self._next + len(entries), _encode(frame)))
        # A disk backend that restores this snapshot numbers new frames after these.
        self._meta.put(
            b"",
            {
                "caller": meta,
                "slots": sorted({*self._counts, *saved}),
                "next": self._next + len(entries),
            },
        )
        self._map.put_many(entries)
        try:
            return self.store.snapshot()
        finally:
            # The backend keeps only what it held before: nothing with the
            # memory backend, the slots' own frames with a disk backend.
            for slot in saved if not self._spill else extra:
                self._map.clear(INT64.encode(slot))

    def restore(self, state: bytes) -> dict[str, Any]:
        """Load a `snapshot` and return the metadata that was given to it.

        Raises:
            ValueError: the snapshot has no frame store metadata.
        """
        self.store.restore(state)
        meta = self._meta.get(b"")
        if not isinstance(meta, dict) or "caller" not in meta:
            raise ValueError(
                "the frame state snapshot is missing its metadata, so the "
                "checkpoint is corrupt or was written by an older version; resume "
                "from an earlier checkpoint or run with --from-scratch"
            )
        self._next = int(meta["next"])
        self._frames = {}
        self._counts = {}
        for slot in meta["slots"]:
            count = self._map.size(INT64.encode(slot))
            if not count:
                continue
            self._counts[slot] = count
            if not self._spill:
                self._frames[slot] = self._read(slot)
        caller: dict[str, Any] = meta["caller"]
        return caller

    def close(self) -> None:
        """Release the backend (a disk backend deletes its working files)."""
        self.store.close()


def _encode(frame: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, frame.schema) as writer:
        writer.write_table(frame)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def _decode(data: bytes) -> pa.Table:
    frame: pa.Table = pa.ipc.open_stream(data).read_all()
    return frame

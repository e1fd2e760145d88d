"""State backends: where operators keep keyed state between checkpoints.

- `memory` (default): Python dictionaries; fastest, limited by memory.
- `disk`: RocksDB files in `state_dir`, for state larger than memory.
  RocksDB was chosen over SQLite by measurement (`bench/checkpoints.py
  backends`; numbers in docs/checkpoints.md).

Every backend snapshots to the same format, so a checkpoint taken with one
backend restores into the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dataflare.state.backends.base import (
    StateBackend,
    StateBackendError,
    read_snapshot,
    write_snapshot,
)
from dataflare.state.backends.memory import MemoryBackend

BackendKind = Literal["memory", "disk", "rocksdb", "sqlite"]

__all__ = [
    "BackendKind",
    "MemoryBackend",
    "StateBackend",
    "StateBackendError",
    "StateBackendSettings",
    "create_backend",
    "read_snapshot",
    "settings_of",
    "write_snapshot",
]


@dataclass(frozen=True)
class StateBackendSettings:
    """Backend kind of an operator's keyed state, and the folder of disk files."""

    kind: BackendKind = "memory"
    """`memory`, or `disk` (RocksDB). `rocksdb` and `sqlite` name a disk
    backend directly; `sqlite` is kept for comparison benchmarks."""
    directory: str | None = None
    """Folder for the working files of disk backends; the system temp
    folder if None. Each operator instance makes its own folder in it."""


def create_backend(settings: StateBackendSettings, label: str) -> StateBackend:
    """Open a new, empty backend.

    Args:
        settings: Backend kind and folder.
        label: Name of the working folder of disk backends, for example
            `dedupe-0` (step and instance).

    Raises:
        StateBackendError: the backend cannot be created; the message gives
            the cause.
    """
    if settings.kind == "memory":
        return MemoryBackend()
    if settings.kind in ("disk", "rocksdb"):
        from dataflare.state.backends.rocksdb import RocksDbBackend

        return RocksDbBackend(settings.directory, label)
    if settings.kind == "sqlite":
        from dataflare.state.backends.sqlite import SqliteBackend

        return SqliteBackend(settings.directory, label)
    raise StateBackendError(
        f"unknown state backend {settings.kind!r}; use memory or disk"
    )


def settings_of(context: Any) -> StateBackendSettings:
    """Return the backend settings the engine gives an operator's context.

    The engine sets them from the pipeline's `checkpointing.state_backend`
    and `checkpointing.state_dir` as a `state_backend` attribute of the
    context. A context without it (tests, older engines) gets the memory
    backend.
    """
    settings = getattr(context, "state_backend", None)
    if isinstance(settings, StateBackendSettings):
        return settings
    return StateBackendSettings()

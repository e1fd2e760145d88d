"""Shared fixtures: a recording operator context and pipeline helpers."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest

# Tests start without cached plans, in this process and the runs it starts;
# the plan cache tests give their own directory.
os.environ["DATAFLARE_CACHE_DIR"] = ""


class RecordingContext:
    """An `OperatorContext` that keeps what a plugin rejects and counts."""

    def __init__(self, step: str = "step", *, stopping: bool = False) -> None:
        self.step = step
        self.instance = 0
        self.parallelism = 1
        self.logger = logging.getLogger(f"dataflare.test.{step}")
        self.stopping = stopping
        self.checkpointing = False
        self.pipeline_id = "test"
        self.rejected: list[tuple[Any, str, str | None]] = []
        self.side: dict[str, list[pa.RecordBatch]] = {}
        self.counters: dict[str, int] = {}

    def reject(self, records: Any, reasons: Any, positions: Any = None) -> None:
        rows = (
            records.to_pylist()
            if isinstance(records, pa.RecordBatch)
            else list(records)
        )
        if isinstance(reasons, str):
            reasons = [reasons] * len(rows)
        for i, row in enumerate(rows):
            self.rejected.append((row, reasons[i], positions[i] if positions else None))

    def emit_side(self, port: str, batch: pa.RecordBatch) -> None:
        self.side.setdefault(port, []).append(batch)

    def count(self, name: str, value: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value


@pytest.fixture
def context() -> RecordingContext:
    return RecordingContext()


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    """Undo the `gc.freeze` of a `dataflare run` invoked in this process."""
    yield
    gc.unfreeze()
    gc.enable()

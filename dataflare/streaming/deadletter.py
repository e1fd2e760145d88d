"""The dead-letter output: one JSON line per rejected record.

Each line has the pipeline id, the step that rejected the record, the
reason, the input position where the source knows it
(`flights.csv record 17 (line 18)`, `events.jsonl line 3`), the record (an
object for parsed records, the raw text otherwise) and the wall-clock time
of rejection. The file is created
on the first rejection only, so a clean run leaves no empty file behind.

Numbers in a record are written exactly: a `JsonNumber` as its text in the
input, and integers of any size in full.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa

from dataflare.streaming.exactjson import dumps_exact


class DeadLetterWriter:
    def __init__(self, path: str | Path, pipeline_id: str) -> None:
        self.path = Path(path)
        self.pipeline_id = pipeline_id
        self.count = 0
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()

    def write(
        self,
        step: str,
        records: pa.RecordBatch | Sequence[Any],
        reasons: str | Sequence[str],
        positions: Sequence[str | None] | None,
    ) -> int:
        rows = (
            _python_rows(records)
            if isinstance(records, pa.RecordBatch)
            else list(records)
        )
        if isinstance(reasons, str):
            reasons = [reasons] * len(rows)
        now = dt.datetime.now(dt.UTC).isoformat()
        lines = []
        for i, row in enumerate(rows):
            entry = {
                "pipeline": self.pipeline_id,
                "step": step,
                "reason": reasons[i],
                "position": positions[i] if positions is not None else None,
                "record": row,
                "rejected_at": now,
            }
            lines.append(dumps_exact(entry, option=orjson.OPT_NON_STR_KEYS))
        with self._lock:
            if self._file is None:
                self._file = self._open()
            self._file.write(b"\n".join(lines) + b"\n")
            self.count += len(rows)
        return len(rows)

    def _open(self) -> IO[bytes]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self.path.open("ab")
        except OSError as exc:
            raise OSError(
                f"failed to open the dead-letter file {self.path} "
                f"(errors.dead_letter.path): {exc.strerror or exc}; give a path "
                "in a folder that the run can write"
            ) from exc

    def sync(self) -> None:
        """Write the records rejected so far to disk (flush and fsync)."""
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _python_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """Return the records as dicts, even with values Python cannot represent.

    A timestamp or date beyond Python's years 1 to 9999 stays its stored
    integer (units since 1970, in the column's unit), since Python has no
    datetime for it and Arrow's text for it is not a valid time.
    """
    try:
        rows: list[dict[str, Any]] = batch.to_pylist()
        return rows
    except (OverflowError, ValueError):
        pass
    columns = []
    for column in batch.columns:
        try:
            columns.append(column.to_pylist())
        except (OverflowError, ValueError):
            stored = pa.int64() if column.type.bit_width == 64 else pa.int32()
            columns.append(column.view(stored).to_pylist())
    names = batch.schema.names
    return [
        dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)
    ]

"""What every file sink shares: one file, or rolling files in a directory.

Without rolling, `path` is the output file. With `roll_bytes` or
`roll_interval`, `path` is a directory and the sink writes `part-00000.ext`,
`part-00001.ext`, ... starting a new file when the current one reaches the
size or the age. A file is written under a `.inprogress` name and renamed
when complete, so readers never see a half-written file.
"""

from __future__ import annotations

import os
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, Generic, TypeVar

import pyarrow as pa
from pydantic import Field

from dataflare.plugin.interface import Sink, SinkConfig, SinkInfo
from dataflare.streaming.spec import Duration

IN_PROGRESS = ".inprogress"


class FileSinkConfig(SinkConfig):
    path: str = Field(description="Output file; a directory when rolling")
    roll_bytes: int | None = Field(None, ge=1, description="Start a new file after "
                                   "this many bytes")
    roll_interval: Duration | None = Field(None, description="Start a new file after "
                                           "this long")
    overwrite: bool = Field(True, description="Replace existing output; if false, "
                            "an existing output file is an error")


ConfigT = TypeVar("ConfigT", bound=FileSinkConfig)


class FileSink(Sink[ConfigT], Generic[ConfigT]):
    extension: str = ""

    @property
    def rolling(self) -> bool:
        return self.config.roll_bytes is not None or self.config.roll_interval is not None

    def open(self) -> None:
        self._writer: Any = None
        self._current: Path | None = None
        self._opened_at = 0.0
        self._part = 0
        self._written: list[str] = []
        self._schema: pa.Schema | None = None
        target = Path(self.config.path)
        if self.rolling:
            target.mkdir(parents=True, exist_ok=True)
            if self.config.overwrite:
                for old in target.glob(f"part-*{self.extension}"):
                    old.unlink()
        else:
            if target.exists() and not self.config.overwrite:
                raise FileExistsError(
                    f"output file {target} exists and overwrite is false; remove it "
                    "or set overwrite: true")
            target.parent.mkdir(parents=True, exist_ok=True)

    @abstractmethod
    def _open_writer(self, path: Path, schema: pa.Schema) -> Any:
        """Open a format writer on `path` with `write(batch)` and `close()`."""

    def _write_batch(self, writer: Any, batch: pa.RecordBatch) -> None:
        writer.write(batch)

    def write(self, batch: pa.RecordBatch) -> None:
        if self._schema is None:
            self._schema = batch.schema
        elif batch.schema != self._schema:
            batch = batch.cast(self._schema)
        if self._writer is None:
            self._start_file(batch.schema)
        self._write_batch(self._writer, batch)
        if self._should_roll():
            self._finish_file()

    def _start_file(self, schema: pa.Schema) -> None:
        if self.rolling:
            final = Path(self.config.path) / f"part-{self._part:05d}{self.extension}"
            self._part += 1
        else:
            final = Path(self.config.path)
        self._current = final
        self._writer = self._open_writer(_in_progress(final), schema)
        self._opened_at = time.monotonic()

    def _should_roll(self) -> bool:
        if not self.rolling or self._current is None:
            return False
        if self.config.roll_bytes is not None:
            size = os.path.getsize(_in_progress(self._current))
            if size >= self.config.roll_bytes:
                return True
        interval = self.config.roll_interval
        return interval is not None and (
            time.monotonic() - self._opened_at >= interval.total_seconds())

    def _finish_file(self) -> None:
        if self._writer is None or self._current is None:
            return
        self._writer.close()
        os.replace(_in_progress(self._current), self._current)
        self._written.append(str(self._current))
        self._writer = None
        self._current = None

    def flush(self) -> None:
        if self._writer is None and not self._written and not self.rolling:
            # No records arrived: still leave a valid, empty output file.
            schema = self._schema or self.input_schema
            if schema is not None:
                self._start_file(schema)
        self._finish_file()

    def close(self) -> None:
        if self._writer is not None and self._current is not None:
            # Closed without flush: the run failed, so leave no partial file.
            self._writer.close()
            _in_progress(self._current).unlink(missing_ok=True)
            self._writer = None

    def info(self) -> SinkInfo:
        return SinkInfo(paths=list(self._written), delivery="at-least-once")


def _in_progress(path: Path) -> Path:
    return path.with_name(path.name + IN_PROGRESS)

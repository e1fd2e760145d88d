"""What every file sink shares: one file, or rolling files in a directory.

Without rolling, `path` is the output file. With `roll_bytes` or
`roll_interval`, `path` is a directory and the sink writes `part-00000.ext`,
`part-00001.ext`, ... starting a new file when the current one reaches the
size or the age. The age is also checked by a timer thread, so a file is
closed on time while no records arrive. A file is written under a
`.inprogress` name, synced to disk and renamed when complete, so readers
never see a half-written file.

When no record arrives, the sink still writes one valid, empty file (a
header only, for CSV) with the schema of the records it would have
received. With `overwrite: false`, an existing output is an error, found
when the sink opens and checked again at the final rename.

Exactly once, when the pipeline takes checkpoints: `path` is a directory
and every checkpoint closes the current part file. Closed files wait under a
hidden `.part-NNNNNN.ext.pending` name until the checkpoint is complete,
then are renamed to `part-NNNNNN.ext`. After a crash, the run resumes from
the last complete checkpoint: pending files it lists are published, and
every other hidden file (written after it) is deleted, so the visible files
hold each record exactly once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import abstractmethod
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

import pyarrow as pa
from pydantic import Field, field_validator

from dataflare.connectors.files.writeback import Writeback
from dataflare.plugin.interface import Sink, SinkConfig, SinkInfo
from dataflare.state.checkpoint import FINAL_CHECKPOINT
from dataflare.state.faults import crash_point
from dataflare.streaming.spec import Duration

logger = logging.getLogger(__name__)

IN_PROGRESS = ".inprogress"
PENDING = ".pending"
PART_PREFIX = "part-"
AGE_CHECK_MAX_SECONDS = 1.0
"""Maximum wait between two age checks of an idle part file (`roll_interval`)."""
AGE_CHECK_MIN_SECONDS = 0.01
"""Minimum wait between two age checks, so that a tiny interval does not spin."""


class FileSinkConfig(SinkConfig):
    path: str = Field(description="Output file; a directory when rolling")
    roll_bytes: int | None = Field(
        None,
        ge=1,
        description="Start a new file once the current one has this many bytes",
    )
    roll_interval: Duration | None = Field(
        None, description="Start a new file once the current one is this old"
    )
    overwrite: bool = Field(
        True,
        description="Replace existing output; if false, an existing output file "
        "(or part file, when rolling) is an error",
    )

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "is empty; name the output file, such as out/result.jsonl "
                "(a folder when roll_bytes or roll_interval is set)"
            )
        return value

    @field_validator("roll_bytes", mode="before")
    @classmethod
    def _positive_size(cls, value: Any) -> Any:
        if _is_number(value) and value <= 0:
            raise ValueError(
                "roll_bytes must be a positive number of bytes; set the size at "
                "which a new part file starts, for example 100000000 for about "
                "100 MB, or remove roll_bytes to write one file"
            )
        return value

    @field_validator("roll_interval", mode="before")
    @classmethod
    def _interval_not_negative(cls, value: Any) -> Any:
        # Checked before parsing, which rejects "-1s" as an invalid duration.
        text = value.strip() if isinstance(value, str) else ""
        if text.startswith("-") or (_is_number(value) and value < 0):
            raise ValueError(_ROLL_INTERVAL_ERROR)
        return value

    @field_validator("roll_interval")
    @classmethod
    def _positive_interval(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError(_ROLL_INTERVAL_ERROR)
        return value


_ROLL_INTERVAL_ERROR = (
    "roll_interval must be longer than zero; set the age at which a new part "
    "file starts, for example 1h or 30s, or remove roll_interval to write one file"
)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


ConfigT = TypeVar("ConfigT", bound=FileSinkConfig)


class FileSink(Sink[ConfigT], Generic[ConfigT]):
    """Base of file sinks; a format implements `_open_writer`."""

    extension: str = ""
    same_fields = True

    @property
    def rolling(self) -> bool:
        return (
            self.config.roll_bytes is not None or self.config.roll_interval is not None
        )

    def check_schema(self, schema: pa.Schema) -> None:
        """Raise ValueError if the format cannot hold records of `schema`."""

    @abstractmethod
    def _open_writer(self, path: Path, schema: pa.Schema) -> Any:
        """Open a format writer on `path` with `write(batch)` and `close()`."""

    def _write_batch(self, writer: Any, batch: pa.RecordBatch) -> None:
        writer.write(batch)

    def _bytes_written(self, path: Path) -> int:
        """Return the size of the file being written, for `roll_bytes`.

        The size on disk; a format whose writer buffers (Parquet row groups)
        may return a better estimate.
        """
        return os.path.getsize(path)

    # --- lifecycle ---

    def open(self) -> None:
        self._staged: list[tuple[int, list[str]]] = []  # (checkpoint, file names)
        self._started = False
        self._writer: Any = None
        self._writeback: Writeback | None = None
        self._current: Path | None = None
        self._opened_at = 0.0
        self._part = 0
        self._written: list[str] = []
        self._made_folders: list[Path] = []  # deepest first
        self._schema: pa.Schema | None = self.input_schema
        # The age timer closes files from its own thread: it and the sink's
        # thread change the open file only while holding this lock.
        self._lock = threading.Lock()
        self._age_timer: _AgeTimer | None = None
        self._timer_error: BaseException | None = None
        if self._schema is not None:
            self.check_schema(self._schema)
        target = Path(self.config.path)
        if self.transactional:
            return  # prepared on first use, after a possible `restore`
        self._started = True
        if self.rolling:
            self._prepare_directory(target)
        else:
            self._prepare_file(target)
        interval = self.config.roll_interval
        if interval is not None:
            self._age_timer = _AgeTimer(self, interval.total_seconds())
            self._age_timer.start()

    def _prepare_file(self, target: Path) -> None:
        missing = _folders_to_make(target.parent, target)
        if target.is_dir():
            raise IsADirectoryError(
                f"output path {target} is a directory; name a file, or set "
                "roll_bytes or roll_interval to write part files into it"
            )
        if target.exists() and not self.config.overwrite:
            raise FileExistsError(
                f"output file {target} exists and overwrite is false; remove it "
                "or set overwrite: true"
            )
        self._made_folders = missing
        target.parent.mkdir(parents=True, exist_ok=True)
        _in_progress(target).unlink(missing_ok=True)  # left by a failed run

    def _prepare_directory(self, target: Path) -> None:
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(
                f"output path {target} is a file, but rolling output (roll_bytes or "
                "roll_interval) needs a directory; name a directory"
            )
        self._made_folders = _folders_to_make(target, target)
        target.mkdir(parents=True, exist_ok=True)
        parts = sorted(target.glob(f"{PART_PREFIX}*{self.extension}"))
        if parts and not self.config.overwrite:
            raise FileExistsError(
                f"output directory {target} already has part files ({parts[0].name}, "
                "...) and overwrite is false; remove them or set overwrite: true"
            )
        leftovers = [
            *target.glob(f".{PART_PREFIX}*"),
            *target.glob(f"{PART_PREFIX}*{IN_PROGRESS}"),
        ]
        for old in [*parts, *leftovers]:
            old.unlink()

    def write(self, batch: pa.RecordBatch) -> None:
        with self._lock:
            self._raise_timer_error()
            self._write(batch)

    def _write(self, batch: pa.RecordBatch) -> None:
        self._start()
        if self._schema is None:
            self.check_schema(batch.schema)
            self._schema = batch.schema
        elif batch.schema != self._schema:
            batch = self._conform(batch)
        if not self.transactional and self._writer is not None and self._too_old():
            self._finish_file()
        if self._writer is None:
            self._start_file(self._schema)
        self._write_batch(self._writer, batch)
        if self._writeback is not None:
            self._writeback.advance()
        if self._should_roll():
            self._finish_file()

    def _conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        assert self._schema is not None
        if batch.schema.names != self._schema.names:
            raise ValueError(
                f"records with fields {batch.schema.names} reached a file sink that "
                f"writes fields {self._schema.names}; every record of one output "
                "must have the same fields"
            )
        try:
            return batch.cast(self._schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(
                f"records of schema {batch.schema} cannot be written as "
                f"{self._schema}: {exc}"
            ) from exc

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._prepare_directory(Path(self.config.path))

    def flush(self) -> None:
        if self.transactional:
            return  # output becomes visible through prepare_commit and commit
        with self._lock:
            self._raise_timer_error()
            self._flush()

    def _flush(self) -> None:
        if self._writer is None and not self._written:
            # No records arrived: still leave a valid, empty output file.
            if self._schema is not None:
                self._start_file(self._schema)
            else:
                logger.warning(
                    "no records and no schema: %s writes no file", self.config.path
                )
        self._finish_file()

    def close(self) -> None:
        if self._age_timer is not None:
            self._age_timer.stop()
            self._age_timer = None
        if self._writer is not None and self._current is not None:
            # Closed without flush: the run failed, so leave no partial file.
            self._close_writer()
            _in_progress(self._current).unlink(missing_ok=True)
            self._writer = None
            self._current = None
        if not self._written:
            # Nothing was published, so the folders made for it go too.
            _remove_empty(self._made_folders)

    def info(self) -> SinkInfo:
        delivery = "exactly-once" if self.transactional else "at-least-once"
        # The age timer publishes a file, then lists it, under the lock.
        with self._lock:
            return SinkInfo(paths=list(self._written), delivery=delivery)

    # --- exactly once ---

    def prepare_commit(self, checkpoint_id: int) -> Any:
        self._start()
        final = checkpoint_id == FINAL_CHECKPOINT
        nothing_yet = not self._written and not self._staged
        if final and self._writer is None and nothing_yet and self._schema is not None:
            self._start_file(
                self._schema
            )  # a valid empty output, as without checkpoints
        if self._writer is not None and self._current is not None:
            self._close_writer()
            temporary = _in_progress(self._current)
            _sync(temporary)
            os.replace(temporary, _pending(self._current))
            self._staged.append((checkpoint_id, [self._current.name]))
            self._writer = None
            self._current = None
        return {
            "next_part": self._part,
            "staged": [[tag, list(names)] for tag, names in self._staged],
        }

    def commit(self, checkpoint_id: int) -> None:
        directory = Path(self.config.path)
        keep = []
        for tag, names in self._staged:
            if tag > checkpoint_id:
                keep.append((tag, names))
                continue
            for name in names:
                pending = _pending(directory / name)
                if pending.exists():
                    os.replace(pending, directory / name)
                    crash_point("sink-commit")
                self._written.append(str(directory / name))
        self._staged = keep
        _sync(directory)

    def restore(self, state: Any, checkpoint_id: int) -> None:
        directory = Path(self.config.path)
        directory.mkdir(parents=True, exist_ok=True)
        self._started = True
        listed = set()
        if state:
            self._part = int(state["next_part"])
            for _, names in state["staged"]:
                for name in names:
                    listed.add(name)
                    pending = _pending(directory / name)
                    if pending.exists():
                        os.replace(pending, directory / name)
        for leftover in directory.glob(f".{PART_PREFIX}*"):
            leftover.unlink()  # written after the checkpoint: replayed anew
        self._written = [
            str(p) for p in sorted(directory.glob(f"{PART_PREFIX}*{self.extension}"))
        ]
        logger.info(
            "resumed %s at checkpoint %d: %d part files kept, %d published",
            directory,
            checkpoint_id,
            len(self._written),
            len(listed),
        )

    # --- files ---

    def _start_file(self, schema: pa.Schema) -> None:
        if self.transactional:
            name = f"{PART_PREFIX}{self._part:06d}{self.extension}"
            final = Path(self.config.path) / name
            self._part += 1
        elif self.rolling:
            name = f"{PART_PREFIX}{self._part:05d}{self.extension}"
            final = Path(self.config.path) / name
            self._part += 1
        else:
            final = Path(self.config.path)
        self._current = final
        self._writer = self._open_writer(_in_progress(final), schema)
        self._writeback = Writeback(_in_progress(final))
        self._opened_at = time.monotonic()

    def _close_writer(self) -> None:
        self._writer.close()
        if self._writeback is not None:
            self._writeback.close()
            self._writeback = None

    def _too_old(self) -> bool:
        interval = self.config.roll_interval
        return interval is not None and (
            time.monotonic() - self._opened_at >= interval.total_seconds()
        )

    def finish_old_file(self) -> None:
        """Close and publish the open part file if it is `roll_interval` old.

        Called by the age timer. An error is raised again by the next
        `write` or `flush`, on the sink's thread, so that it fails the run.
        """
        with self._lock:
            if self._writer is None or self._timer_error is not None:
                return
            if not self._too_old():
                return
            try:
                self._finish_file()
            except Exception as exc:
                logger.error(
                    "closing the part file of %s at roll_interval failed: %s; "
                    "the next write raises the error",
                    self.config.path,
                    exc,
                )
                self._timer_error = exc

    def _raise_timer_error(self) -> None:
        if self._timer_error is not None:
            raise self._timer_error

    def _should_roll(self) -> bool:
        if self.transactional:
            return False  # checkpoints close the part files
        if not self.rolling or self._current is None:
            return False
        limit = self.config.roll_bytes
        if (
            limit is not None
            and self._bytes_written(_in_progress(self._current)) >= limit
        ):
            return True
        return self._too_old()

    def _finish_file(self) -> None:
        if self._writer is None or self._current is None:
            return
        self._close_writer()
        temporary = _in_progress(self._current)
        _sync(temporary)
        if self.config.overwrite:
            os.replace(temporary, self._current)
        else:
            _publish_new(temporary, self._current)
        _sync(self._current.parent)
        self._written.append(str(self._current))
        self._writer = None
        self._current = None


class _AgeTimer(threading.Thread):
    """Thread that closes a sink's part file at `roll_interval` while input is idle.

    Sinks get no call from the engine while their input is idle, so the
    timer checks the age on its own thread, every `interval` but at least
    every `AGE_CHECK_MAX_SECONDS`.
    """

    def __init__(self, sink: FileSink[Any], interval: float) -> None:
        super().__init__(name=f"{sink.context.step}-roll-timer", daemon=True)
        self._sink = sink
        self._period = min(max(interval, AGE_CHECK_MIN_SECONDS), AGE_CHECK_MAX_SECONDS)
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self._period):
            self._sink.finish_old_file()

    def stop(self) -> None:
        self._stopped.set()
        if self is not threading.current_thread():
            self.join()


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders`, deepest first, up to the first one that is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            return


def _folders_to_make(folder: Path, target: Path) -> list[Path]:
    """Return the folders from `folder` up that do not exist, deepest first.

    Raises:
        NotADirectoryError: a file is where a folder for `target` must be.
    """
    missing = []
    for candidate in (folder.absolute(), *folder.absolute().parents):
        if not candidate.exists():
            missing.append(candidate)
        elif candidate.is_dir():
            break
        else:
            raise NotADirectoryError(
                f"output path {target} cannot be created: {candidate} is a file, "
                "not a folder; name a path in a folder"
            )
    return missing


def _publish_new(temporary: Path, final: Path) -> None:
    """Rename `temporary` to `final` unless `final` exists.

    Raises:
        FileExistsError: `final` exists; `temporary` is removed.
    """
    try:
        # A hard link fails if the target exists, where a rename would replace it.
        os.link(temporary, final)
    except FileExistsError:
        temporary.unlink(missing_ok=True)
        raise FileExistsError(
            f"output file {final} appeared while the run wrote it, and overwrite "
            "is false; the new output was removed"
        ) from None
    except OSError:
        # No hard links on this file system: check, then rename. Another
        # process could still create `final` in between.
        if final.exists():
            temporary.unlink(missing_ok=True)
            raise FileExistsError(
                f"output file {final} appeared while the run wrote it, and "
                "overwrite is false; the new output was removed"
            ) from None
        os.replace(temporary, final)
        return
    temporary.unlink()


def _in_progress(path: Path) -> Path:
    if path.name.startswith(PART_PREFIX):
        # Hidden while being written, so that readers globbing part-* skip it.
        return path.with_name("." + path.name + IN_PROGRESS)
    return path.with_name(path.name + IN_PROGRESS)


def _pending(path: Path) -> Path:
    return path.with_name("." + path.name + PENDING)


def _sync(path: Path) -> None:
    """Flush a file, or a directory entry, to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)

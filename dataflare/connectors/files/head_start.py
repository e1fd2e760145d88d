"""Parse the start of a JSON lines file while `dataflare run` is still loading.

Starting the command takes a few tenths of a second, nearly all of it
loading Arrow, pydantic and the engine, on one core. Meanwhile another core
can already parse the pipeline's input. So `dataflare run` starts a head
start for the first file that each `jsonl` source of the previous run read
from its beginning, where that run had the same pipeline file, parameters
and working directory. A native thread (`_jsonl_reader.HeadStart`, without
the GIL) reads and parses the file's first blocks, up to `LIMIT` bytes of
parsed columns. The source takes those blocks when it opens that file from its
start with the same fields and block size. It then reads on after them and
cuts the same blocks, so the results are the same as without a head start.
The source takes nothing if the file is another one or changed (device,
inode, modification time or size differ) or the run resumes from a
checkpoint. The command stops a head start that no source took once the
run reads records.

Which files to start on is kept in an entry of DataFlare's cache
(`dataflare.cache`), written by the command after a run. There is no head
start on one core (the thread would only take turns with the loading),
with the cache off (`DATAFLARE_CACHE_DIR` empty), or with
`DATAFLARE_HEAD_START=0`. The Python API does not start any: a program
that loads the engine once gains little.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dataflare
from dataflare.cache import entry_path, read_entry, write_entry

try:
    from dataflare.connectors.files import _jsonl_reader
except ImportError:  # built without simdjson
    _jsonl_reader = None  # type: ignore[assignment]

_LOG = logging.getLogger(__name__)

LIMIT = 20 << 20
"""Bytes of parsed columns a head start keeps at most, counted as the
memory their vectors hold.

Loading takes 0.3-0.5 s on the 2-core machines of the benchmarks. On the
faster of them, the native reader parses about 20 MB of columns of
`bench/pipelines/w1-stateless.yaml` in that time. Measured over 2,000,000
records against a limit of 12 MiB, 20 MiB took W1 on 2 cores from 0.92 s
to 0.89 s, and `bench/pipelines/w2-windowed.yaml` from 1.74 s to 1.65 s
(medians of 10 and 8 interleaved runs). Their peak memory rose from 138
to 141 MB and from 140 to 146 MB.
"""

MAX_FILES = 4
"""Files a run keeps hints of, the first of each source; they share `LIMIT`."""

_MAX_BLOCK = 1 << 30
_MAX_FIELDS = 1 << 16
"""Larger blocks or more fields than these in an entry mean it was damaged."""

_FORMAT = "1"
"""Version of the hint entry layout, part of its key."""

Fields = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Hint:
    """A file that a `jsonl` source read from its start, and how."""

    path: str
    fields: Fields
    block_size: int

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "fields": [list(f) for f in self.fields],
            "block_size": self.block_size,
        }


@dataclass
class ClaimedBlocks:
    """The blocks a head start read, in file order, after `skipped` bytes."""

    reader: Any
    """The `_jsonl_reader.HeadStart`, finished; `take()` gives its blocks."""
    skipped: int
    """Bytes of a UTF-8 byte order mark before the first block."""
    sizes: list[int]
    """Bytes of input of each block."""
    rest: bytes
    """Bytes read after the last block, which the next block starts with."""

    @property
    def end(self) -> int:
        """Byte offset after the last block."""
        return self.skipped + sum(self.sizes)


class _Registry:
    """The head starts of this process and the hints of this run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hint, Any] = {}
        self._loaded: list[Hint] = []
        self._noted: dict[Hint, None] = {}
        self._recording = False

    def start(self, hints: list[Hint], *, begin: bool) -> None:
        """Record this run's hints from now on; with `begin`, start on `hints`."""
        self._loaded = hints
        self._recording = True
        if _jsonl_reader is None or not begin:
            return
        for hint in hints[:MAX_FILES]:
            try:
                reader = _jsonl_reader.HeadStart(
                    hint.path, hint.fields, hint.block_size, LIMIT // len(hints)
                )
            except (ValueError, TypeError, OverflowError) as exc:  # edited by hand
                _LOG.debug("no head start of %s: %s", hint.path, exc)
                continue
            with self._lock:
                self._running[hint] = reader

    def note(self, hint: Hint) -> None:
        with self._lock:
            if self._recording and len(self._noted) < MAX_FILES:
                self._noted[hint] = None

    def claim(self, hint: Hint, status: os.stat_result) -> ClaimedBlocks | None:
        with self._lock:
            reader = self._running.pop(hint, None)
        if reader is None:
            return None
        done = reader.finish()
        identity = (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)
        if done["error"] or done["identity"] != identity:
            _LOG.debug("head start of %s dropped: the file differs", hint.path)
            return None
        return ClaimedBlocks(reader, done["skipped"], done["sizes"], done["rest"])

    def drop_unclaimed(self) -> None:
        with self._lock:
            running, self._running = self._running, {}
        for reader in running.values():
            reader.finish()

    def finish(self) -> list[Hint] | None:
        """Stop the head starts not taken; return this run's hints if new."""
        with self._lock:
            running, self._running = self._running, {}
            noted, self._noted = list(self._noted), {}
            self._recording = False
        for reader in running.values():
            reader.finish()
        return None if noted == self._loaded else noted


_REGISTRY = _Registry()


def usable_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _hints_entry(pipeline: Path, params: Mapping[str, str]) -> Path | None:
    try:
        text = pipeline.read_bytes()
    except OSError:
        return None
    return entry_path(
        "headstart",
        _FORMAT,
        dataflare.__version__,
        os.getcwd(),
        str(pipeline.resolve()),
        text,
        json.dumps(sorted(params.items())),
    )


def _read_hints(entry: Path) -> list[Hint]:
    """Return the hints of `entry`; none if it is missing or damaged."""
    data = read_entry(entry)
    if data is None:
        return []
    try:
        items = json.loads(data)
        return [
            Hint(
                str(item["path"]),
                tuple((str(name), int(kind)) for name, kind in item["fields"]),
                int(item["block_size"]),
            )
            for item in items[:MAX_FILES]
            if 0 < int(item["block_size"]) <= _MAX_BLOCK
            and len(item["fields"]) <= _MAX_FIELDS
        ]
    # Whatever the damage (an entry edited by hand), the run rewrites it.
    except Exception as exc:
        _LOG.debug("head start entry %s ignored: %r", entry, exc)
        return []


def start_for(pipeline: Path, params: Mapping[str, str]) -> Path | None:
    """Start the head starts that the last run of `pipeline` with `params` noted.

    Returns the entry to pass to `finish_run`, or None if the cache is off.
    """
    if os.environ.get("DATAFLARE_HEAD_START", "1") == "0":
        return None
    entry = _hints_entry(pipeline, params)
    if entry is not None:
        # On one core the thread would only take turns with the loading.
        _REGISTRY.start(_read_hints(entry), begin=usable_cores() > 1)
    return entry


@contextmanager
def started(pipeline: Path, params: Mapping[str, str]) -> Iterator[Path | None]:
    """Start the head starts of `pipeline` for a run; stop those left at the end.

    Yields the entry to pass to `finish_run` once the run has read its input.
    """
    entry = start_for(pipeline, params)
    try:
        yield entry
    finally:
        finish_run(entry, save=False)


def finish_run(entry: Path | None, *, save: bool) -> None:
    """Stop the head starts not taken, and with `save` keep this run's hints."""
    noted = _REGISTRY.finish()
    if entry is not None and save and noted is not None:
        write_entry(entry, json.dumps([hint.as_json() for hint in noted]).encode())


def drop_unclaimed() -> None:
    """Stop the head starts that no source took, and free their blocks.

    The command calls this once the run reads records: by then every
    source has opened its first file.
    """
    _REGISTRY.drop_unclaimed()


def note(path: Path, fields: Fields, block_size: int) -> Hint:
    """Return the hint of a source that reads `path` from its start.

    While the command runs a pipeline, the hint is kept for the next run.
    """
    hint = Hint(os.path.abspath(path), fields, block_size)
    _REGISTRY.note(hint)
    return hint


def claim(hint: Hint, status: os.stat_result) -> ClaimedBlocks | None:
    """Take the head start of `hint` if one ran on the file of `status`."""
    return _REGISTRY.claim(hint, status)

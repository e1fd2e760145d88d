"""Start writing a growing output file to disk while it is still being written.

A file sink syncs each file to disk before it publishes it (at the end, at
a roll and at every checkpoint). Linux keeps written data in memory until
then, so that sync waited for the whole file: about 16 ms for the 30 MB
output of `bench/pipelines/w1-stateless.yaml`, on the one thread that ends
the run. `Writeback` has Linux start writing every `STEP_BYTES` as the
file grows (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`, which does not
wait), so the sync at the end finds most of the file written: 3-4 ms for
that output. Elsewhere, and where the call fails, it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

_LOG = logging.getLogger(__name__)

STEP_BYTES = 8 << 20
"""Bytes written after the last start of writeback that start the next."""

_SYNC_FILE_RANGE_WRITE = 2
"""The `flags` value that starts writeback without waiting (linux/fs.h)."""


@cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Return the C library's `sync_file_range`, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


class Writeback:
    """Early writeback of one file being written, `STEP_BYTES` at a time.

    The file is opened again read-only, so that this works whatever library
    writes it.
    """

    def __init__(self, path: Path) -> None:
        self._sync = _sync_file_range()
        self._fd = -1
        self._started = 0
        if self._sync is None:
            return
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            _LOG.debug("no early writeback for %s: %s", path, exc)

    def advance(self) -> None:
        """Start writing the bytes added since the last start, if enough were."""
        if self._fd < 0 or self._sync is None:
            return
        size = os.fstat(self._fd).st_size
        if size - self._started < STEP_BYTES:
            return
        if self._sync(
            self._fd, self._started, size - self._started, _SYNC_FILE_RANGE_WRITE
        ):
            # A file system or file type without it: stop trying for this file.
            _LOG.debug("sync_file_range failed: %s", os.strerror(ctypes.get_errno()))
            self.close()
            return
        self._started = size

    def close(self) -> None:
        """Close the read-only descriptor of the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

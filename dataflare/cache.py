"""The cache directory of DataFlare: plan entries and head-start hints.

This module loads nothing but the standard library, so that the command
can look up an entry before Arrow and pydantic load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

_LOG = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    """Return the directory of the entries, or None if the cache is off.

    `$DATAFLARE_CACHE_DIR` if set (empty turns the cache off), else
    `$XDG_CACHE_HOME/dataflare/plans`, else `~/.cache/dataflare/plans`.
    """
    configured = os.environ.get("DATAFLARE_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dataflare" / "plans"


def entry_path(kind: str, *parts: bytes | str) -> Path | None:
    """Return the file of the `kind` entry for `parts`, or None if the cache is off."""
    directory = cache_dir()
    if directory is None:
        return None
    digest = hashlib.sha256()
    for part in (kind, *parts):
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return directory / f"{kind}-{digest.hexdigest()[:40]}.json"


@cache
def library_version(name: str) -> str:
    """Return the installed distribution of module `name`, from its metadata folder.

    Reads folder names such as `jsonschema-4.26.0.dist-info`, because
    `importlib.metadata` takes about 50 ms to load. Empty if not found.
    """
    spec = find_spec(name)
    if spec is None or spec.origin is None:
        return ""
    site = Path(spec.origin).parent.parent
    return " ".join(sorted(p.name for p in site.glob(f"{name}-*.dist-info")))


MAX_ENTRY_BYTES = 1 << 20
"""Entries are a few kB; a larger file is not read."""


def read_entry(path: Path) -> bytes | None:
    """Return the bytes of the entry at `path`, or None if there is none.

    Only a regular file of at most `MAX_ENTRY_BYTES` is read: a named pipe
    put there must not block the command, and a directory is skipped.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_ENTRY_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read(MAX_ENTRY_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_json_entry(path: Path | None) -> dict[str, Any] | None:
    """Return the JSON object of the entry at `path`, or None if missing or damaged."""
    if path is None:
        return None
    data = read_entry(path)
    if data is None:
        return None
    try:
        entry = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return entry if isinstance(entry, dict) else None


def write_entry(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole, then rename: readers never see half an entry.

    An entry that cannot be written is skipped, with a debug log line.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=".", suffix=".tmp", delete=False
        ) as file:
            file.write(data)
        os.replace(file.name, path)
    except OSError as exc:
        _LOG.debug("could not save the cache entry %s: %s", path, exc)

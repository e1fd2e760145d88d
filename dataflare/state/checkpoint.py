"""Checkpoint storage: one directory per checkpoint, written atomically.

Layout under the storage root (a local path or an fsspec URL)::

    chk-000012/
      metadata.json        written last: ids, positions, sink states, digests
      hourly-0.state       one file per stateful operator instance
      hourly-1.state

A checkpoint is complete only when `metadata.json` exists and every state
file matches the SHA-256 digest recorded in it. On a local file system the
directory is first written as `chk-000012.tmp` and renamed, so a crash in
the middle leaves the previous checkpoint as the newest complete one. On
other file systems, `metadata.json` written last marks completion.
Savepoints use the same format in a directory of the user's choice and are
never pruned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from dataflare.state.faults import crash_point

logger = logging.getLogger(__name__)

METADATA = "metadata.json"
FINAL_CHECKPOINT = 2**62
"""Checkpoint id sinks stage their last output under at the end of input;
the final checkpoint commits it."""
FORMAT_VERSION = 1
_NAME = re.compile(r"^chk-(\d+)$")


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the pipeline."""


class CheckpointNotFoundError(CheckpointError):
    """The checkpoint directory named by the user does not exist."""


@dataclass
class InstanceState:
    """What one operator instance saved."""

    position: Any = None  # sources: where to resume
    state_file: str | None = None  # operators: file with their state
    state_bytes: int = 0
    sink: Any = None  # sinks: their commit state
    finished: bool = False


@dataclass
class Checkpoint:
    id: int
    pipeline_id: str
    created_at: str
    duration_seconds: float
    finished: bool
    steps: dict[str, dict[str, Any]]  # step -> {fingerprint, instances: [...]}
    location: str = ""
    blobs: dict[str, bytes] = field(default_factory=dict, repr=False)

    def instance(self, step: str, index: int) -> InstanceState:
        raw = self.steps[step]["instances"][index]
        return InstanceState(**raw)

    def state_of(self, step: str, index: int) -> bytes | None:
        name = self.instance(step, index).state_file
        return None if name is None else self.blobs[name]

    def total_state_bytes(self) -> int:
        return sum(len(b) for b in self.blobs.values())


class CheckpointStorage:
    """Write, list, load and prune checkpoints under one root."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        # Imported here because fsspec pulls in asyncio and ssl, which runs
        # without checkpoints do not need.
        import fsspec

        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.local = "file" in _protocols(self.fs)

    def write(self, checkpoint: Checkpoint, *, directory: str | None = None) -> str:
        """Store `checkpoint` (with its blobs); return where it was written."""
        final = directory or f"{self.path}/chk-{checkpoint.id:06d}"
        staging = f"{final}.tmp" if self.local else final
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        self.fs.makedirs(staging, exist_ok=True)
        digests = {}
        for name, data in checkpoint.blobs.items():
            with self.fs.open(f"{staging}/{name}", "wb") as f:
                f.write(data)
            digests[name] = hashlib.sha256(data).hexdigest()
        crash_point("checkpoint-write")
        metadata = {
            "format": FORMAT_VERSION,
            "id": checkpoint.id,
            "pipeline_id": checkpoint.pipeline_id,
            "created_at": checkpoint.created_at,
            "duration_seconds": checkpoint.duration_seconds,
            "finished": checkpoint.finished,
            "steps": checkpoint.steps,
            "digests": digests,
        }
        with self.fs.open(f"{staging}/{METADATA}", "wb") as f:
            f.write(orjson.dumps(metadata, option=orjson.OPT_INDENT_2))
        if staging != final:
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            self.fs.mv(staging, final, recursive=True)
        return final

    def ids(self) -> list[int]:
        """Return the ids of checkpoint directories present, newest first."""
        if not self.fs.exists(self.path):
            return []
        found = []
        for entry in self.fs.ls(self.path, detail=False):
            match = _NAME.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                found.append(int(match.group(1)))
        return sorted(found, reverse=True)

    def load(self, location: str) -> Checkpoint:
        """Read a checkpoint directory and check every file's digest.

        Raises:
            CheckpointError: missing or corrupt files, named in the message.
        """
        if not self.fs.exists(location):
            raise CheckpointNotFoundError(f"checkpoint {location} not found")
        meta_path = f"{location.rstrip('/')}/{METADATA}"
        try:
            with self.fs.open(meta_path, "rb") as f:
                meta = orjson.loads(f.read())
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {location} is incomplete: {METADATA} is missing"
            ) from None
        except orjson.JSONDecodeError as exc:
            raise CheckpointError(
                f"checkpoint {location}: {METADATA} is corrupt ({exc})"
            ) from exc
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {location} has format "
                f"{meta.get('format')!r}; this version reads "
                f"{FORMAT_VERSION}"
            )
        blobs = {}
        for name, digest in meta["digests"].items():
            try:
                with self.fs.open(f"{location}/{name}", "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise CheckpointError(
                    f"checkpoint {location}: state file {name} is missing"
                ) from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise CheckpointError(
                    f"checkpoint {location}: state file {name} is "
                    "corrupt (its SHA-256 digest does not match)"
                )
            blobs[name] = data
        return Checkpoint(
            id=meta["id"],
            pipeline_id=meta["pipeline_id"],
            created_at=meta["created_at"],
            duration_seconds=meta["duration_seconds"],
            finished=meta["finished"],
            steps=meta["steps"],
            location=location,
            blobs=blobs,
        )

    def location(self, checkpoint_id: int) -> str:
        return f"{self.path}/chk-{checkpoint_id:06d}"

    def latest(self) -> Checkpoint | None:
        """Return the newest complete checkpoint, skipping broken ones.

        Raises:
            CheckpointError: checkpoints exist but none of them is complete,
                so resuming would lose data; the message lists each problem.
        """
        problems = []
        for checkpoint_id in self.ids():
            try:
                return self.load(self.location(checkpoint_id))
            except CheckpointError as exc:
                logger.warning("%s; falling back to the previous checkpoint", exc)
                problems.append(str(exc))
        if problems:
            raise CheckpointError(
                "no complete checkpoint to resume from: "
                + "; ".join(problems)
                + ". Run with --from-scratch to discard them and start over"
            )
        return None

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints, and stale temporaries."""
        for checkpoint_id in self.ids()[keep:]:
            self.fs.rm(self.location(checkpoint_id), recursive=True)
        if self.local and self.fs.exists(self.path):
            for entry in self.fs.ls(self.path, detail=False):
                if entry.endswith(".tmp"):
                    self.fs.rm(entry, recursive=True)

    def clear(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)

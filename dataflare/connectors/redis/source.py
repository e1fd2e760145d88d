"""The Redis Streams source (type `redis`): records from a consumer group.

Example::

    sources:
      clicks:
        type: redis
        config:
          url: redis://127.0.0.1:6379/0
          stream: clicks
          group: clicks-etl
          schema: {user: string, page: string, at: timestamp}

Each stream entry carries one record in its field `field` (default
`data`): a JSON object of `schema`, or with `format: raw` the bytes in the
field `value`. The entry's other fields go to the reserved column
`_headers` (map of field name to bytes), and with `id_field` the entry id
goes to a string field of that name. An entry whose payload does not fit
goes to the dead-letter output with the position `redis stream S id ID`.

The source reads as consumer `consumer` (default `STEP-INSTANCE`) of the
consumer group `group`, and creates the group (and the stream) when they do
not exist, from the start of the stream or, with `start_from: new`, from
its end. A group that disappears while the source runs (Redis restarted
without persistence, XGROUP DESTROY) is created again from the start of the
stream or, with `start_from: new`, after the last entry emitted. Parallel
instances are distinct consumers of the group, so Redis spreads the entries
among them.

Acknowledgements (XACK):

- With checkpointing, the entries emitted before checkpoint `n` are
  acknowledged once `n` is complete (`notify_checkpoint_complete`). An entry
  stays in the consumer's pending entries list until then, and a restarted
  source reads its pending entries again before new ones. The checkpoint
  stores the id of the last entry emitted. A run resumed from it
  acknowledges pending entries up to that id without emitting them again,
  so each entry reaches the pipeline's state once.
- Without checkpointing, each batch is acknowledged once it has been handed
  to the pipeline; a crash loses the records still on their way.
- An acknowledgement that fails is sent again with the next one.

After a broken connection (Redis restarted, a network error, a timeout),
the source reads its pending entries after the last one it emitted, then
new ones. Redis adds the entries of an XREADGROUP to the pending entries
list when it serves the command. It does so even when the reply never
reaches the source, because the server stopped or the connection broke
before sending it, and reading with `>` never returns those entries again.

Entries are kept only as far as Redis keeps them: a Redis restarted without
persistence (`appendonly`, or a snapshot taken after the entries arrived)
has lost them, and an entry trimmed (XTRIM, MAXLEN) while pending is
acknowledged and logged, not emitted.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import pyarrow as pa
import redis
import redis.exceptions
from pydantic import Field

from dataflare.connectors.backoff import Backoff, idle_for
from dataflare.connectors.common import reconnecting
from dataflare.connectors.payloads import (
    HEADERS_TYPE,
    PayloadConfig,
    PayloadDecoder,
    payload_text,
)
from dataflare.connectors.redis.client import CONNECTION_ERRORS, connect
from dataflare.connectors.redis.config import RedisConnectionConfig
from dataflare.plugin.interface import (
    HEADERS,
    IDLE,
    Idle,
    OperatorContext,
    Origin,
    PluginKind,
    PluginMetadata,
    Source,
    SourceBatch,
)
from dataflare.state.checkpoint import FINAL_CHECKPOINT
from dataflare.streaming.spec import Duration

logger = logging.getLogger(__name__)

_ACK_CHUNK = 1000


class RedisSourceConfig(RedisConnectionConfig, PayloadConfig):
    stream: str = Field(min_length=1, description="Key of the stream to read")
    group: str = Field(min_length=1, description="Consumer group to read as")
    consumer: str | None = Field(
        None, description="Consumer name in the group; default STEP-INSTANCE"
    )
    start_from: Literal["all", "new"] = Field(
        "all",
        description="Where a group the source creates starts: the first entry "
        "of the stream, or entries added from now on",
    )
    field: str = Field("data", description="Entry field that contains the payload")
    id_field: str | None = Field(
        None, description="Record field to fill with the entry id"
    )
    batch: int = Field(1000, ge=1, description="Maximum entries read at once")
    block: Duration = Field(
        timedelta(milliseconds=200),
        description="How long one read waits for entries before the source "
        "reports itself idle",
    )


def parse_id(entry_id: str) -> tuple[int, int]:
    """Return a stream entry id `MS-SEQ` as a pair of numbers, for ordering."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class RedisOrigin(Origin):
    """Positions of the rows of one batch: stream entry ids."""

    stream: str
    ids: Sequence[str]

    def position(self, row: int) -> str:
        return f"redis stream {self.stream} id {self.ids[row]}"


class RedisSource(Source[RedisSourceConfig]):
    """Read records from a Redis stream as a consumer group member."""

    metadata = PluginMetadata(
        "redis", PluginKind.SOURCE, "Records from a Redis stream (consumer group)"
    )
    Config = RedisSourceConfig

    def __init__(self, config: RedisSourceConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._client: redis.Redis | None = None
        self._since: list[str] = []  # emitted since the last snapshot
        self._snapshots: collections.deque[list[str]] = collections.deque()
        self._unacked: list[str] = []  # acknowledgements that failed
        self._last: str | None = None  # id of the last entry emitted
        self._skip_upto: tuple[int, int] | None = None
        self._pending_from: str | None = "0"  # None once the backlog is read

    @property
    def bounded(self) -> bool:
        return False

    def schema(self) -> pa.Schema:
        fields = list(self.config.payload_schema())
        if self.config.id_field is not None:
            fields.append(pa.field(self.config.id_field, pa.string()))
        return pa.schema([*fields, pa.field(HEADERS, HEADERS_TYPE)])

    @property
    def consumer(self) -> str:
        if self.config.consumer is not None:
            if self.context.parallelism > 1:
                return f"{self.config.consumer}-{self.context.instance}"
            return self.config.consumer
        return f"{self.context.step}-{self.context.instance}"

    # --- lifecycle ---

    def open(self) -> None:
        config = self.config
        if config.id_field is not None and config.id_field in (
            config.payload_schema().names
        ):
            raise ValueError(
                f"id_field {config.id_field!r} is also a field of `schema`; "
                "choose another name for the entry id"
            )
        self._schema = self.schema()
        self._decoder = PayloadDecoder(config)
        self._checkpointing = bool(getattr(self.context, "checkpointing", False))
        self._client = connect(config)
        self._where = f"Redis stream {config.stream!r} at {config.address()}"
        self._create_group()

    def _create_group(self) -> None:
        client = self._client
        assert client is not None
        start = "0" if self.config.start_from == "all" else "$"
        if start == "$" and self._last is not None:
            # Created again after the group was lost: go on after the last
            # entry emitted, so that entries added meanwhile are read.
            start = self._last

        def create() -> None:
            try:
                client.xgroup_create(
                    self.config.stream, self.config.group, id=start, mkstream=True
                )
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                return
            logger.info(
                "step %r: created consumer group %r on %s",
                self.context.step,
                self.config.group,
                self._where,
            )

        reconnecting(
            create,
            step=self.context.step,
            what=f"create consumer group {self.config.group!r} on {self._where}",
            errors=CONNECTION_ERRORS,
            give_up_after=self.config.reconnect_for.total_seconds(),
            should_stop=lambda: self.context.stopping,
        )

    def close(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            if not self._checkpointing and (self._since or self._unacked):
                self._acknowledge(self._since)
        finally:
            self._client = None
            client.close()

    # --- positions and acknowledgements ---

    def snapshot_position(self) -> Any:
        """Remember the entries emitted before this checkpoint's barrier."""
        self._snapshots.append(self._since)
        self._since = []
        return {"stream": self.config.stream, "last_id": self._last}

    def restore_position(self, position: Any) -> None:
        """Skip pending entries the checkpoint covers when they come again."""
        if position and position.get("last_id"):
            self._skip_upto = parse_id(str(position["last_id"]))
            self._last = str(position["last_id"])

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Acknowledge the entries emitted before checkpoint `checkpoint_id`.

        Checkpoints complete in the order they were taken, so the oldest
        snapshot not yet acknowledged belongs to this checkpoint. The final
        checkpoint of a run acknowledges every entry emitted.
        """
        if checkpoint_id >= FINAL_CHECKPOINT:
            ids = [i for snapshot in self._snapshots for i in snapshot] + self._since
            self._snapshots.clear()
            self._since = []
        elif self._snapshots:
            ids = self._snapshots.popleft()
        else:
            ids = []
        self._acknowledge(ids)

    def _acknowledge(self, ids: list[str]) -> None:
        """XACK entries and those whose acknowledgement failed before.

        Entries whose acknowledgement fails again are kept for the next call.
        """
        ids = self._unacked + ids
        client = self._client
        if not ids or client is None:
            self._unacked = []
            return
        try:
            pipe = client.pipeline(transaction=False)
            for start in range(0, len(ids), _ACK_CHUNK):
                pipe.xack(
                    self.config.stream,
                    self.config.group,
                    *ids[start : start + _ACK_CHUNK],
                )
            pipe.execute()
        except CONNECTION_ERRORS as exc:
            self._unacked = list(ids)
            logger.warning(
                "step %r: could not acknowledge %d entries of %s (%s); trying "
                "again at the next checkpoint",
                self.context.step,
                len(ids),
                self._where,
                exc,
            )
            return
        self._unacked = []

    # --- reading ---

    def read(self) -> Iterator[SourceBatch | Idle]:
        backoff = Backoff(
            self.context.step,
            f"read from {self._where}",
            self.config.reconnect_for.total_seconds(),
        )
        while not self.context.stopping:
            try:
                entries = self._next_entries()
            except CONNECTION_ERRORS as exc:
                self._reread_pending()
                wait = backoff.failed(exc)
                yield from idle_for(wait, lambda: self.context.stopping)
                continue
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                logger.warning(
                    "step %r: consumer group %r of %s is gone (was Redis restarted "
                    "without persistence?); creating it again",
                    self.context.step,
                    self.config.group,
                    self._where,
                )
                self._create_group()
                continue
            backoff.succeeded()
            batch = self._decode(entries)
            if batch is None:
                yield IDLE
                continue
            if batch.batch.num_rows:
                yield batch
            if not self._checkpointing:
                self._acknowledge(self._since)
                self._since = []

    def _reread_pending(self) -> None:
        """Make the next read return the pending entries not yet emitted.

        A read that failed may still have added entries to the pending
        entries list (see the module docstring). Entries up to the last one
        emitted came in replies, so the pending entries after it are the
        ones whose reply was lost. A pass over the pending entries that was
        under way goes on where it was.
        """
        if self._pending_from is None:
            self._pending_from = self._last if self._last is not None else "0"

    def _next_entries(self) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        """Read this consumer's pending entries first, then new ones."""
        client = self._client
        assert client is not None
        config = self.config
        reply: Any
        if self._pending_from is not None:
            reply = client.xreadgroup(
                config.group,
                self.consumer,
                {config.stream: self._pending_from},
                count=config.batch,
            )
            entries = reply[0][1] if reply else []
            if entries:
                self._pending_from = entries[-1][0].decode()
                return list(entries)
            self._pending_from = None  # the backlog is read: go on with new ones
        block = max(1, int(config.block.total_seconds() * 1000))
        reply = client.xreadgroup(
            config.group,
            self.consumer,
            {config.stream: ">"},
            count=config.batch,
            block=block,
        )
        return list(reply[0][1]) if reply else []

    def _decode(
        self, entries: list[tuple[bytes, dict[bytes, bytes] | None]]
    ) -> SourceBatch | None:
        """Turn entries into a batch; reject those that do not fit."""
        if not entries:
            return None
        field = self.config.field.encode()
        ids: list[str] = []
        headers: list[Any] = []
        payloads: list[bytes | None] = []
        covered: list[str] = []
        rejected: list[tuple[Any, str, str]] = []
        for raw_id, values in entries:
            entry_id = raw_id.decode()
            if self._skip_upto is not None and parse_id(entry_id) <= self._skip_upto:
                covered.append(entry_id)  # in the restored checkpoint already
                continue
            self._since.append(entry_id)
            self._last = entry_id
            if values is None:
                logger.warning(
                    "step %r: entry %s of %s was deleted before it was read; "
                    "acknowledging it",
                    self.context.step,
                    entry_id,
                    self._where,
                )
                continue
            if field not in values:
                names = ", ".join(k.decode("utf-8", "replace") for k in values)
                rejected.append(
                    (
                        {
                            k.decode("utf-8", "replace"): payload_text(v)
                            for k, v in values.items()
                        },
                        f"the entry has no field {self.config.field!r} (fields: "
                        f"{names}); set `field` to the field with the payload",
                        f"redis stream {self.config.stream} id {entry_id}",
                    )
                )
                continue
            ids.append(entry_id)
            payloads.append(values[field])
            others = [
                (k.decode("utf-8", "replace"), v)
                for k, v in values.items()
                if k != field
            ]
            headers.append(others or None)
        if covered:
            self._acknowledge(covered)
        decoded = self._decoder.decode(payloads)
        for index, record, reason in decoded.rejected:
            if isinstance(record, bytes):
                record = payload_text(record)
            rejected.append(
                (record, reason, f"redis stream {self.config.stream} id {ids[index]}")
            )
        if rejected:
            self.context.reject(
                [r for r, _, _ in rejected],
                [reason for _, reason, _ in rejected],
                [where for _, _, where in rejected],
            )
        kept = decoded.kept
        if len(kept) != len(payloads):
            ids = [ids[i] for i in kept]
            headers = [headers[i] for i in kept]
        columns = list(decoded.batch.columns)
        if self.config.id_field is not None:
            columns.append(pa.array(ids, type=pa.string()))
        columns.append(pa.array(headers, type=HEADERS_TYPE))
        batch = pa.RecordBatch.from_arrays(columns, schema=self._schema)
        return SourceBatch(batch, RedisOrigin(self.config.stream, ids))


def _name(field: bytes) -> str:
    return field.decode("utf-8", "replace")

"""The NATS JetStream source (type `nats`): records from a durable consumer.

Example::

    sources:
      readings:
        type: nats
        config:
          servers: nats://127.0.0.1:4222
          stream: READINGS
          durable: readings-etl
          subject: readings.>          # filter, when the consumer is created
          schema: {sensor: string, value: float, at: timestamp}

Each message carries one record: a JSON object of `schema`, or with
`format: raw` the payload bytes in the field `value`. The reserved columns
`_key` (the message's subject), `_headers` (map of header name to bytes)
and `_offset` (the stream sequence) carry its metadata. A message whose
payload does not fit goes to the dead-letter output with the position
`nats stream S sequence N`.

The source pulls from the durable consumer `durable` of `stream`, and
creates it (explicit acknowledgements, `ack_wait`, `max_ack_pending`,
`start_from`) when it does not exist. An existing consumer is used as it
is. Parallel instances share the consumer, so JetStream spreads the
messages among them.

Acknowledgements:

- With checkpointing, the messages emitted before checkpoint `n` are
  acknowledged once `n` is complete (`notify_checkpoint_complete`). After a
  crash, JetStream delivers the unacknowledged messages again once their
  `ack_wait` has passed. The checkpoint also lists the messages it covers
  that were not yet acknowledged, and a run resumed from it acknowledges
  those without emitting them again, so with one instance each message
  reaches the pipeline's state once.
- Without checkpointing, each batch is acknowledged once it has been
  handed to the pipeline; a crash loses the records still on their way.

While messages wait for their checkpoint, JetStream counts them against
`max_ack_pending` and delivers them again after `ack_wait`. The source
recognises such repeats and does not emit them twice. It also remembers
the sequences it has acknowledged, because a NATS server that restarts may
lose the latest acknowledgements and deliver those messages again. Set `ack_wait` above
the checkpoint interval to spare that traffic.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import nats.errors
import nats.js.errors
import pyarrow as pa
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import Field

from dataflare.connectors.backoff import Backoff, idle_for
from dataflare.connectors.nats.client import (
    CONNECTION_ERRORS,
    NatsConnection,
    NatsConnectionConfig,
)
from dataflare.connectors.payloads import (
    HEADERS_TYPE,
    PayloadConfig,
    PayloadDecoder,
    payload_text,
)
from dataflare.plugin.interface import (
    HEADERS,
    IDLE,
    KEY,
    OFFSET,
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

_ACK_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    nats.errors.MsgAlreadyAckdError,
)


class NatsSourceConfig(NatsConnectionConfig, PayloadConfig):
    stream: str = Field(min_length=1, description="JetStream stream to read")
    durable: str = Field(
        min_length=1, description="Name of the durable consumer to pull from"
    )
    subject: str | None = Field(
        None, description="Filter subject of a consumer the source creates"
    )
    start_from: Literal["all", "new"] = Field(
        "all",
        description="Messages a created consumer delivers: all in the stream, "
        "or only new ones",
    )
    ack_wait: Duration = Field(
        timedelta(seconds=60),
        description="Time after which JetStream delivers an unacknowledged "
        "message again (for a consumer the source creates)",
    )
    max_ack_pending: int = Field(
        100_000,
        ge=1,
        description="Maximum messages delivered and not yet acknowledged (for a "
        "consumer the source creates)",
    )
    batch: int = Field(1000, ge=1, description="Maximum messages fetched at once")
    fetch_timeout: Duration = Field(
        timedelta(milliseconds=200),
        description="How long one fetch waits before the source reports itself idle",
    )


@dataclass(frozen=True)
class NatsOrigin(Origin):
    """Positions of the rows of one batch: stream sequences."""

    stream: str
    sequences: Sequence[int]

    def position(self, row: int) -> str:
        return f"nats stream {self.stream} sequence {self.sequences[row]}"


def to_ranges(numbers: Sequence[int]) -> list[list[int]]:
    """Compress sorted numbers into [first, last] ranges of consecutive ones."""
    ranges: list[list[int]] = []
    for number in numbers:
        if ranges and number == ranges[-1][1] + 1:
            ranges[-1][1] = number
        else:
            ranges.append([number, number])
    return ranges


class RangeSet:
    """A set of numbers kept as sorted, disjoint [first, last] ranges.

    Stream sequences come mostly in order, so a set of millions of them
    takes a few ranges.
    """

    def __init__(self, ranges: Sequence[Sequence[int]]) -> None:
        pairs = sorted((int(a), int(b)) for a, b in ranges)
        self._firsts = [a for a, _ in pairs]
        self._lasts = [b for _, b in pairs]

    def __contains__(self, number: int) -> bool:
        index = bisect.bisect_right(self._firsts, number) - 1
        return index >= 0 and number <= self._lasts[index]

    def add(self, number: int) -> None:
        """Add `number`, joining it to the ranges next to it."""
        index = bisect.bisect_right(self._firsts, number) - 1
        if index >= 0 and number <= self._lasts[index]:
            return
        joins_left = index >= 0 and self._lasts[index] == number - 1
        right = index + 1
        joins_right = right < len(self._firsts) and self._firsts[right] == number + 1
        if joins_left and joins_right:
            self._lasts[index] = self._lasts[right]
            del self._firsts[right], self._lasts[right]
        elif joins_left:
            self._lasts[index] = number
        elif joins_right:
            self._firsts[right] = number
        else:
            self._firsts.insert(right, number)
            self._lasts.insert(right, number)

    def __bool__(self) -> bool:
        return bool(self._firsts)


class NatsSource(Source[NatsSourceConfig]):
    """Read records from a JetStream durable consumer; ack on checkpoints."""

    metadata = PluginMetadata(
        "nats", PluginKind.SOURCE, "Records from a NATS JetStream stream"
    )
    Config = NatsSourceConfig

    def __init__(self, config: NatsSourceConfig, context: OperatorContext) -> None:
        super().__init__(config, context)
        self._conn: NatsConnection | None = None
        self._pending: dict[int, Msg] = {}  # emitted, not yet acknowledged
        self._since: list[int] = []  # emitted since the last snapshot
        self._snapshots: collections.deque[list[int]] = collections.deque()
        self._unacked: list[int] = []  # acknowledgements that failed
        self._skip = RangeSet([])
        self._acked = RangeSet([])  # acknowledged by this instance
        self._ahead: Future[list[Msg]] | None = None  # the next fetch, under way

    @property
    def bounded(self) -> bool:
        return False

    def schema(self) -> pa.Schema:
        return pa.schema(
            [
                *self.config.payload_schema(),
                pa.field(KEY, pa.string()),
                pa.field(HEADERS, HEADERS_TYPE),
                pa.field(OFFSET, pa.int64()),
            ]
        )

    # --- lifecycle ---

    def open(self) -> None:
        self._schema = self.schema()
        self._decoder = PayloadDecoder(self.config)
        self._checkpointing = bool(getattr(self.context, "checkpointing", False))
        self._conn = NatsConnection(
            self.config, self.context.step, lambda: self.context.stopping
        )
        self._subscription = self._conn.retry(
            self._subscribe,
            f"bind to consumer {self.config.durable!r} of NATS stream "
            f"{self.config.stream!r}",
        )

    async def _subscribe(self) -> Any:
        config = self.config
        assert self._conn is not None and self._conn.client is not None
        js = self._conn.client.jetstream()
        try:
            await js.stream_info(config.stream)
        except nats.js.errors.NotFoundError:
            raise ValueError(
                f"NATS stream {config.stream!r} does not exist at "
                f"{config.address()}; create it first (for example "
                f"`nats stream add {config.stream}`)"
            ) from None
        try:
            await js.consumer_info(config.stream, config.durable)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(
                config.stream,
                ConsumerConfig(
                    durable_name=config.durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=config.ack_wait.total_seconds(),
                    max_ack_pending=config.max_ack_pending,
                    deliver_policy=DeliverPolicy.ALL
                    if config.start_from == "all"
                    else DeliverPolicy.NEW,
                    filter_subject=config.subject,
                ),
            )
            logger.info(
                "step %r: created durable consumer %r on NATS stream %r",
                self.context.step,
                config.durable,
                config.stream,
            )
        return await js.pull_subscribe_bind(
            durable=config.durable, stream=config.stream
        )

    def close(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._drop_fetch()
        try:
            if not self._checkpointing and self._pending:
                self._acknowledge(list(self._pending))
        finally:
            self._conn = None
            conn.close()

    # --- positions and acknowledgements ---

    def snapshot_position(self) -> Any:
        """Remember the messages emitted before this checkpoint's barrier.

        Returns the stream sequences emitted and not yet acknowledged, so a
        run resumed from this checkpoint can acknowledge them without
        emitting them again.
        """
        self._snapshots.append(self._since)
        self._since = []
        pending = sorted(self._pending)
        return {"stream": self.config.stream, "pending": to_ranges(pending)}

    def restore_position(self, position: Any) -> None:
        """Skip the messages the checkpoint covers when they come again."""
        if position and position.get("pending"):
            self._skip = RangeSet(position["pending"])

    def notify_checkpoint_complete(self, checkpoint_id: int) -> None:
        """Acknowledge the messages emitted before checkpoint `checkpoint_id`.

        Checkpoints complete in the order they were taken, so the oldest
        snapshot not yet acknowledged belongs to this checkpoint. The final
        checkpoint of a run acknowledges every message emitted.
        """
        if checkpoint_id >= FINAL_CHECKPOINT:
            self._snapshots.clear()
            self._since = []
            sequences = list(self._pending)
        elif self._snapshots:
            sequences = self._snapshots.popleft()
        else:
            return
        self._acknowledge(self._unacked + sequences)

    def _acknowledge(self, sequences: list[int]) -> None:
        """Acknowledge messages; those that fail are tried again next time."""
        messages = [(s, self._pending[s]) for s in sequences if s in self._pending]
        if not messages or self._conn is None:
            self._unacked = []
            return

        async def ack_all() -> None:
            for _, message in messages:
                await message.ack()
            assert self._conn is not None and self._conn.client is not None
            await self._conn.client.flush(timeout=10)

        try:
            self._conn.run(ack_all(), timeout=30)
        except _ACK_ERRORS as exc:
            self._unacked = [s for s, _ in messages]
            logger.warning(
                "step %r: could not acknowledge %d NATS messages (%s); trying "
                "again at the next checkpoint",
                self.context.step,
                len(messages),
                exc,
            )
            return
        self._unacked = []
        for sequence, _ in messages:
            del self._pending[sequence]
            self._acked.add(sequence)

    # --- reading ---

    def read(self) -> Iterator[SourceBatch | Idle]:
        config = self.config
        backoff = Backoff(
            self.context.step,
            f"fetch from NATS stream {config.stream!r} at {config.address()}",
            config.reconnect_for.total_seconds(),
        )
        while not self.context.stopping:
            try:
                if self._ahead is None:
                    self._ahead = self._start_fetch()
                messages = self._ahead.result(self._fetch_wait())
            except CONNECTION_ERRORS as exc:
                self._drop_fetch()
                wait = backoff.failed(exc)
                yield from idle_for(wait, lambda: self.context.stopping)
                continue
            self._ahead = None
            backoff.succeeded()
            if messages:
                # Fetch the next messages while these are decoded.
                self._ahead = self._start_fetch_quietly()
            batch = self._decode(messages)
            if batch is None:
                yield IDLE
                continue
            if batch.batch.num_rows:
                yield batch
            if not self._checkpointing:
                self._acknowledge(list(self._pending))

    def _drop_fetch(self) -> None:
        """Cancel the fetch under way; its messages come again after ack_wait."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        ahead.cancel()
        with contextlib.suppress(Exception, CancelledError):
            ahead.result(timeout=5)  # collects the error of a failed fetch

    def _fetch_wait(self) -> float:
        return self.config.fetch_timeout.total_seconds() + 30

    def _start_fetch(self) -> Future[list[Msg]]:
        """Start fetching the next messages on the connection's loop.

        Raises:
            ConnectionReconnectingError: the client is reconnecting.
        """
        conn = self._conn
        assert conn is not None
        timeout = self.config.fetch_timeout.total_seconds()
        subscription = self._subscription

        async def fetch() -> list[Msg]:
            try:
                result: list[Msg] = await subscription.fetch(
                    self.config.batch, timeout=timeout
                )
                return result
            except nats.errors.TimeoutError:
                return []
            except nats.errors.ConnectionClosedError:
                if conn.closing:
                    return []  # closed by `close()` while this fetch waited
                raise

        if conn.client is not None and conn.client.is_reconnecting:
            time.sleep(timeout)
            raise nats.errors.ConnectionReconnectingError
        return asyncio.run_coroutine_threadsafe(fetch(), conn.io.loop)

    def _start_fetch_quietly(self) -> Future[list[Msg]] | None:
        """Start the next fetch; None if the connection is away (retried later)."""
        try:
            return self._start_fetch()
        except CONNECTION_ERRORS:
            return None

    def _decode(self, messages: list[Msg]) -> SourceBatch | None:
        """Turn new messages into a batch; reject those that do not fit."""
        if not messages:
            return None
        sequences: list[int] = []
        subjects: list[str] = []
        headers: list[Any] = []
        payloads: list[bytes | None] = []
        skipped: list[Msg] = []
        for message in messages:
            sequence = message.metadata.sequence.stream
            if sequence in self._skip or sequence in self._acked:
                # Covered by the restored checkpoint, or acknowledged before
                # and delivered again because a restarted server lost the
                # acknowledgement: acknowledge it again, do not emit it.
                skipped.append(message)
                continue
            if sequence in self._pending:
                self._pending[sequence] = message  # delivered again: not new
                continue
            self._pending[sequence] = message
            self._since.append(sequence)
            sequences.append(sequence)
            subjects.append(message.subject)
            headers.append(
                None
                if not message.headers
                else [(k, v.encode()) for k, v in message.headers.items()]
            )
            payloads.append(message.data)
        if skipped:
            self._acknowledge_now(skipped)
        decoded = self._decoder.decode(payloads)
        if decoded.rejected:
            stream = self.config.stream
            self.context.reject(
                [
                    payload_text(r) if isinstance(r, bytes) else r
                    for _, r, _ in decoded.rejected
                ],
                [reason for _, _, reason in decoded.rejected],
                [
                    f"nats stream {stream} sequence {sequences[i]}"
                    for i, _, _ in decoded.rejected
                ],
            )
        kept = decoded.kept
        if len(kept) != len(payloads):
            sequences = [sequences[i] for i in kept]
            subjects = [subjects[i] for i in kept]
            headers = [headers[i] for i in kept]
        columns = [
            *decoded.batch.columns,
            pa.array(subjects, type=pa.string()),
            pa.array(headers, type=HEADERS_TYPE),
            pa.array(sequences, type=pa.int64()),
        ]
        batch = pa.RecordBatch.from_arrays(columns, schema=self._schema)
        return SourceBatch(batch, NatsOrigin(self.config.stream, sequences))

    def _acknowledge_now(self, messages: list[Msg]) -> None:
        """Acknowledge messages that a restored checkpoint already covers."""
        assert self._conn is not None

        async def ack_all() -> None:
            for message in messages:
                await message.ack()

        try:
            self._conn.run(ack_all(), timeout=30)
        except CONNECTION_ERRORS as exc:
            logger.warning(
                "step %r: could not acknowledge %d NATS messages (%s); they "
                "come again and are skipped again",
                self.context.step,
                len(messages),
                exc,
            )

"""The inbox of an operator instance: a bounded queue that batches while busy.

A `Channel` is where messages wait between two threads. Data waits there
only while the consumer is busy: a consumer that is waiting gets each
message the moment it is put, and a busy consumer finds, when it comes
back, everything that arrived meanwhile. While they wait, consecutive data
messages from the same upstream channel are merged into one batch of at
most `max_rows` rows. A slow consumer thus makes few calls on large
batches and a fast one many calls on small batches, with no timer.

Control messages (watermarks, barriers, idleness, end) are never merged and
keep their place between the data messages. The queue holds at most
`capacity` entries, so a producer blocks while a slow consumer works
through them (backpressure). Waits block without polling: `close()` wakes
every waiting thread when the run is aborted, and `wake()` wakes the
consumer for work outside the queue (committing a checkpoint).
"""

from __future__ import annotations

import collections
import threading

from dataflare.batch.batcher import concat_batches
from dataflare.streaming.messages import Data, Message


class _Merged:
    """Data messages of one upstream channel, merged while they waited."""

    __slots__ = ("batches", "channel", "created_ns", "rows")

    def __init__(self, first: Data, second: Data) -> None:
        self.channel = first.channel
        self.batches = [first.batch, second.batch]
        self.rows = first.batch.num_rows + second.batch.num_rows
        self.created_ns = first.created_ns  # the oldest rows set the latency

    def add(self, data: Data) -> None:
        self.batches.append(data.batch)
        self.rows += data.batch.num_rows

    def message(self) -> Data:
        return Data(self.channel, concat_batches(self.batches), self.created_ns)


class Channel:
    """A bounded, blocking queue of messages that merges waiting data.

    Example::

        inbox = Channel(capacity=8, max_rows=65536)
        inbox.put(Data(0, batch, time.monotonic_ns()))  # producer thread
        message = inbox.get()  # consumer thread; None after wake() or close()
    """

    def __init__(self, *, capacity: int, max_rows: int) -> None:
        self.capacity = capacity
        self.max_rows = max_rows
        self._entries: collections.deque[Message | _Merged] = collections.deque()
        lock = threading.Lock()
        self._readable = threading.Condition(lock)
        self._writable = threading.Condition(lock)
        self._closed = False
        self._woken = False

    def put(self, message: Message) -> bool:
        """Queue `message`, blocking while the channel is full.

        Returns:
            False if the channel was closed (the run is aborting) instead.
        """
        with self._writable:
            while True:
                if self._closed:
                    return False
                if isinstance(message, Data) and self._merge(message):
                    return True
                if len(self._entries) < self.capacity:
                    break
                self._writable.wait()
            self._entries.append(message)
            self._readable.notify()
            return True

    def _merge(self, data: Data) -> bool:
        """Add `data` to the last entry if that is unread data of its channel."""
        if not self._entries:
            return False
        last = self._entries[-1]
        if isinstance(last, Data):
            first, rows = last.batch, last.batch.num_rows
        elif isinstance(last, _Merged):
            first, rows = last.batches[0], last.rows
        else:
            return False
        if last.channel != data.channel or rows + data.batch.num_rows > self.max_rows:
            return False
        if not first.schema.equals(data.batch.schema):
            return False
        if isinstance(last, _Merged):
            last.add(data)
        else:
            self._entries[-1] = _Merged(last, data)
        return True

    def get(self) -> Message | None:
        """Return the next message, blocking until there is one.

        Returns:
            None when `wake()` or `close()` interrupted the wait.
        """
        with self._readable:
            while not self._entries and not self._woken and not self._closed:
                self._readable.wait()
            self._woken = False
            if self._closed or not self._entries:
                return None
            entry = self._entries.popleft()
            self._writable.notify()
        # Concatenate outside the lock, so that the producer can go on.
        return entry.message() if isinstance(entry, _Merged) else entry

    def wake(self) -> None:
        """Make a waiting (or the next) `get()` return None once."""
        with self._readable:
            self._woken = True
            self._readable.notify()

    def close(self) -> None:
        """Wake every waiting thread; later calls return at once."""
        with self._readable:
            self._closed = True
            self._readable.notify_all()
            self._writable.notify_all()

    def __len__(self) -> int:
        return len(self._entries)
